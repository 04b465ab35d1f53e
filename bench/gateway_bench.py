"""Gateway load benchmark: throughput and added latency over an instant upstream, in one run.

    python bench/gateway_bench.py [--seconds 10] [--recording on,off,bare] [--rounds 3]
    python bench/gateway_bench.py --recording off --conns 64 --rounds 5 --python /path/to/other/venv/bin/python

`--python` runs a second interpreter (another checkout's venv: the code before a change) beside this one,
alternating round by round, so before/after figures come from one run on one machine state.

What it does (2-core machine): the instant upstream and wrk share core 1 (`taskset`), the gateway gets core 0 to
itself (one process, uvloop + httptools, as `tagway serve` runs it). For each concurrency (1 and 64) it measures
the upstream directly and then through the gateway with tags resolved (headers) and spans stamped, recording on
(embedded chDB, batched off the event loop) and off, and `bare`: bench/bare_passthrough.py, a raw ASGI +
aiohttp pass-through with no gateway features (the Python ceiling); `split` is recording on with every gateway
thread but the event loop's moved to core 1, as a host with a core to spare would run them; `nocontent` is recording
on with `recording.capture_content: false` (calls, tags, tokens and cost recorded, no prompts or answers). Prints req/s,
p50/p99, the gateway's added p50/p99 and its CPU per request (user + system time of the gateway process, all
threads, from /proc, over the wrk run and until its calls are stored): the figure that does not depend on what else
the machine is doing, and its split by thread (the event loop, the exporter's Python threads, chDB's). Medians over
rounds.
Needs `wrk` (Debian: apt-get install wrk). Everything binds 127.0.0.1 and stops by itself.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
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


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each live thread of a process, by thread id with its group: `loop` (the main thread: the event
    loop), `python` (the exporter's and other Python threads, which keep the interpreter's name) or `chdb` (its
    threads name themselves). Approximate: a thread that ends between two snapshots is not counted, so the groups
    can add up to less than the process's CPU."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue  # ended meanwhile
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        group = "loop" if tid == str(pid) else "python" if comm.startswith("python") else "chdb"
        out[f"{group}:{tid}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def by_group(before: dict[str, float], after: dict[str, float], calls: float) -> dict[str, float]:
    """µs of CPU a call by thread group between two thread_cpu snapshots."""
    out = {"loop": 0.0, "python": 0.0, "chdb": 0.0}
    for key, t in after.items():
        out[key.split(":")[0]] += (t - before.get(key, 0.0)) * 1e6 / max(calls, 1.0)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its (waited-for and live) children, all threads."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def start_gateway(tmp: str, upstream_port: int, recording: bool,
                  python: str = sys.executable, capture: bool = True) -> tuple[subprocess.Popen, int]:
    port = free_port()
    data_dir = tempfile.mkdtemp(dir=tmp)
    cfg = {
        "server": {"host": "127.0.0.1", "port": port},
        "storage": {"data_dir": data_dir},
        "recording": {"enabled": recording, "capture_content": capture},
        "models": [{"name": "gpt-bench", "provider": "openai", "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                    "input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}],
        "tenants": [{"customer": "acme", "keys": [{"id": "bench", "hash": _hash(KEY)}]}],
    }
    path = os.path.join(data_dir, "tagway.yaml")
    yaml.safe_dump(cfg, open(path, "w"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    # stderr (the access log: one line per call) goes to a file, as an operator's log collector would read it;
    # a pipe nobody drains would stall the gateway once full
    proc = subprocess.Popen(["taskset", "-c", "0", python, "-m", "gateway.cli", "serve", "--config", path],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(data_dir, "stderr.log"), "w"))
    wait_http(f"http://127.0.0.1:{port}/readyz")
    return proc, port


def _hash(key: str) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for m in re.finditer(r"^(tagway_\w+)(?:\{[^}]*\})? ([\d.e+-]+)$", text, re.M):  # summed over labels
        totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


def measure(python: str, tmp: str, up_port: int, mode: str, conns: list[int], seconds: int,
            lua: tuple[str, str]) -> list[tuple]:
    direct_lua, gw_lua = lua
    rows = []
    if mode == "bare":  # the Python ceiling: raw ASGI + aiohttp, nothing else (bench/bare_passthrough.py)
        gw_port = free_port()
        gw = subprocess.Popen(["taskset", "-c", "0", python, os.path.join(HERE, "bare_passthrough.py"), str(gw_port),
                               f"http://127.0.0.1:{up_port}/v1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(gw_port)
    else:
        gw, gw_port = start_gateway(tmp, up_port, mode in ("on", "split", "nocontent"), python,
                                    capture=mode != "nocontent")
    try:
        wrk(f"http://127.0.0.1:{gw_port}/v1/chat/completions", gw_lua, 16, 2)  # warm-up
        if mode == "split":
            off_the_loop_core(gw.pid)
        for c in conns:
            d = wrk(f"http://127.0.0.1:{up_port}/v1/chat/completions", direct_lua, c, seconds)
            settle(gw_port, mode)
            cpu0, threads0 = cpu_seconds(gw.pid), thread_cpu(gw.pid)
            g = wrk(f"http://127.0.0.1:{gw_port}/v1/chat/completions", gw_lua, c, seconds)
            settle(gw_port, mode)  # the run's own inserts count, the warm-up's do not
            g["cpu_ms"] = (cpu_seconds(gw.pid) - cpu0) * 1000 / max(1.0, g["rps"] * seconds)
            g["threads"] = by_group(threads0, thread_cpu(gw.pid), g["rps"] * seconds)
            rows.append((mode, c, d, g))
        time.sleep(2 if mode != "bare" else 0)  # let the exporter drain
        m = metrics(gw_port) if mode != "bare" else {}
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(120)
    exported = m.get("tagway_spans_exported_total", 0)
    print(f"[{python}] recording {mode}: calls={m.get('tagway_calls_total', 0):.0f}"
          f" errors={m.get('tagway_call_errors_total', 0):.0f} exported={exported:.0f}"
          f" spooled={m.get('tagway_spans_spooled_total', 0):.0f}"
          f" dropped={m.get('tagway_spans_dropped_total', 0):.0f}", flush=True)
    return rows


def off_the_loop_core(pid: int) -> None:
    """Move every thread of the gateway but the event loop's to core 1: what a host with a core to spare gives the
    exporter's threads and chDB's by itself (here core 1 is wrk's and the upstream's too, so this is a bench mode,
    not a deployment advice)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid != str(pid):
            try:
                os.sched_setaffinity(int(tid), {1})
            except OSError:
                pass  # a thread that just ended


