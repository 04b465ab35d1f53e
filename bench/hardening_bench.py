"""Failure and isolation figures of issue 19, measured on the real `tagway serve` (embedded store).

    python bench/hardening_bench.py kill [--rounds 3] [--rps 300] [--seconds 10]
    python bench/hardening_bench.py isolation [--rows 1000000] [--rps 50] [--seconds 20] [--queries 4]
    python bench/hardening_bench.py soak [--minutes 10] [--share 0.8]

kill: open-loop load at --rps for --seconds, SIGKILL, restart on the same data directory, count the calls the
  client saw answered against the rows stored: the loss the write-ahead log bounds (one flush interval, 100 ms).
isolation: --rows calls seeded into llm_calls, then production at --rps (open loop) alone and while --queries
  threads ask heavy stats questions over the gateway's API without pause; p99 of the production calls, and the
  ratio (goal: within 3x).
soak: the throughput one process sustains (closed loop, 32 connections, 10 s), then an open-loop load at --share
  of it for --minutes with mixed bodies (90% ~1 KB, 9% ~50 KB, 1% ~1 MB; content captured and redacted); the
  gateway's RSS every 10 s (growth from minute 1 to the end: goal < 10%) and acknowledged vs stored (goal: 0 lost).
Everything binds 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import aiohttp
import httpx
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.gateway_bench import free_port, wait_http, wait_port  # noqa: E402

ADMIN = "tw-bench-admin-0123456789abcdefghijklmnopq"
KEY = "tw-bench-acme-0123456789abcdefghijklmnopqr"


def _hash(k: str) -> str:
    return "sha256:" + hashlib.sha256(k.encode()).hexdigest()


class Gateway:
    def __init__(self, tmp: str, upstream_port: int, recording: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = os.path.join(tmp, "tagway.yaml")
        cfg = {"server": {"host": "127.0.0.1", "port": self.port, "max_body_bytes": 4 << 20},
               "storage": {"data_dir": os.path.join(tmp, "data")},
               "recording": recording or {},
               "admin_key_hash": _hash(ADMIN),
               "models": [{"name": "gpt-bench", "provider": "openai",
                           "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                           "input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}],
               "tenants": [{"customer": "acme", "keys": [{"id": "bench", "hash": _hash(KEY)}]}]}
        with open(self.config, "w") as f:
            yaml.safe_dump(cfg, f)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", self.config],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/readyz", timeout=120)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(120)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def count_stored(self, trace_ids: list[str]) -> int:
        n = 0
        for i in range(0, len(trace_ids), 5000):
            r = httpx.post(self.url + "/admin/store/query", headers={"Authorization": f"Bearer {ADMIN}"},
                           json={"sql": "SELECT count() FROM llm_calls WHERE trace_id IN {t:Array(String)}",
                                 "parameters": {"t": trace_ids[i:i + 5000]}}, timeout=120)
            r.raise_for_status()
            n += int(r.json()["rows"][0][0])
        return n


def body(size: int) -> bytes:
    """A chat request whose user message is about `size` bytes."""
    text = ("Where is my refund for order 1234? " * (size // 36 + 1))[:size]
    return b'{"model":"gpt-bench","messages":[{"role":"user","content":"' + text.encode() + b'"}]}'


async def open_loop(url: str, rps: float, seconds: float, pick, acked: list[str], latencies: list[float],
                    stop: threading.Event | None = None) -> int:
    """One request every 1/rps s whatever the previous did (a stall shows as latency). Returns requests sent."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
               "x-tagway-intent": "refund", "x-tagway-tags": "region=eu"}
    sent = 0
    # bounded connections: when the gateway falls behind, requests wait in the client (and show as latency) instead
    # of opening sockets until the process runs out of file descriptors
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def one(data: bytes) -> None:
            t0 = time.perf_counter()
            try:
                async with s.post(url + "/v1/chat/completions", data=data, headers=headers,
                                  timeout=aiohttp.ClientTimeout(total=60)) as r:
                    await r.read()
                    if r.status == 200:
                        acked.append(r.headers["x-tagway-trace-id"])
                        latencies.append(time.perf_counter() - t0)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass

        tasks = set()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds and not (stop and stop.is_set()):
            due = start + sent / rps
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = asyncio.ensure_future(one(pick()))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            sent += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    return sent


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] * 1000 if len(xs) > 1 else float("nan")


