"""Does shadow traffic cost production latency? Production p99 at a fixed rate through a `tagway serve` that mirrors
live calls to a candidate whose upstream hangs (or errors, or is slow), against the same gateway config without
`shadow:`, in one run, at the same time.

    python bench/shadow_bench.py [--rounds 3] [--rps 50] [--seconds 15] [--sample 0.5] [--shadow-upstream hang]

Set-up: the instant upstream (bench/instant_upstream.py) serves production; the shadow candidate's upstream is a
server that accepts and reads every request and never answers (`hang`; the candidate's timeout is 30 s), answers
500 at once (`error`), or answers after 2 s (`slow`). Two gateways on embedded stores of their own, identical but
for `shadow: [{model: candidate, sample, max_rps: 5}]`; each round sends production to both at once (open-loop: a
request every 1/rps s to each, whatever the previous did, so a stall shows as latency), so the load other jobs put
on the shared machine hits both alike (measured one after the other, the same two gateways with `sample: 0` differed
by 0.3x-4x between rounds). Medians over rounds (and the median of the per-round ratios); the goal is with/without within 1.10x. The shadow
gateway's /metrics counts are printed (sampled, dropped, failed) to show the shadow path was busy.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request

import yaml

from live_bench import ADMIN, PROD, _hash, free_port, p99, production, wait_http

HERE = os.path.dirname(os.path.abspath(__file__))


async def _upstream(port: int, mode: str) -> None:
    """The shadow candidate's upstream: hangs, errors, or is slow."""
    body = b'{"error":{"message":"candidate down","type":"server_error","param":null,"code":null}}'
    err = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    ok = b'{"id":"x","object":"chat.completion","created":1,"model":"c","choices":[{"index":0,"message":{"role":' \
         b'"assistant","content":"late"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    slow = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(ok)).encode() + \
        b"\r\n\r\n" + ok

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")), 0)
                await reader.readexactly(n)
                if mode == "hang":
                    await asyncio.sleep(3600)
                elif mode == "slow":
                    await asyncio.sleep(2)
                writer.write(err if mode == "error" else slow)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def _metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(urllib.request.Request(url + "/metrics", headers={
        "authorization": f"Bearer {ADMIN}"}), timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rps", type=float, default=50)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--sample", type=float, default=0.5)
    ap.add_argument("--max-rps", type=float, default=5)
    ap.add_argument("--shadow-upstream", choices=("hang", "error", "slow"), default="hang")
    args = ap.parse_args()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops us: still stop what we started

    tmp = tempfile.mkdtemp(prefix="tagway-shadow-bench-")
    up_port, shadow_port = free_port(), free_port()
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "instant_upstream.py"), str(up_port)],
                              stdout=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "-c", f"import asyncio, sys; sys.path.insert(0, {HERE!r}); "
                               f"from shadow_bench import _upstream; asyncio.run(_upstream({shadow_port}, "
                               f"{args.shadow_upstream!r}))"], stdout=subprocess.DEVNULL)]
    urls = {}
    try:
        for name in ("off", "on"):
            port = free_port()
            cfg = {"server": {"host": "127.0.0.1", "port": port},
                   "storage": {"data_dir": os.path.join(tmp, name)}, "recording": {"batch_max_seconds": 0.5},
                   "access_log": {"enabled": False}, "admin_key_hash": _hash(ADMIN),
                   "models": [{"name": "gpt-bench", "provider": "openai", "base_url": f"http://127.0.0.1:{up_port}/v1"},
                              {"name": "candidate", "provider": "openai", "timeout": 30,
                               "base_url": f"http://127.0.0.1:{shadow_port}/v1"}],
                   "tenants": [{"customer": "prod", "keys": [{"id": "prod", "hash": _hash(PROD)}]}]}
            if name == "on":
                cfg["shadow"] = [{"model": "candidate", "sample": args.sample, "max_rps": args.max_rps}]
            path = os.path.join(tmp, f"{name}.yaml")
            yaml.safe_dump(cfg, open(path, "w"))
            procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", path], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(path + ".stderr.log", "w")))
            urls[name] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            wait_http(url + "/readyz")
            asyncio.run(production(url, args.rps, 2))  # warm-up: connections, first batches
        p = {"off": [], "on": []}

        async def both() -> list:
            return await asyncio.gather(*(production(urls[n], args.rps, args.seconds) for n in ("off", "on")))

        for r in range(args.rounds):
            for name, lat in zip(("off", "on"), asyncio.run(both())):
                p[name].append(p99([ms for _, ms in lat]))
            print(f"round {r + 1}: production p99 without shadow {p['off'][-1]:.1f} ms, with shadow "
                  f"({args.shadow_upstream} candidate) {p['on'][-1]:.1f} ms ({int(args.rps * args.seconds)} req each)",
                  flush=True)
        counts = {o: _metric(urls["on"], "tagway_shadow_calls_total", outcome=o)
                  for o in ("sampled", "dropped", "sent", "failed")}
        off, on = statistics.median(p["off"]), statistics.median(p["on"])
        ratio = statistics.median(b / a for a, b in zip(p["off"], p["on"]))
        print(f"median production p99 at {args.rps:g} rps over {args.rounds} rounds: without shadow {off:.1f} ms, "
              f"with shadow (sample {args.sample:g}, max_rps {args.max_rps:g}, {args.shadow_upstream} candidate) "
              f"{on:.1f} ms, ratio {on / off:.2f}x, median per-round ratio {ratio:.2f}x (goal <= 1.10x); shadow calls "
              + ", ".join(f"{k} {v:.0f}" for k, v in counts.items()), flush=True)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