def settle(port: int, mode: str, timeout: float = 15.0) -> None:
    """With recording on, wait until every call so far is stored (or spooled): the CPU window then holds exactly
    the inserts of the calls it served (a batch is inserted up to `batch_max_seconds` after its calls)."""
    if mode not in ("on", "split", "nocontent"):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(port)
        if m.get("tagway_spans_exported_total", 0) + m.get("tagway_spans_spooled_total", 0) >= \
                m.get("tagway_calls_total", 0):
            return
        time.sleep(0.1)


def _label(python: str) -> str:
    """How the report names an interpreter: this checkout's, or the one given with --python."""
    return "this" if python == sys.executable else "other"


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _per_round(results: dict, py: str, c: int, a: str, b: str, key: str) -> str:
    """Mode a over mode b in each round, and their median: the same ratio as the medians' but from measurements
    taken close together, so a machine that speeds up or slows down during the run moves it less."""
    ratios = [ga[key] / gb[key] for (_, ga), (_, gb) in zip(results[(py, a, c)], results[(py, b, c)])]
    return ", ".join(f"{r:.2f}x" for r in ratios) + f" (median {statistics.median(ratios):.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--recording", default="on,off")
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--python", default="", help="a second interpreter to compare against, round by round")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk not found (apt-get install wrk)")
    conns = [int(c) for c in args.conns.split(",")]
    pythons = [sys.executable] + ([args.python] if args.python else [])
    tmp = tempfile.mkdtemp(prefix="tagway-bench-")
    up_port = free_port()
    upstream = subprocess.Popen(["taskset", "-c", "1", sys.executable, os.path.join(HERE, "instant_upstream.py"),
                                 str(up_port)], stdout=subprocess.DEVNULL)
    lua = (os.path.join(tmp, "direct.lua"), os.path.join(tmp, "gw.lua"))
    lua_script(lua[0], False)
    lua_script(lua[1], True)
    results: dict[tuple, list[tuple[dict, dict]]] = {}
    try:
        wait_port(up_port)
        for rnd in range(1, args.rounds + 1):
            for mode in args.recording.split(","):
                # which interpreter goes first alternates by round: the first of a pair ran measurably slower
                # (the same bare pass-through, 1.11x its CPU a request, in one 3-round run)
                for py in (pythons if rnd % 2 else pythons[::-1]):
                    for mode_, c, d, g in measure(py, tmp, up_port, mode, conns, args.seconds, lua):
                        results.setdefault((py, mode_, c), []).append((d, g))
                        # each round too: its spread shows
                        print(f"  round {rnd}: {_label(py)} {mode_} c{c}: {g['rps']:.0f} req/s, p99 {g['p99']:.1f} ms,"
                              f" {g['cpu_ms']:.3f} CPU ms/req (µs by thread: "
                              + ", ".join(f"{k} {v:.0f}" for k, v in g["threads"].items()) + ")", flush=True)
    finally:
        upstream.terminate()
        upstream.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmedians over {args.rounds} round(s)")
    print(f"{'python':>8} {'recording':>9} {'conns':>5} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} |"
          f" {'gateway rps':>11} {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} {'added p99':>9} | {'cpu ms/req':>10}"
          " | non-2xx")
    med: dict[tuple, dict] = {}
    for (py, mode, c), pairs in results.items():
        ds, gs = [d for d, _ in pairs], [g for _, g in pairs]
        m = {k: _median(gs, k) for k in ("rps", "p50", "p99", "cpu_ms")}
        med[(py, mode, c)] = m
        label = _label(py)
        print(f"{label:>8} {mode:>9} {c:>5} | {_median(ds, 'rps'):>10.0f} {_median(ds, 'p50'):>7.3f}"
              f" {_median(ds, 'p99'):>7.3f} | {m['rps']:>11.0f} {m['p50']:>7.3f} {m['p99']:>7.3f} |"
              f" {m['p50'] - _median(ds, 'p50'):>9.3f} {m['p99'] - _median(ds, 'p99'):>9.3f} |"
              f" {m['cpu_ms']:>10.3f} | {sum(g['non2xx'] for g in gs)}")
    print("CPU a request by thread (µs, medians): loop = the event loop, python = the exporter's threads, chdb = the"
          " store's")
    for (py, mode, c), pairs in results.items():
        groups = {k: statistics.median(g["threads"][k] for _, g in pairs) for k in ("loop", "python", "chdb")}
        print(f"{_label(py):>8} {mode:>9} {c:>5} | " + "  ".join(f"{k} {v:.1f}" for k, v in groups.items()))
    for c in conns:
        for py in pythons:
            on, off, bare = med.get((py, "on", c)), med.get((py, "off", c)), med.get((py, "bare", c))
            label = _label(py)
            if on and off:
                print(f"[{label}] recording at {c} connections: throughput {on['rps'] / off['rps']:.2f}x of off, CPU"
                      f" per request {on['cpu_ms'] / off['cpu_ms']:.2f}x (goal: >= 0.90x and <= 1.10x)")
                print(f"[{label}]   round by round (on and off minutes apart, so the machine's drift cancels):"
                      f" CPU {_per_round(results, py, c, 'on', 'off', 'cpu_ms')},"
                      f" throughput {_per_round(results, py, c, 'on', 'off', 'rps')}")
            nocontent = med.get((py, "nocontent", c))
            if nocontent and off:
                print(f"[{label}] recording without content capture at {c} connections: throughput"
                      f" {nocontent['rps'] / off['rps']:.2f}x of off, CPU per request"
                      f" {nocontent['cpu_ms'] / off['cpu_ms']:.2f}x")
            split = med.get((py, "split", c))
            if split and off:
                print(f"[{label}] recording, its threads on their own core, at {c} connections: throughput"
                      f" {split['rps'] / off['rps']:.2f}x of off, CPU per request {split['cpu_ms'] / off['cpu_ms']:.2f}x")
            for name, m in (("on", on), ("off", off), ("without content capture", nocontent)):
                if m and bare:
                    print(f"[{label}] recording {name} at {c} connections: CPU per request {m['cpu_ms'] / bare['cpu_ms']:.2f}x"
                          f" of the bare pass-through's (goal <= 2x)")
        for mode in args.recording.split(","):
            a, b = med.get((sys.executable, mode, c)), med.get((args.python, mode, c))
            if a and b:
                print(f"this / other, recording {mode}, {c} connections: throughput {a['rps'] / b['rps']:.3f}x,"
                      f" CPU per request {a['cpu_ms'] / b['cpu_ms']:.3f}x")


if __name__ == "__main__":
    main()
