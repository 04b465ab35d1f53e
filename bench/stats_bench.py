"""Benchmark of the stats queries (exporters/queries.py) over synthetic `llm_calls` rows in embedded chDB.

    python bench/stats_bench.py                 # 10M rows in a fresh temp dir, 5 runs per query
    python bench/stats_bench.py --rows 1000000 --repeat 3 --dir /tmp/tw-bench --keep

Rows are generated server-side (INSERT ... SELECT FROM numbers(N)) with current timestamps spread over the last 7
days (TTLs drop old rows), ~50 customers and ~10 intents with a skewed (Zipf-like) mix, a 3% base error rate and
one hidden bad segment (customer cust-07 on intent refund fails 30%). Run it as its own process: chDB allows one
data directory per process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from exporters import queries as q  # noqa: E402
from exporters.schema import SchemaSettings, migrate  # noqa: E402
from exporters.store import connect  # noqa: E402

INTENTS = ["chat", "search", "summarize", "refund", "billing", "classify", "extract", "translate", "code", "agent"]

# One row per call; `r1`..`r4` are independent pseudo-random numbers in [0, 1) derived from the row number.
GENERATE = """
INSERT INTO llm_calls (Timestamp, trace_id, span_id, service_name, customer, intent, prompt_version, tags,
    operation, model_requested, model_served, provider, deployment, stream, status, error_type, http_status,
    attempts, latency_ms, ttft_ms, input_tokens, output_tokens, cost_usd, source, key_id)
SELECT
    now64(9) - toIntervalMillisecond(toUInt64(r1 * 7 * 86400 * 1000)) AS Timestamp,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="chDB data dir (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (and reuse its rows next time)")
    args = ap.parse_args()

    path = args.dir or tempfile.mkdtemp(prefix="tagway-stats-bench-")
    store = connect(f"chdb://{path}")
    try:
        migrate(store, SchemaSettings())
        have = int(store.query_rows("SELECT count() FROM llm_calls")[0][0][0])
        if have < args.rows:
            t = time.perf_counter()
            chunk = 2_000_000
            for start in range(have, args.rows, chunk):
                store.command(GENERATE, parameters={"intents": INTENTS, "start": start,
                                                    "count": min(chunk, args.rows - start)})
            store.command("OPTIMIZE TABLE llm_calls FINAL")
            print(f"generated {args.rows - have:,} rows in {time.perf_counter() - t:.1f} s")
        n, parts = store.query_rows("SELECT (SELECT count() FROM llm_calls), (SELECT count() FROM system.parts "
                                    "WHERE table = 'llm_calls' AND active)")[0][0]
        print(f"llm_calls: {n:,} rows in {parts} parts ({path})")

        sel7d = q.make_selection(since="7d")
        sel24h = q.make_selection(since="24h")
        cases = [
            ("per-tenant failure rate, 7d", lambda: q.segment_stats(store, sel7d, ["customer"])),
            ("per-tenant, 7d, --compare", lambda: q.segment_stats(store, sel7d, ["customer"], compare=True)),
            ("by customer+intent, 7d", lambda: q.segment_stats(store, sel7d, ["customer", "intent"])),
            ("by tag.region, 7d", lambda: q.segment_stats(store, sel7d, ["tag.region"])),
            ("by customer, where tag.tier=pro, 7d",
             lambda: q.segment_stats(store, q.make_selection(where=["tag.tier=pro"], since="7d"), ["customer"])),
            ("per-tenant, 24h", lambda: q.segment_stats(store, sel24h, ["customer"])),
            ("one tenant by intent, 7d",
             lambda: q.segment_stats(store, q.make_selection(where=["customer=cust-07"], since="7d"), ["intent"])),
            ("top errors, 7d", lambda: q.top_errors(store, sel7d)),
            ("error-rate time series per tenant, 7d", lambda: q.error_timeseries(store, sel7d)),
        ]
        print(f"\n{'query':42} {'min s':>8} {'median s':>9}  (runs: {args.repeat})")
        for name, fn in cases:
            fn()  # warm-up
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            print(f"{name:42} {min(times):8.3f} {statistics.median(times):9.3f}")

        worst = q.segment_stats(store, sel7d, ["customer", "intent"], min_calls=100).segments[0]
        print(f"\nworst segment: {worst.key} {worst.errors}/{worst.calls} = {worst.error_rate:.1%}")
    finally:
        store.close()
        if not args.keep and not args.dir:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