def upstream() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "instant_upstream.py"), str(port)],
                            stdout=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


# -- kill ---------------------------------------------------------------------------------------------------------
def kill(args: argparse.Namespace) -> None:
    up, up_port = upstream()
    small = body(200)
    try:
        results = []
        for r in range(args.rounds):
            tmp = tempfile.mkdtemp(prefix="tagway-kill-")
            g = Gateway(tmp, up_port).start()
            acked: list[str] = []
            lat: list[float] = []
            stop = threading.Event()
            loader = threading.Thread(target=lambda: asyncio.run(
                open_loop(g.url, args.rps, args.seconds + 30, lambda: small, acked, lat, stop)))
            loader.start()
            time.sleep(args.seconds)
            g.proc.send_signal(signal.SIGKILL)
            g.proc.wait(10)
            stop.set()
            loader.join(120)
            g.start()
            deadline = time.monotonic() + 60
            stored = 0
            while time.monotonic() < deadline:
                stored = g.count_stored(acked)
                if stored >= len(acked):
                    break
                time.sleep(1)
            g.stop()
            lost = len(acked) - stored
            results.append((len(acked), lost))
            print(f"round {r + 1}: acknowledged {len(acked)}, stored {stored}, lost {lost} "
                  f"({lost / max(1, len(acked)):.2%}; {lost / args.rps * 1000:.0f} ms of traffic at {args.rps} rps)",
                  flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
        med = statistics.median(lost for _, lost in results)
        print(f"\nSIGKILL at {args.rps} rps: median loss {med:.0f} calls = {med / args.rps * 1000:.0f} ms of traffic"
              f" (write-ahead flush interval 100 ms; before the log: up to a 2 s batch)")
    finally:
        up.terminate()


# -- isolation ----------------------------------------------------------------------------------------------------
SEED = """INSERT INTO llm_calls (Timestamp, trace_id, span_id, customer, intent, prompt_version, tags, operation,
model_requested, model_served, provider, status, error_type, latency_ms, input_tokens, output_tokens, cost_usd, source)
SELECT now64(9) - toIntervalSecond(number % 604800), lower(hex(cityHash64(number))) || lower(hex(number)),
  lower(hex(number)), concat('tenant-', toString(number % 200)), ['refund', 'billing', 'search'][number % 3 + 1],
  'v1', map('region', ['eu', 'us', 'apac'][number % 3 + 1]), 'chat', 'gpt-bench', 'gpt-bench', 'openai',
  if(number % 17 = 0, 'error', 'ok'), if(number % 17 = 0, 'http_503', ''), 100 + number % 900, 20, 10, 0.0001,
  'production' FROM numbers({n:UInt64})"""


def isolation(args: argparse.Namespace) -> None:
    up, up_port = upstream()
    tmp = tempfile.mkdtemp(prefix="tagway-iso-")
    g = Gateway(tmp, up_port).start()
    small = body(200)
    try:
        # a command takes the gateway's local credential (its discovery file), not the admin key
        from exporters import discovery  # noqa: PLC0415
        credential = discovery.read(os.path.join(tmp, "data", "clickhouse")).credential
        r = httpx.post(g.url + "/admin/store/command", headers={"Authorization": f"Bearer {credential}"},
                       json={"sql": SEED, "parameters": {"n": args.rows}}, timeout=600)
        r.raise_for_status()
        questions = ["/admin/stats?by=customer&by=intent&since=7d", "/admin/stats?by=tag.region&since=7d",
                     "/admin/errors?since=7d", "/admin/timeseries?since=7d"]
        figures = []
        for rnd in range(args.rounds):
            alone_lat: list[float] = []
            asyncio.run(open_loop(g.url, args.rps, args.seconds, lambda: small, [], alone_lat))
            stop = threading.Event()
            done = [0]

            def ask(path: str) -> None:
                with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
                    while not stop.is_set():
                        c.get(g.url + path)
                        done[0] += 1

            threads = [threading.Thread(target=ask, args=(questions[i % len(questions)],))
                       for i in range(args.queries)]
            [t.start() for t in threads]
            busy_lat: list[float] = []
            asyncio.run(open_loop(g.url, args.rps, args.seconds, lambda: small, [], busy_lat))
            stop.set()
            [t.join(300) for t in threads]
            a, b = p99(alone_lat), p99(busy_lat)
            figures.append((a, b))
            print(f"round {rnd + 1}: p99 alone {a:.1f} ms, with {args.queries} heavy questions {b:.1f} ms "
                  f"({b / a:.2f}x; {done[0]} questions answered meanwhile)", flush=True)
        a = statistics.median(x for x, _ in figures)
        b = statistics.median(y for _, y in figures)
        print(f"\n{args.rows:,} calls stored, production {args.rps} rps: p99 {a:.1f} ms alone, {b:.1f} ms while "
              f"{args.queries} heavy stats questions run: {b / a:.2f}x (goal <= 3x)")
    finally:
        g.stop()
        up.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


# -- soak ---------------------------------------------------------------------------------------------------------
def soak(args: argparse.Namespace) -> None:
    up, up_port = upstream()
    tmp = tempfile.mkdtemp(prefix="tagway-soak-")
    g = Gateway(tmp, up_port).start()
    sizes = [body(1000), body(50_000), body(1_000_000)]
    rng = random.Random(7)

    def pick() -> bytes:
        x = rng.random()
        return sizes[0] if x < 0.90 else sizes[1] if x < 0.99 else sizes[2]

    try:
        acked: list[str] = []
        lat: list[float] = []
        t0 = time.perf_counter()

        async def closed(n: int = 32, seconds: float = 10) -> None:
            async with aiohttp.ClientSession() as s:
                async def worker() -> None:
                    while time.perf_counter() - t0 < seconds:
                        async with s.post(g.url + "/v1/chat/completions", data=pick(),
                                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                            await r.read()
                            if r.status == 200:
                                acked.append(r.headers["x-tagway-trace-id"])
                await asyncio.gather(*(worker() for _ in range(n)))

        asyncio.run(closed())
        max_rps = len(acked) / (time.perf_counter() - t0)
        rate = args.share * max_rps
        print(f"sustained (closed loop, 32 connections, mixed bodies): {max_rps:.0f} req/s; soaking at {rate:.0f} "
              f"req/s for {args.minutes} min", flush=True)
        rss: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            start = time.monotonic()
            while not stop.wait(10):
                rss.append((time.monotonic() - start, g.rss_mb()))

        sampler = threading.Thread(target=sample)
        sampler.start()
        soaked: list[str] = []
        asyncio.run(open_loop(g.url, rate, args.minutes * 60, pick, soaked, lat))
        stop.set()
        sampler.join()
        acked += soaked
        time.sleep(5)
        stored = g.count_stored(acked)
        first = next((m for t, m in rss if t >= 60), rss[0][1] if rss else 0.0)
        last = rss[-1][1] if rss else 0.0
        print(f"RSS: {first:.0f} MB at minute 1, {last:.0f} MB at the end ({(last - first) / first:+.1%}; max "
              f"{max(m for _, m in rss):.0f} MB); p99 {p99(lat):.1f} ms; acknowledged {len(acked)}, stored {stored}, "
              f"lost {len(acked) - stored}")
    finally:
        g.stop()
        up.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


def raise_fd_limit() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def main() -> None:
    raise_fd_limit()
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kill")
    k.add_argument("--rounds", type=int, default=3)
    k.add_argument("--rps", type=float, default=300)
    k.add_argument("--seconds", type=float, default=10)
    i = sub.add_parser("isolation")
    i.add_argument("--rows", type=int, default=1_000_000)
    i.add_argument("--rps", type=float, default=50)
    i.add_argument("--seconds", type=float, default=20)
    i.add_argument("--queries", type=int, default=4)
    i.add_argument("--rounds", type=int, default=3)
    s = sub.add_parser("soak")
    s.add_argument("--minutes", type=float, default=10)
    s.add_argument("--share", type=float, default=0.8)
    args = ap.parse_args()
    {"kill": kill, "isolation": isolation, "soak": soak}[args.what](args)


if __name__ == "__main__":
    main()
