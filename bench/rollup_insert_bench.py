"""What the rollup views (migrations 10 and 11) add to recording: call spans inserted into otel_traces as the exporter
inserts them (JSONEachRow batches, current timestamps), with the rollup views and without them, in one chDB store.

    python bench/rollup_insert_bench.py                  # 12 rounds of 2,000-span batches, views on/off alternating
    python bench/rollup_insert_bench.py --batch 5000 --rounds 20
    python bench/rollup_insert_bench.py --migrations 10  # migration 10's views only (11's dropped throughout)

Each round inserts one batch with the views in place and one with them dropped (then re-created), so load on the
machine hits both alike. Prints CPU (this process, all threads: chDB runs in-process) and wall time per span, and
the ratio. Spans: ~25 attributes like the gateway's call span, 50 customers, 10 intents, two tag keys rolled up,
~1 KB of captured messages. Run it as its own process: chDB allows one data directory per process.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson  # noqa: E402

from exporters import semconv as sc  # noqa: E402
from exporters.rollups import CUSTOMER_MIGRATION, ROLLUPS_MIGRATION  # noqa: E402
from exporters.schema import SchemaSettings, migrate, statements_for  # noqa: E402
from exporters.store import connect  # noqa: E402

INTENTS = ["chat", "search", "summarize", "refund", "billing", "classify", "extract", "translate", "code", "agent"]
MODELS = ["gpt-4o-mini", "gpt-4o", "claude-sonnet"]


def batch(n: int, rnd: random.Random) -> bytes:
    now = time.time_ns()
    rows = []
    for i in range(n):
        ns = now - rnd.randrange(2 * 10**9)  # a batch holds the last ~2 s of calls
        model = rnd.choice(MODELS)
        err = rnd.random() < 0.03
        attrs = {sc.KIND: "call", sc.CUSTOMER: f"cust-{int(rnd.random() ** 2.5 * 50):02d}",
                 sc.INTENT: INTENTS[int(rnd.random() ** 1.7 * 10)], sc.PROMPT_VERSION: f"v{1 + i % 3}",
                 sc.REQUESTED_MODEL: model, sc.REQUEST_MODEL: model, sc.RESPONSE_MODEL: model,
                 sc.PROVIDER: "anthropic" if model.startswith("claude") else "openai", sc.OPERATION: "chat",
                 sc.SOURCE: "production", sc.KEY_ID: "k1", sc.INPUT_TOKENS: str(rnd.randint(100, 2000)),
                 sc.OUTPUT_TOKENS: str(rnd.randint(20, 500)), sc.COST_USD: repr(rnd.random() / 100),
                 sc.REQUEST_STREAM: "true", sc.TIME_TO_FIRST_CHUNK: repr(0.05 + rnd.random() * 0.4),
                 sc.HTTP_STATUS: "502" if err else "200", sc.FINISH_REASONS: '["stop"]',
                 sc.TAG_PREFIX + "region": rnd.choice(["eu", "us", "apac"]),
                 sc.TAG_PREFIX + "tier": rnd.choice(["free", "pro", "enterprise"]),
                 sc.INPUT_MESSAGES: orjson.dumps([{"role": "user", "parts": [{"type": "text",
                                                                               "content": "x" * 600}]}]).decode(),
                 sc.OUTPUT_MESSAGES: orjson.dumps([{"role": "assistant", "parts": [{"type": "text",
                                                                                    "content": "y" * 400}]}]).decode()}
        if err:
            attrs[sc.ERROR_TYPE] = "upstream_5xx"
        rows.append(orjson.dumps({"Timestamp": f"{ns // 10**9}.{ns % 10**9:09d}", "TraceId": uuid.uuid4().hex,
                                  "SpanId": uuid.uuid4().hex[:16], "SpanName": f"chat {model}", "SpanKind": "Client",
                                  "ServiceName": "tagway", "Duration": rnd.randint(200, 4000) * 10**6,
                                  "StatusCode": "Error" if err else "Unset", "SpanAttributes": attrs}))
    return b"\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--migrations", default=f"{ROLLUPS_MIGRATION},{CUSTOMER_MIGRATION}",
                    help="whose views are dropped and re-created (comma-separated migration numbers)")
    args = ap.parse_args()
    path = tempfile.mkdtemp(prefix="tagway-rollup-insert-")
    store = connect(f"chdb://{path}")
    try:
        migrate(store, SchemaSettings(rollup_tag_keys=("region", "tier")))
        toggled = {int(m) for m in args.migrations.split(",")}
        views = [sql for v, sql in statements_for(SchemaSettings())
                 if v in toggled and "MATERIALIZED VIEW" in sql]
        names = [sql.split("`")[1] for sql in views]
        for v, sql in statements_for(SchemaSettings()):  # the views of the migrations not listed: off throughout
            if v >= ROLLUPS_MIGRATION and v not in toggled and "MATERIALIZED VIEW" in sql:
                store.command(f"DROP VIEW `{sql.split('`')[1]}`")
        rnd = random.Random(1)
        bodies = [batch(args.batch, rnd) for _ in range(2 * args.rounds + 2)]
        cost: dict[str, list[tuple[float, float]]] = {"views": [], "no views": []}
        for r in range(args.rounds + 1):
            for mode in ("views", "no views"):
                if mode == "no views":
                    for name in names:
                        store.command(f"DROP VIEW `{name}`")
                body = bodies.pop()
                c, w = time.process_time(), time.perf_counter()
                store.insert_json_rows("otel_traces", body)
                c, w = time.process_time() - c, time.perf_counter() - w
                if r:  # round 0 warms up
                    cost[mode].append((c, w))
                if mode == "no views":
                    for sql in views:
                        store.command(sql)
        n = store.query_rows("SELECT (SELECT sum(calls) FROM llm_calls_1m), (SELECT count() FROM llm_calls)")[0][0]
        print(f"{args.rounds} rounds of {args.batch:,} spans; rolled up {n[0]:,} of {n[1]:,} calls "
              "(the batches inserted with the views)")
        per = {m: (statistics.median(c for c, _ in v) / args.batch * 1e6,
                   statistics.median(w for _, w in v) / args.batch * 1e6) for m, v in cost.items()}
        for m, (c, w) in per.items():
            print(f"{m:9} CPU {c:7.1f} µs/span   wall {w:7.1f} µs/span")
        print(f"ratio     CPU {per['views'][0] / per['no views'][0]:7.2f}x        "
              f"wall {per['views'][1] / per['no views'][1]:7.2f}x")
    finally:
        store.close()
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
