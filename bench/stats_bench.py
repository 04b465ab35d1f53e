"""Benchmark of the stats queries (exporters/queries.py) over synthetic `llm_calls` rows in embedded chDB.

    python bench/stats_bench.py                 # 10M rows in a fresh temp dir, 5 runs per query
    python bench/stats_bench.py --rows 1000000 --repeat 3 --dir /tmp/tw-bench --keep
    python bench/stats_bench.py --rows 10000000,30000000   # each size in a fresh store (a process each), growth

Rows are generated server-side (INSERT ... SELECT FROM numbers(N)) with current timestamps spread over the last 7
days in time order (TTLs drop old rows), ~50 customers and ~10 intents with a skewed (Zipf-like) mix, a 3% base
error rate and one hidden bad segment (customer cust-07 on intent refund fails 30%). The rows go in before the
rollups exist (the migrations before the rollups one), then that migration and `backfill` roll them up (tag keys
region and tier), as `tagway db backfill-rollups` does for an existing store; `--fill views` instead inserts
through the rollup views.
Each query runs on the rollups (where the question allows) and on llm_calls alone (`raw`); the `read` column says
what answered. Storage per 1M calls is printed for llm_calls and the rollups. Run it as its own process: chDB
allows one data directory per process.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporters import queries as q  # noqa: E402
from exporters import rollups  # noqa: E402
from exporters.schema import SchemaSettings, migrate  # noqa: E402
from exporters.store import connect  # noqa: E402

INTENTS = ["chat", "search", "summarize", "refund", "billing", "classify", "extract", "translate", "code", "agent"]

# One row per call; `r1`..`r4` are independent pseudo-random numbers in [0, 1) derived from the row number.
GENERATE = """
INSERT INTO llm_calls (Timestamp, trace_id, span_id, service_name, customer, intent, prompt_version, tags,
    operation, model_requested, model_served, provider, deployment, stream, status, error_type, http_status,
    attempts, latency_ms, ttft_ms, input_tokens, output_tokens, cost_usd, source, key_id)
SELECT
    now64(9) - toIntervalMillisecond(toUInt64((1 - (number + r1) / {total:UInt64}) * 7 * 86400 * 1000)) AS Timestamp,
    lower(hex(cityHash64(number, 'trace'))) || lower(hex(cityHash64(number, 't2'))) AS trace_id,
    lower(hex(cityHash64(number, 'span'))) AS span_id,
    'tagway' AS service_name,
    'cust-' || leftPad(toString(toUInt32(pow(r2, 2.5) * 50)), 2, '0') AS customer,
    arrayElement({intents:Array(String)}, 1 + toUInt32(pow(r3, 1.7) * 10)) AS intent,
    'v' || toString(1 + number % 3) AS prompt_version,
    map('region', arrayElement(['eu', 'us', 'apac'], 1 + number % 3),
        'tier', arrayElement(['free', 'pro', 'enterprise'], 1 + intDiv(number, 7) % 3)) AS tags,
    'chat' AS operation,
    arrayElement(['gpt-4o-mini', 'gpt-4o', 'claude-sonnet'], 1 + number % 3) AS model_requested,
    model_requested AS model_served,
    if(model_requested = 'claude-sonnet', 'anthropic', 'openai') AS provider,
    model_requested AS deployment,
    number % 2 = 0 AS stream,
    multiIf(r4 < if(customer = 'cust-07' AND intent = 'refund', 0.30, 0.03), 'error',
            r4 > 0.995, 'cancelled', 'ok') AS status,
    multiIf(status = 'error', arrayElement(['upstream_5xx', 'timeout', 'rate_limited'], 1 + number % 3),
            status = 'cancelled', 'client_disconnected', '') AS error_type,
    multiIf(status = 'error', arrayElement([502, 504, 429], 1 + number % 3), status = 'cancelled', 499, 200)
        AS http_status,
    1 AS attempts,
    200 + r1 * r2 * 4000 AS latency_ms,
    if(stream, 50 + r3 * 400, NULL) AS ttft_ms,
    toUInt32(100 + r2 * 2000) AS input_tokens,
    toUInt32(20 + r3 * 500) AS output_tokens,
    input_tokens * 1.5e-7 + output_tokens * 6e-7 AS cost_usd,
    'production' AS source,
    customer || '-key' AS key_id
