"""Server time of the case board's pages at scale: the calls list's first page (and a deep page, through the keyset
cursor), and a call page, over N synthetic calls with captured content in embedded chDB, timed through the real
HTTP routes (FastAPI in-process, JSON encoding included) as the pages call them.

    python bench/ui_bench.py                       # 1M calls in a fresh temp dir, 5 rounds per case
    python bench/ui_bench.py --rows 1000000 --dir /tmp/tw-ui-bench --keep --rounds 7

Goal (issue 14): the calls list's first page and a call page each <= 300 ms server time at 1M calls. Rows are
generated server-side (INSERT ... SELECT FROM numbers(N)) with current timestamps over the last 7 days, ~50
customers, 10 intents, prompts of 40-800 characters and answers of 40-600 (~1 KB of JSON per call); one call of
the window gets two replay results so its page shows a case. Run it as its own process (chDB: one data directory
per process).
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
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from exporters.schema import SchemaSettings, migrate  # noqa: E402
from exporters.store import connect  # noqa: E402
from gateway.auth import KeyRing, hash_key  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.stats_api import build_stats_router  # noqa: E402

ADMIN = "tw-ui-bench-admin"
TENANT = "tw-ui-bench-cust-07"

GENERATE = """
INSERT INTO llm_calls (Timestamp, trace_id, span_id, service_name, customer, intent, prompt_version, tags,
    operation, model_requested, model_served, provider, deployment, stream, status, error_type, http_status,
    attempts, latency_ms, ttft_ms, input_tokens, output_tokens, cost_usd, source, key_id, request_json,
    system_instructions, response_json)
SELECT
    now64(9) - toIntervalMillisecond(toUInt64(r1 * 7 * 86400 * 1000)) AS Timestamp,
    lower(hex(cityHash64(number, 'trace'))) || lower(hex(cityHash64(number, 't2'))) AS trace_id,
    lower(hex(cityHash64(number, 'span'))), 'tagway',
    'cust-' || leftPad(toString(toUInt32(pow(r2, 2.5) * 50)), 2, '0') AS customer,
    arrayElement(['chat', 'search', 'summarize', 'refund', 'billing', 'classify', 'extract', 'translate', 'code',
                  'agent'], 1 + toUInt32(pow(r3, 1.7) * 10)) AS intent,
    'v' || toString(1 + number % 3),
    map('region', arrayElement(['eu', 'us', 'apac'], 1 + number % 3),
        'tier', arrayElement(['free', 'pro', 'enterprise'], 1 + intDiv(number, 7) % 3)),
    'chat', arrayElement(['gpt-4o-mini', 'gpt-4o', 'claude-sonnet'], 1 + number % 3) AS m, m,
    if(m = 'claude-sonnet', 'anthropic', 'openai'), m, number % 2 = 0 AS stream,
    multiIf(r4 < 0.03, 'error', r4 > 0.995, 'cancelled', 'ok') AS status,
    multiIf(status = 'error', 'upstream_5xx', status = 'cancelled', 'client_disconnected', ''),
    multiIf(status = 'error', 502, status = 'cancelled', 499, 200), 1,
    200 + r1 * r2 * 4000, if(stream, 50 + r3 * 400, NULL), toUInt32(100 + r2 * 2000), toUInt32(20 + r3 * 500),
    0.0004 + r3 / 1000, 'production', customer || '-key',
    '[{"role":"user","parts":[{"type":"text","content":"' ||
        repeat('Where is my refund for order ' || toString(number) || '? ', 1 + number % 20) || '"}]}]',
    '[{"type":"text","content":"You are the support assistant of ' || customer || '. Follow the refund policy."}]',
    '[{"role":"assistant","parts":[{"type":"text","content":"' ||
        repeat('Your refund ' || hex(cityHash64(number)) || ' is on its way. ', 1 + number % 15) ||
        '"}],"finish_reason":"stop"}]'
FROM (SELECT number, (cityHash64(number, 1) % 1000000) / 1e6 AS r1, (cityHash64(number, 2) % 1000000) / 1e6 AS r2,
             (cityHash64(number, 3) % 1000000) / 1e6 AS r3, (cityHash64(number, 4) % 1000000) / 1e6 AS r4
      FROM numbers({start:UInt64}, {count:UInt64}))
"""


# One attempt span per call in otel_traces (kind "attempt", so the llm_calls view ignores them): the call page reads
# a call's spans by trace id, and that lookup must stay fast with a big otel_traces beside llm_calls.
GENERATE_SPANS = """
INSERT INTO otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, SpanAttributes,
    Duration, StatusCode)
SELECT Timestamp, trace_id, lower(hex(cityHash64(trace_id, 'attempt'))), span_id, 'chat ' || model_requested, 'Client',
    'tagway', map('tagway.kind', 'attempt', 'tagway.attempt', '1', 'tagway.deployment', deployment,
                  'gen_ai.provider.name', provider, 'gen_ai.request.model', model_requested,
                  'http.response.status_code', toString(http_status)),
    toUInt64(latency_ms * 1e6), if(status = 'error', 'Error', 'Ok')
