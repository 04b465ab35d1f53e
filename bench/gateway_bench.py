"""Gateway load benchmark: throughput and added latency over an instant upstream, in one run.

    python bench/gateway_bench.py [--seconds 10] [--recording on,off]

What it does (2-core machine): the instant upstream and wrk share core 1 (`taskset`), the gateway gets core 0 to
itself (one process, uvloop + httptools, as `tagway serve` runs it). For each concurrency (1 and 64) it measures
the upstream directly and then through the gateway with tags resolved (headers) and spans stamped, recording on
(embedded chDB, batched off the event loop) and off. Prints req/s, p50/p99, and the gateway's added p50/p99.
Needs `wrk` (Debian: apt-get install wrk). Everything binds 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "tw-bench-0123456789abcdefghijklmnopqrstuv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def lua_script(path: str, with_auth: bool) -> None:
    body = '{"model":"gpt-bench","messages":[{"role":"system","content":"You are a refunds assistant."},' \
           '{"role":"user","content":"Where is my refund for order 1234?"}],"temperature":0.2}'
    lines = ['wrk.method = "POST"', f"wrk.body = '{body}'", 'wrk.headers["Content-Type"] = "application/json"']
    if with_auth:
        lines += [f'wrk.headers["Authorization"] = "Bearer {KEY}"', 'wrk.headers["x-tagway-intent"] = "refund"',
                  'wrk.headers["x-tagway-prompt-version"] = "refund-v4"',
                  'wrk.headers["x-tagway-tags"] = "region=eu,tier=pro"']
    open(path, "w").write("\n".join(lines) + "\n")


def wrk(url: str, script: str, conns: int, seconds: int) -> dict:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def ms(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50": ms("50"), "p99": ms("99"), "non2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else ""}


def start_gateway(tmp: str, upstream_port: int, recording: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    data_dir = tempfile.mkdtemp(dir=tmp)
    cfg = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": data_dir},
        "recording": {"enabled": recording},
        "models": [{"name": "gpt-bench", "provider": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                    "input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}],
        "tenants": [{"customer": "acme", "keys": [{"id": "bench", "hash": _hash(KEY)}]}],
    }
    path = os.path.join(data_dir, "tagway.yaml")
    yaml.safe_dump(cfg, open(path, "w"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "gateway.cli", "serve", "--config", path],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_http(f"http://127.0.0.1:{port}/readyz")
    return proc, port


def _hash(key: str) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tagway_\w+) ([\d.e+-]+)$", text, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--recording", default="on,off")
    ap.add_argument("--conns", default="1,64")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk not found (apt-get install wrk)")
    tmp = tempfile.mkdtemp(prefix="tagway-bench-")
    up_port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", sys.executable, os.path.join(HERE, "instant_upstream.py"),
                                 str(up_port)], stdout=subprocess.DEVNULL)
    direct_lua, gw_lua = os.path.join(tmp, "direct.lua"), os.path.join(tmp, "gw.lua")
    lua_script(direct_lua, False)
    lua_script(gw_lua, True)
    rows = []
    try:
        wait_port(up_port)
        for mode in args.recording.split(","):
            gw, gw_port = start_gateway(tmp, up_port, mode == "on")
            try:
                wrk(f"http://127.0.0.1:{gw_port}/v1/chat/completions", gw_lua, 16, 2)  # warm-up
                for c in map(int, args.conns.split(",")):
                    d = wrk(f"http://127.0.0.1:{up_port}/v1/chat/completions", direct_lua, c, args.seconds)
                    g = wrk(f"http://127.0.0.1:{gw_port}/v1/chat/completions", gw_lua, c, args.seconds)
                    rows.append((mode, c, d, g))
                time.sleep(2)  # let the exporter drain
                m = metrics(gw_port)
            finally:
                gw.send_signal(signal.SIGTERM)
                gw.wait(120)
            exported = m.get("tagway_spans_exported_total", 0)
            print(f"recording {mode}: calls={m.get('tagway_calls_total', 0):.0f} errors={m.get('tagway_call_errors_total', 0):.0f}"
                  f" exported={exported:.0f} spooled={m.get('tagway_spans_spooled_total', 0):.0f}"
                  f" dropped={m.get('tagway_spans_dropped_total', 0):.0f}", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'recording':>9} {'conns':>5} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | {'gateway rps':>11}"
          f" {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} {'added p99':>9} | non-2xx")
    for mode, c, d, g in rows:
        print(f"{mode:>9} {c:>5} | {d['rps']:>10.0f} {d['p50']:>7.3f} {d['p99']:>7.3f} | {g['rps']:>11.0f}"
              f" {g['p50']:>7.3f} {g['p99']:>7.3f} | {g['p50'] - d['p50']:>9.3f} {g['p99'] - d['p99']:>9.3f} |"
              f" {g['non2xx']}{' ' + g['socket_errors'] if g['socket_errors'] else ''}")
    by = {(m, c): g for m, c, _, g in rows}
    for c in map(int, args.conns.split(",")):
        if ("on", c) in by and ("off", c) in by:
            cost = 1 - by[("on", c)]["rps"] / by[("off", c)]["rps"]
            print(f"recording cost at {c} connections: {cost:.1%} of throughput")


if __name__ == "__main__":
    main()