FROM (
    SELECT number,
           (cityHash64(number, 1) % 1000000) / 1e6 AS r1,
           (cityHash64(number, 2) % 1000000) / 1e6 AS r2,
           (cityHash64(number, 3) % 1000000) / 1e6 AS r3,
           (cityHash64(number, 4) % 1000000) / 1e6 AS r4
    FROM numbers({start:UInt64}, {count:UInt64})
)
"""


TAG_KEYS = ("region", "tier")
ROLLUP_TABLES = [f.table(s) for f in rollups.FAMILIES for s, _ in f.levels]


def generate(store, have: int, rows: int, fill: str) -> None:
    """Rows [have, rows) into llm_calls; `fill` backfill: before the rollups migration, then the backfill rolls them up."""
    t = time.perf_counter()
    chunk = 2_000_000
    for start in range(have, rows, chunk):
        store.command(GENERATE, parameters={"intents": INTENTS, "start": start, "count": min(chunk, rows - start),
                                            "total": rows})
    print(f"generated {rows - have:,} rows in {time.perf_counter() - t:.1f} s"
          f"{' (through the rollup views)' if fill == 'views' else ''}")
    if fill == "backfill":
        migrate(store, SchemaSettings(rollup_tag_keys=TAG_KEYS))
        time.sleep(max(0.0, (rollups.read_state(store).live_from - dt.datetime.now(dt.timezone.utc))
                       .total_seconds() + 0.5))
        t = time.perf_counter()
        rollups.backfill(store, SchemaSettings(), settle_seconds=0)
        print(f"backfilled the rollups in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    store.command("OPTIMIZE TABLE llm_calls FINAL")
    for table in ROLLUP_TABLES:
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    print(f"merged in {time.perf_counter() - t:.1f} s")


def storage(store, rows: int) -> list[tuple[str, int, float]]:
    """(table, rows, MB on disk per 1M calls)."""
    out = []
    for table in ["llm_calls"] + ROLLUP_TABLES:
        n, size = store.query_rows("SELECT sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND "
                                   "database = currentDatabase() AND table = {t:String}", parameters={"t": table})[0][0]
        out.append((table, int(n or 0), int(size or 0) / 2**20 / rows * 1e6))
    return out


def run(rows: int, repeat: int, path: str, fill: str) -> dict:
    store = connect(f"chdb://{path}")
    results: dict = {"rows": rows, "queries": {}}
    try:
        before = rollups.ROLLUPS_MIGRATION - 1
        migrate(store, SchemaSettings(rollup_tag_keys=TAG_KEYS), upto=None if fill == "views" else before)
        have = int(store.query_rows("SELECT count() FROM llm_calls")[0][0][0])
        if have < rows:
            generate(store, have, rows, fill)
        n, parts = store.query_rows("SELECT (SELECT count() FROM llm_calls), (SELECT count() FROM system.parts "
                                    "WHERE table = 'llm_calls' AND active)")[0][0]
        print(f"llm_calls: {n:,} rows in {parts} parts ({path})")

        sel7d = q.make_selection(since="7d")
        sel24h = q.make_selection(since="24h")
        cases = [
            ("per-tenant failure rate, 7d", lambda **kw: q.segment_stats(store, sel7d, ["customer"], **kw)),
            ("per-tenant, 7d, --compare", lambda **kw: q.segment_stats(store, sel7d, ["customer"], compare=True, **kw)),
            ("by customer+intent, 7d", lambda **kw: q.segment_stats(store, sel7d, ["customer", "intent"], **kw)),
            ("by tag.region, 7d", lambda **kw: q.segment_stats(store, sel7d, ["tag.region"], **kw)),
            ("by customer, where tag.tier=pro, 7d",
             lambda **kw: q.segment_stats(store, q.make_selection(where=["tag.tier=pro"], since="7d"), ["customer"],
                                          **kw)),
            ("per-tenant, 24h", lambda **kw: q.segment_stats(store, sel24h, ["customer"], **kw)),
            ("one tenant by intent, 7d",
             lambda **kw: q.segment_stats(store, q.make_selection(where=["customer=cust-07"], since="7d"), ["intent"],
                                          **kw)),
            ("top errors, 7d", lambda **kw: q.top_errors(store, sel7d)),
            ("error-rate time series per tenant, 7d", lambda **kw: q.error_timeseries(store, sel7d, **kw)),
        ]
        print(f"\n{'query':42} {'read':>7} {'min s':>8} {'median s':>9} {'raw min s':>10}  (runs: {repeat})")
        for name, fn in cases:
            timed = {}
            for mode in ("rollups", "raw"):
                kw = {} if mode == "rollups" or name.startswith("top errors") else {"rollups": False}
                report = fn(**kw)  # warm-up
                times = []
                for _ in range(repeat if mode == "rollups" else max(1, repeat // 2)):
                    t = time.perf_counter()
                    fn(**kw)
                    times.append(time.perf_counter() - t)
                timed[mode] = (min(times), statistics.median(times), (getattr(report, "read", None) or
                                                                      {"source": "raw"})["source"])
            results["queries"][name] = {"min": timed["rollups"][0], "median": timed["rollups"][1],
                                        "read": timed["rollups"][2], "raw_min": timed["raw"][0]}
            print(f"{name:42} {timed['rollups'][2]:>7} {timed['rollups'][0]:8.3f} {timed['rollups'][1]:9.3f} "
                  f"{timed['raw'][0]:10.3f}")

        fast = q.segment_stats(store, sel7d, ["customer", "intent"], min_calls=100)
        raw = q.segment_stats(store, sel7d, ["customer", "intent"], min_calls=100, rollups=False)
        same = [(s.key, s.calls, s.errors) for s in fast.segments] == [(s.key, s.calls, s.errors) for s in raw.segments]
        worst = fast.segments[0]
        print(f"\nworst segment: {worst.key} {worst.errors}/{worst.calls} = {worst.error_rate:.1%}; "
              f"rollup counts equal raw counts: {same}")
        print(f"\n{'storage':22} {'rows':>14} {'MB per 1M calls':>16}")
        results["storage"] = {}
        for table, nrows, mb in storage(store, rows):
            results["storage"][table] = mb
            print(f"{table:22} {nrows:14,} {mb:16.2f}")
    finally:
        store.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="10000000", help="rows, or several sizes comma-separated (a store each)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="chDB data dir (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (and reuse its rows next time)")
    ap.add_argument("--fill", choices=("backfill", "views"), default="backfill",
                    help="roll the rows up by the backfill (default) or insert them through the views")
    ap.add_argument("--json", default="", help="also write the results to this file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.rows.split(",") if s.strip()]
    if len(sizes) > 1:  # one process per size: chDB opens one data directory per process
        found = []
        for n in sizes:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                subprocess.run([sys.executable, __file__, "--rows", str(n), "--repeat", str(args.repeat),
                                "--fill", args.fill, "--json", f.name], check=True)
                found.append(json.load(open(f.name)))
        print(f"\n{'query':42} " + " ".join(f"{r['rows'] / 1e6:>8.0f}M" for r in found) + "   growth")
        for name in found[0]["queries"]:
            ts = [r["queries"][name]["min"] for r in found]
            print(f"{name:42} " + " ".join(f"{x:9.3f}" for x in ts) + f"   {ts[-1] / ts[0]:5.1f}x")
        return
    path = args.dir or tempfile.mkdtemp(prefix="tagway-stats-bench-")
    try:
        results = run(sizes[0], args.repeat, path, args.fill)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