FROM llm_calls WHERE cityHash64(trace_id) % {parts:UInt64} = {part:UInt64}
"""


def _results_for(store, trace_id: str) -> None:
    rows = []
    for cand, status, output in (("baseline", "passed", "Your refund is on its way."),
                                 ("cand", "failed", "I cannot help with refunds.")):
        rows.append(f'{{"run_id":"bench-run","case_id":"{trace_id}","candidate":"{cand}","Timestamp":{time.time()},'
                    f'"segment":"refund","status":"{status}","output":"{output}","evaluations":"[]",'
                    f'"customer":"cust-07","intent":"refund"}}')
    store.insert_json_rows("replay_results", "\n".join(rows).encode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="chDB data dir (default: a fresh temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the data dir (and reuse its rows next time)")
    args = ap.parse_args()

    path = args.dir or tempfile.mkdtemp(prefix="tagway-ui-bench-")
    store = connect(f"chdb://{path}")
    try:
        migrate(store, SchemaSettings())
        have = int(store.query_rows("SELECT count() FROM llm_calls")[0][0][0])
        if have < args.rows:
            t = time.perf_counter()
            for start in range(have, args.rows, 500_000):
                store.command(GENERATE, parameters={"start": start, "count": min(500_000, args.rows - start)})
            store.command("OPTIMIZE TABLE llm_calls FINAL")
            print(f"generated {args.rows - have:,} rows in {time.perf_counter() - t:.1f} s")
        if int(store.query_rows("SELECT count() FROM otel_traces")[0][0][0]) == 0:
            for part in range(4):
                store.command(GENERATE_SPANS, parameters={"parts": 4, "part": part})
            store.command("OPTIMIZE TABLE otel_traces FINAL")
        n, size = store.query_rows("SELECT count(), formatReadableSize(sum(data_compressed_bytes)) FROM system.parts "
                                   "WHERE table = 'llm_calls' AND active")[0][0]
        spans = int(store.query_rows("SELECT count() FROM otel_traces")[0][0][0])
        print(f"llm_calls: {int(store.query_rows('SELECT count() FROM llm_calls')[0][0][0]):,} rows, {size} on disk "
              f"({path}); otel_traces: {spans:,} spans")

        cfg = GatewayConfig(admin_key_hash=hash_key(ADMIN), tenants=[
            {"customer": "cust-07", "keys": [{"id": "c7", "hash": hash_key(TENANT)}]}])
        app = FastAPI()
        app.include_router(build_stats_router(KeyRing(cfg), lambda: store))
        client = TestClient(app)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        tenant = {"Authorization": f"Bearer {TENANT}"}
        first = client.get("/admin/calls", params={"since": "24h"}, headers=admin).json()
        trace = next(c["trace_id"] for c in first["calls"][5:] if c["customer"] == first["calls"][5]["customer"])
        if not store.query("SELECT 1 FROM replay_results WHERE case_id = {t:String} LIMIT 1", {"t": trace}):
            _results_for(store, trace)
        cursor = None
        for _ in range(20):  # the cursor of page 21, to time a deep page
            cursor = client.get("/admin/calls", params={"since": "24h", **({"cursor": cursor} if cursor else {})},
                                headers=admin).json()["next"]

        cases = [
            ("calls list, first page, 24h (goal <= 300 ms)", "/admin/calls", {"since": "24h"}, admin),
            ("calls list, first page, 7d", "/admin/calls", {"since": "7d"}, admin),
            ("calls list, page 21 via the cursor, 24h", "/admin/calls", {"since": "24h", "cursor": cursor}, admin),
            ("calls list, customer+intent+status filters, 7d", "/admin/calls",
             {"since": "7d", "where": ["customer=cust-07", "intent=refund"], "status": "ok"}, admin),
            ("calls list, tenant key, 24h", "/v1/tagway/calls", {"since": "24h"}, tenant),
            ("call page (/admin/cases/ID, goal <= 300 ms)", f"/admin/cases/{trace}", {"max_chars": 20000}, admin),
            ("call detail (/admin/calls/ID)", f"/admin/calls/{trace}", {}, admin),
            ("charts per customer, top 5, 24h", "/admin/charts", {"since": "24h"}, admin),
            ("free-text search, 24h (no index: scans content)", "/admin/calls", {"since": "24h", "q": "order 4242?"}, admin),
        ]
        print(f"\n{'request':52} {'min ms':>8} {'median ms':>10}  (rounds: {args.rounds})")
        for name, url, params, headers in cases:
            res = client.get(url, params=params, headers=headers)
            assert res.status_code == 200, (url, res.text[:300])
            times = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                res = client.get(url, params=params, headers=headers)
                times.append((time.perf_counter() - t) * 1000)
                assert res.status_code == 200
            print(f"{name:52} {min(times):8.1f} {statistics.median(times):10.1f}")
    finally:
        store.close()
        if not args.keep and not args.dir:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
