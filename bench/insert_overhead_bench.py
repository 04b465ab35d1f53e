"""What one insert into the embedded store costs, fixed and per span, and how much of the fixed part is the views.

    python bench/insert_overhead_bench.py [--rounds 25] [--batch 2000]

Four copies of the schema in one chDB store: `bare` (otel_traces alone), `calls` (+ the trace-id, llm_calls and
tag-state views), `main` (+ the main rollup family) and `all` (every view, as the gateway runs). Merges are stopped,
so the figures are the insert itself. Each copy gets 1-span and `--batch`-span inserts, alternating, and the process's
CPU (all threads) per insert is reported as a median: the 1-span insert is the fixed cost, the difference the cost
per span. Then each view's query is planned alone (EXPLAIN PLAN), which ClickHouse does again on every insert.
This is why the gateway inserts in big, few batches (recording.batch_max_seconds, 5 s).
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rollup_insert_bench import batch  # noqa: E402

from exporters.schema import SchemaSettings, migrate  # noqa: E402
from exporters.store import connect  # noqa: E402

CALLS = ["otel_traces_trace_id_ts_mv", "llm_calls_mv", "tag_state_mv"]
SETS = {"bare": [], "calls": CALLS, "main": CALLS + ["llm_calls_1m_mv", "llm_calls_1h_mv", "llm_calls_1d_mv"],
        "all": None}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def views(store, db: str) -> list[tuple[str, str]]:
    rows, _ = store.query_rows(f"SELECT name, as_select FROM system.tables WHERE database = '{db}' "
                               "AND engine = 'MaterializedView' ORDER BY name")
    return [(r[0], r[1]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--batch", type=int, default=2000)
    args = ap.parse_args()
    store = connect("chdb://" + tempfile.mkdtemp(prefix="insert-bench-"))
    for db, keep in SETS.items():
        migrate(store, SchemaSettings(database=db))
        if keep is not None:
            for name, _ in views(store, db):
                if name not in keep:
                    store.command(f"DROP VIEW `{db}`.`{name}`")
    store.command("SYSTEM STOP MERGES")
    rnd = random.Random(1)
    res: dict[tuple[int, str], list[float]] = {}
    for n in (1, args.batch):
        bodies = [batch(n, rnd) for _ in range(8)]
        for i in range(args.rounds):
            for db in SETS:
                c0 = cpu()
                store.insert_json_rows(f"`{db}`.otel_traces", bodies[i % 8],
                                       settings={"insert_deduplication_token": os.urandom(8).hex()})
                res.setdefault((n, db), []).append((cpu() - c0) * 1e3)
    print(f"{'views':>6} | {'1-span insert ms':>16} | {args.batch}-span insert ms | per span µs (marginal)")
    for db in SETS:
        one = statistics.median(res[(1, db)][2:])
        big = statistics.median(res[(args.batch, db)][2:])
        print(f"{db:>6} | {one:16.1f} | {big:17.1f} | {big / args.batch * 1e3:6.1f} ({(big - one) / args.batch * 1e3:.1f})")
    print("\nplanning each view's query (EXPLAIN PLAN, median ms), as every insert does:")
    total = 0.0
    for name, sql in views(store, "all"):
        xs = []
        for _ in range(12):
            c0 = cpu()
            store.query_rows(f"EXPLAIN PLAN {sql}")
            xs.append((cpu() - c0) * 1e3)
        total += statistics.median(xs[2:])
        print(f"  {name:28} {statistics.median(xs[2:]):6.2f}")
    print(f"  {'all views':28} {total:6.2f}")


if __name__ == "__main__":
    main()
