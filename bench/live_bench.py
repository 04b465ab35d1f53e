"""Does a replay running through the gateway starve production? Production p99 at a fixed rate, alone and while a
1,000-case replay runs at its default concurrency through the same `tagway serve` (embedded store: the replay's
slice query, result inserts and report go through the gateway's store API too).

    python bench/live_bench.py [--rounds 3] [--rps 50] [--cases 1000] [--upstream-ms 0]

Set-up: the instant upstream (bench/instant_upstream.py, or --upstream-ms of latency on top) and `tagway serve`
on an embedded store in a temp dir; 1,000 seed calls are recorded first. Each round: production alone for
--seconds, then production while `tagway replay run --gateway ...` (a subprocess, as a user runs it) replays the
seed calls. Production is open-loop (a request every 1/rps s whatever the previous did, so a stall shows as
latency) and only requests sent while replay calls were being recorded count for the "with replay" figure
(the window is read back from llm_calls). Medians over rounds; the ratio is with / without.

Measured 2026-12-06 on a quiet machine, 3 rounds: production p99 alone 7.0 ms, with the replay 8.3 ms (1.20x);
the replay CLI took 3.2 s for the 1,000 cases.
Measured 2026-12-03 on the shared 2-core machine under heavy load from other jobs (load average 6-27), so these
are indications, not results: without the replay lane (no cap), 1 round at load ~6: p99 alone 39.6 ms, with the
replay 115.5 ms (2.92x). With the lane at its default (server.replay_concurrency 4), 2 rounds at load ~25: 436.6 ->
783.6 ms (1.79x) and 440.5 -> 736.1 ms (1.67x). Later runs at load ~20 did not finish a round within 6-8 minutes.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ADMIN = "tw-bench-admin-0123456789abcdefghijklmn"
PROD = "tw-bench-prod-0123456789abcdefghijklmno"
SEED = "tw-bench-seed-0123456789abcdefghijklmno"


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not answer")


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[98] if len(xs) >= 2 else float("nan")


async def production(url: str, rps: float, seconds: float, stop: asyncio.Event | None = None) -> list[tuple[float, float]]:
    """(sent at wall time, latency ms) for one request every 1/rps s, for `seconds` or until `stop`."""
    import aiohttp
    out: list[tuple[float, float]] = []
    body = b'{"model":"gpt-bench","messages":[{"role":"user","content":"where is my refund?"}]}'
    headers = {"authorization": f"Bearer {PROD}", "content-type": "application/json",
               "x-tagway-intent": "refund"}

    async with aiohttp.ClientSession() as s:
        async def one(sched: float) -> None:
            async with s.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            out.append((time.time() - (time.perf_counter() - sched), (time.perf_counter() - sched) * 1000))

        tasks = []
        t0 = time.perf_counter()
        i = 0
        while (stop is None and i < rps * seconds) or (stop is not None and not stop.is_set()):
            sched = t0 + i / rps
            await asyncio.sleep(max(0.0, sched - time.perf_counter()))
            tasks.append(asyncio.create_task(one(sched)))
            i += 1
        await asyncio.gather(*tasks)
    return out


async def seed(url: str, n: int) -> None:
    import aiohttp
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            async with sem:
                async with s.post(url + "/v1/chat/completions", json={
                        "model": "gpt-bench", "messages": [{"role": "user", "content": f"refund question #{i}"}]},
                        headers={"authorization": f"Bearer {SEED}", "x-tagway-intent": "refund",
                                 "x-tagway-tags": f"region={'eu' if i % 2 else 'us'}"}) as r:
                    await r.read()
        await asyncio.gather(*(one(i) for i in range(n)))


async def with_replay(url: str, cfg: str, spec: str, rps: float, run_id: str) -> tuple[list[tuple[float, float]], float]:
    stop = asyncio.Event()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TAGWAY_CONFIG": cfg}
    prod = asyncio.create_task(production(url, rps, 0, stop))
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "replay", "run", "--spec", spec, "--gateway", url, "--api-key", ADMIN,
        "--no-progress", "--run-id", run_id, "--format", "json", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    took = time.perf_counter() - t0
    stop.set()
    lat = await prod
    if proc.returncode not in (0, 1):
        raise SystemExit(f"bench: replay failed ({proc.returncode}): {err.decode()[-800:]}")
    return lat, took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rps", type=float, default=50)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--replay-lane", type=int, default=None,
                    help="server.replay_concurrency for the gateway (default: the gateway's default; 0 = no cap)")
    args = ap.parse_args()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: still stop what we started
    from exporters.dsn import embedded_dsn
    from exporters.store_access import open_store

    tmp = tempfile.mkdtemp(prefix="tagway-live-bench-")
    up_port, port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, os.path.join(HERE, "instant_upstream.py"), str(up_port)],
                                stdout=subprocess.DEVNULL)
    data_dir = os.path.join(tmp, "data")
    server = {"host": "127.0.0.1", "port": port}
    if args.replay_lane is not None:
        server["replay_concurrency"] = args.replay_lane
    cfg = {"server": server, "storage": {"data_dir": data_dir},
           "recording": {"batch_max_seconds": 0.5}, "admin_key_hash": _hash(ADMIN),
           "models": [{"name": "gpt-bench", "provider": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1",
                       "input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}],
           "tenants": [{"customer": "prod", "keys": [{"id": "prod", "hash": _hash(PROD)}]},
                       {"customer": "seed", "keys": [{"id": "seed", "hash": _hash(SEED)}]}]}
    cfg_path, spec_path = os.path.join(tmp, "tagway.yaml"), os.path.join(tmp, "replay.yaml")
    yaml.safe_dump(cfg, open(cfg_path, "w"))
    yaml.safe_dump({"slice": {"customer": ["seed"], "since": "1h", "limit": args.cases, "segment_by": ["tag.region"],
                              "sampling": {"mode": "uniform", "seed": 1}},
                    "candidates": [{"name": "cand", "model": "gpt-bench"}],
                    "evaluators": [{"type": "icontains", "value": "refund"}]}, open(spec_path, "w"))
    gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", cfg_path],
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
                          stdout=subprocess.DEVNULL, stderr=open(cfg_path + ".stderr.log", "w"))  # access log
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz")
        asyncio.run(seed(url, args.cases))
        time.sleep(2)  # recorded in batches
        store = open_store(embedded_dsn(data_dir), verbose=False)  # through the gateway: it holds the store
        alone_p99, with_p99, took_s = [], [], []
        for r in range(args.rounds):
            alone = asyncio.run(production(url, args.rps, args.seconds))
            rid = f"bench-{os.getpid()}-{r}"
            lat, took = asyncio.run(with_replay(url, cfg_path, spec_path, args.rps, rid))
            lo, hi = store.query("SELECT toFloat64(min(Timestamp)) AS lo, toFloat64(max(Timestamp)) AS hi "
                                 "FROM llm_calls WHERE replay_run_id = {r:String}", {"r": rid})[0].values()
            during = [ms for sent, ms in lat if lo <= sent <= hi]
            alone_p99.append(p99([ms for _, ms in alone]))
            with_p99.append(p99(during))
            took_s.append(took)
            print(f"round {r + 1}: production p99 alone {alone_p99[-1]:.1f} ms ({len(alone)} req), with replay "
                  f"{with_p99[-1]:.1f} ms ({len(during)} req during {hi - lo:.1f} s of replay calls; replay CLI "
                  f"took {took:.1f} s for {args.cases} cases)", flush=True)
        a, w = statistics.median(alone_p99), statistics.median(with_p99)
        lane = "default" if args.replay_lane is None else args.replay_lane
        print(f"replay lane {lane}: median production p99 at {args.rps:g} rps: alone {a:.1f} ms, with a {args.cases}-case replay "
              f"{w:.1f} ms, ratio {w / a:.2f}x (goal <= 2x); replay CLI {statistics.median(took_s):.1f} s")
        store.close()
    finally:
        gw.terminate()
        gw.wait(60)
        upstream.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
