"""Migration 15's backfill of resource_owners from the record, on the real engine: which creating calls it reads."""
from __future__ import annotations

import datetime as dt
import uuid

import orjson

from exporters import semconv as sc
from exporters.schema import SchemaSettings, _m15_backfill_owners


def _span(rid: str, api: str, params: str, customer: str) -> dict:
    attrs = {sc.KIND: "call", sc.CUSTOMER: customer, sc.API: api, sc.RESPONSE_ID: rid, sc.REQUEST_PARAMS: params}
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    return {"Timestamp": now, "TraceId": uuid.uuid4().hex, "SpanId": f"{uuid.uuid4().int % 2**63:016x}",
            "SpanName": f"{api} gpt-4o", "SpanKind": "Client", "ServiceName": "tagway", "ScopeName": "tagway.gateway",
            "SpanAttributes": {k: v for k, v in attrs.items() if v}, "Duration": 1, "StatusCode": "Ok"}


def test_the_backfill_takes_stored_calls_and_those_recorded_without_content(chdb_store):
    run = uuid.uuid4().hex[:8]
    cases = {  # id -> (api, captured parameters, backfilled?)
        f"chatcmpl-{run}-stored": ("chat.completions", '{"store":true}', True),
        f"chatcmpl-{run}-nocapture": ("chat.completions", "", True),  # a tenant with capture_content false
        f"chatcmpl-{run}-plain": ("chat.completions", '{"temperature":0.2}', False),  # never kept by the provider
        f"resp_{run}-default": ("responses", '{"temperature":0.2}', True),
        f"resp_{run}-nostore": ("responses", '{"store":false}', False),
        f"file-{run}": ("files.create", "", True),
    }
    chdb_store.insert_json_rows("otel_traces", b"\n".join(orjson.dumps(_span(rid, api, params, f"owners-{run}"))
                                                         for rid, (api, params, _) in cases.items()),
                                settings={"date_time_input_format": "best_effort"})
    for stmt in _m15_backfill_owners(SchemaSettings()):
        chdb_store.command(stmt)
    got = {r["rid"] for r in chdb_store.query(f"SELECT rid FROM resource_owners WHERE customer = 'owners-{run}'")}
    assert got == {rid for rid, (_, _, kept) in cases.items() if kept}
