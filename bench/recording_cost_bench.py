"""Where recording's CPU goes, in process: the real app and recorder (chDB, write-ahead log, exporter threads) driven
without a server or network at a steady rate, the process's CPU per call by thread, until every call is stored.

    python bench/recording_cost_bench.py                      # 3 rounds of 10 s at 2,500 calls/s, each mode
    python bench/recording_cost_bench.py --seconds 20 --rounds 5 --modes on,off

Modes, each in a process of its own (chDB allows one data directory per process), alternating round by round:
  off       recording off (no span, no content captured)
  python    recording on, every insert a no-op: capture, spans, encoding, write-ahead log; no store work
  otel      recording on, the store without any view: otel_traces alone (the Collector's table)
  on        recording on, the full schema (llm_calls and the rollup views), as `tagway serve` runs it
The process is pinned to one core (as bench/gateway_bench.py pins the gateway), so chDB's threads share it with the
event loop. Differences between modes are what each layer costs a call; the event loop's own share is the `main`
thread's, the encoder's `tagway-span-encode`'s, and an insert (parsing, views) runs on `tagway-span-send` (the
embedded store inserts on the calling thread); merges and the rest of chDB are `chdb and others`. /proc counts CPU in
10 ms ticks: at 25,000 calls a window, 0.4 µs a call. Prints each round and the medians.
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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("off", "python", "otel", "on")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by name (Python's names where Python knows the thread)."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = open(f"/proc/self/task/{tid}/stat").read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        name = "main" if tid == str(os.getpid()) else names.get(tid, stat[stat.index("(") + 1:stat.rindex(")")])
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _patch(mode: str) -> None:
    if mode == "otel":  # every view dropped once migrated: the insert writes otel_traces alone
        import exporters.recording as recording
        import exporters.schema as schema
        migrate = schema.migrate

        def migrate_without_views(store, settings=None, *a, **k):
            out = migrate(store, settings, *a, **k)
            rows, _ = store.query_rows("SELECT name FROM system.tables WHERE database = currentDatabase() "
                                       "AND engine = 'MaterializedView'")
            for (view,) in rows:
                store.command(f"DROP VIEW `{view}`")
            return out
        schema.migrate = recording.migrate = migrate_without_views
    elif mode == "python":
        from exporters.store import Store
        Store.insert_json_rows = lambda self, table, body, settings=None: None


async def _drive(mode: str, seconds: float, rate: int) -> None:
    from gateway.app import TagwayApp, default_recorder
    from gateway.cli import tune_gc
    from hot_path_bench import BODY, HEADERS, Instant, config  # the same call, key and instant upstream

    tmp = tempfile.mkdtemp(prefix="tagway-reccost-")
    cfg = config(recording={"enabled": mode != "off"}, storage={"data_dir": tmp})
    rec = default_recorder(cfg)
    app = TagwayApp(cfg, recorder=rec, owns_recorder=True)  # its shutdown stops the recorder
    await app.startup()
    tune_gc()  # as `tagway serve` does after start-up
    stub = Instant()
    app.proxy.providers.for_deployment = lambda d, op: stub
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": HEADERS, "query_string": b""}

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(_):
        pass

    async def run(secs: float) -> int:
        n, t0, burst = 0, time.monotonic(), max(1, rate // 50)
        while time.monotonic() - t0 < secs:
            for _ in range(burst):
                await app(scope, receive, send)
            n += burst
            await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
        return n

    try:
        await run(3)  # warm-up, stored before the window opens
        await asyncio.to_thread(rec.force_flush, 60_000)
        before = thread_cpu()
        n = await run(seconds)
        await asyncio.to_thread(rec.force_flush, 60_000)
        await asyncio.sleep(3)  # the merges of the window's parts
        after = thread_cpu()
    finally:
        await app.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    per: dict[str, float] = {}
    for key, v in after.items():
        name = key.rsplit(":", 1)[0]
        group = name if name in ("main", "tagway-span-encode", "tagway-span-send") else "chdb and others"
        per[group] = per.get(group, 0.0) + v - before.get(key, 0.0)
    total = sum(per.values())
    print(f"RESULT {mode} {n} {total / n * 1e6:.1f} " + " ".join(f"{k.replace(' ', '_')}={v / n * 1e6:.1f}"
                                                                 for k, v in per.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=int, default=2500, help="calls a second")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a mode, in this process (what each round starts)
    args = ap.parse_args()
    if args.one:
        os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        _patch(args.one)
        asyncio.run(_drive(args.one, args.seconds, args.rate))
        return
    modes = args.modes.split(",")
    got: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for rnd in range(1, args.rounds + 1):
        for mode in modes:
            out = subprocess.run(["taskset", "-c", "0", sys.executable, os.path.abspath(__file__), "--one", mode,
                                  "--seconds", str(args.seconds), "--rate", str(args.rate)],
                                 capture_output=True, text=True,
                                 env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"mode {mode} failed:\n{out.stderr[-2000:]}")
            _, _, calls, total, *parts = line.split()
            row = {"total": float(total), **{k: float(v) for k, v in (p.split("=") for p in parts)}}
            got[mode].append(row)
            print(f"  round {rnd}: {mode:6} {float(total):6.1f} µs a call ({calls} calls) "
                  + "  ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "total"), flush=True)
    print(f"\nmedians over {args.rounds} round(s), µs of CPU a call (all threads; main = the event loop)")
    med = {m: {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]} for m, rows in got.items()}
    for m in modes:
        print(f"  {m:6} {med[m]['total']:6.1f}   " + "  ".join(f"{k} {v:.1f}" for k, v in med[m].items()
                                                              if k != "total"))
    if "off" in med:
        for m in modes:
            if m != "off":
                print(f"  {m} - off: {med[m]['total'] - med['off']['total']:+.1f} µs a call")


if __name__ == "__main__":
    main()
