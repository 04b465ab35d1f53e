"""Seed data for the stats tests (queries, CLI, API, page, Grafana) in the shared chDB store: rows written straight
into llm_calls with current timestamps, plus a few spans into otel_traces that reach llm_calls through the
materialized view. Every row carries the tag run=<id>, so a test sees only its own rows in the shared store.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import orjson

from exporters.store import Store

__all__ = ["NOW", "Seeded", "seed_calls", "call_row", "insert_calls", "Replayed", "seed_replayed"]

NOW = dt.datetime.now(dt.timezone.utc)  # import time; the seeds below take the time they run at (a long suite must
# not age rows seeded minutes after import out of the "last hour" the tests ask about)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ts(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass
class Seeded:
    run: str  # tag.run value on every row
    acme: str
    globex: str
    initech: str
    spans: str  # customer whose rows came through otel_traces and the MV
    error_trace: str  # trace id of one acme refund error
    span_trace_ok: str
    span_trace_err: str

    @property
    def where(self) -> str:
        return f"tag.run={self.run}"


def seed_calls(store: Store) -> Seeded:
    """The current window (last 50 minutes):

        acme/refund     100 calls, 30 errors (20 upstream_5xx/502, 10 timeout/504) -- 30%: the hidden segment;
                        region eu for the first 50 calls (all 30 errors), us for the rest
        acme/chat       400 calls, 0 errors
        globex/refund   200 calls, 0 errors, latency 100 ms each, no streaming
        globex/chat     290 calls, 0 errors, 5 of them cancelled by the client
        initech/chat     10 calls, 3 errors (rate_limited/429) -- under min_calls 20: low confidence
        total          1000 calls, 33 errors = 3.3%

    The previous 24 h window (36 h ago): acme/refund 100 calls with 5 errors, globex/chat 100 calls, 0 errors.
    Plus 4 spans in otel_traces for customer <run>-spans (1 error), which reach llm_calls through the MV.
    """
    run = "r" + uuid.uuid4().hex[:10]
    s = Seeded(run=run, acme=f"{run}-acme", globex=f"{run}-globex", initech=f"{run}-initech", spans=f"{run}-spans",
               error_trace=f"{run}err0000", span_trace_ok=uuid.uuid4().hex, span_trace_err=uuid.uuid4().hex)
    rows: list[dict] = []
    n = 0
    now = _now()

    def add(customer: str, intent: str, *, count: int, errors: list[tuple[str, int]] = (), cancelled: int = 0,
            when: dt.datetime | None = None, latency: float | None = None, stream: bool = True,
            region=lambda i: "us", trace_ids: dict[int, str] | None = None) -> None:
        when = when or now
        nonlocal n
        kinds: list[tuple[str, str, int]] = []
        for etype, status_code in errors:
            kinds.append(("error", etype, status_code))
        kinds += [("cancelled", "client_disconnected", 499)] * cancelled
        kinds += [("ok", "", 200)] * (count - len(kinds))
        for i, (status, etype, http) in enumerate(kinds):
            n += 1
            rows.append({
                "Timestamp": _ts(when - dt.timedelta(minutes=i % 50, seconds=n % 60)),
                "trace_id": (trace_ids or {}).get(i, f"{run}t{n:06d}"),
                "span_id": f"{n:016x}",
                "service_name": "tagway",
                "customer": customer, "intent": intent, "prompt_version": "v2" if i % 2 else "v1",
                "tags": {"run": run, "region": region(i)},
                "operation": "chat", "model_requested": "gpt-4o-mini", "model_served": "gpt-4o-mini-2024-07-18",
                "provider": "openai", "deployment": "openai-main", "stream": stream,
                "status": status, "error_type": etype, "http_status": http, "attempts": 1,
                "latency_ms": latency if latency is not None else 50.0 + (i % 10) * 10,
                "ttft_ms": 40.0 if stream else None,
                "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.001,
                "source": "production", "key_id": f"{customer}-key",
                "request_json": orjson.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]).decode(),
                "response_json": "" if status != "ok" else orjson.dumps(
                    [{"role": "assistant", "parts": [{"type": "text", "content": "hello"}]}]).decode(),
            })

    add(s.acme, "refund", count=100, errors=[("upstream_5xx", 502)] * 20 + [("timeout", 504)] * 10,
        region=lambda i: "eu" if i < 50 else "us", trace_ids={0: s.error_trace})
    add(s.acme, "chat", count=400)
    add(s.globex, "refund", count=200, latency=100.0, stream=False)
    add(s.globex, "chat", count=290, cancelled=5)
    add(s.initech, "chat", count=10, errors=[("rate_limited", 429)] * 3)
    before = now - dt.timedelta(hours=36)
    add(s.acme, "refund", count=100, errors=[("upstream_5xx", 502)] * 5, when=before)
    add(s.globex, "chat", count=100, when=before)
    store.insert_json_rows("llm_calls", b"\n".join(orjson.dumps(r) for r in rows),
                           settings={"date_time_input_format": "best_effort"})

    spans = []
    for i, (trace, err) in enumerate([(s.span_trace_ok, False), (uuid.uuid4().hex, False), (uuid.uuid4().hex, False),
                                      (s.span_trace_err, True)]):
        attrs = {"tagway.kind": "call", "tagway.customer": s.spans, "tagway.intent": "refund",
                 "tagway.prompt_version": "v3", "tagway.tag.run": run, "tagway.tag.region": "eu",
                 "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                 "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
                 "tagway.model.requested": "gpt-4o", "gen_ai.request.stream": "true",
                 "gen_ai.response.time_to_first_chunk": "0.25", "gen_ai.usage.input_tokens": "12",
                 "gen_ai.usage.output_tokens": "7", "tagway.cost_usd": "0.0005", "tagway.source": "production",
                 "tagway.key_id": "spans-key", "http.response.status_code": "200",
                 "gen_ai.input.messages": '[{"role":"user","parts":[{"type":"text","content":"refund please"}]}]'}
        if err:
            attrs.update({"error.type": "upstream_5xx", "http.response.status_code": "502"})
        else:
            attrs["gen_ai.output.messages"] = '[{"role":"assistant","parts":[{"type":"text","content":"done"}]}]'
        spans.append({"Timestamp": _ts(now - dt.timedelta(minutes=5 + i)), "TraceId": trace,
                      "SpanId": f"{i + 1:016x}", "SpanName": "chat gpt-4o", "SpanKind": "Client",
                      "ServiceName": "tagway", "ScopeName": "tagway.gateway", "SpanAttributes": attrs,
                      "Duration": 120_000_000 + i * 10_000_000, "StatusCode": "Error" if err else "Ok",
                      "StatusMessage": "upstream 502" if err else ""})
    store.insert_json_rows("otel_traces", b"\n".join(orjson.dumps(r) for r in spans),
                           settings={"date_time_input_format": "best_effort"})
    return s


def call_row(run: str, customer: str, i: int, *, status: str = "ok", source: str = "production",
             when: dt.datetime | None = None, **columns) -> dict:
    """One llm_calls row (tag run=<run>) with defaults for what the stats read; `columns` override them."""
    row = {"Timestamp": _ts((when or _now()) - dt.timedelta(minutes=i % 50, seconds=i % 60)),
           "trace_id": f"{run}x{uuid.uuid4().hex[:12]}", "span_id": f"{i:016x}", "service_name": "tagway",
           "customer": customer, "intent": "refund", "prompt_version": "v1", "tags": {"run": run},
           "operation": "chat", "model_requested": "gpt-4o-mini", "model_served": "gpt-4o-mini", "provider": "openai",
           "stream": False, "status": status, "error_type": "upstream_5xx" if status == "error" else "",
           "http_status": 502 if status == "error" else 200, "attempts": 1, "latency_ms": 80.0,
           "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.001, "source": source,
           "key_id": f"{customer}-key"}
    row.update(columns)
    return row


def insert_calls(store: Store, rows: list[dict]) -> None:
    store.insert_json_rows("llm_calls", b"\n".join(orjson.dumps(r) for r in rows),
                           settings={"date_time_input_format": "best_effort"})


@dataclasses.dataclass
class Replayed:
    run: str
    customer: str

    @property
    def where(self) -> str:
        return f"tag.run={self.run}"


def seed_replayed(store: Store, customer: str | None = None) -> Replayed:
    """One customer's production traffic next to replay and judge traffic carrying the same customer and tags,
    as the replay runner records it:

        now:      production 50 calls, 0 errors; replay 40 calls, 40 errors; replay-judge 10 calls, 10 errors
        36 h ago: production 20 calls, 2 errors; replay 20 calls, 20 errors
    """
    run = "rp" + uuid.uuid4().hex[:10]
    r = Replayed(run, customer or f"{run}-acme")
    before = _now() - dt.timedelta(hours=36)
    rows = ([call_row(run, r.customer, i) for i in range(50)]
            + [call_row(run, r.customer, i, status="error", source="replay") for i in range(40)]
            + [call_row(run, r.customer, i, status="error", source="replay-judge") for i in range(10)]
            + [call_row(run, r.customer, i, status="error" if i < 2 else "ok", when=before) for i in range(20)]
            + [call_row(run, r.customer, i, status="error", source="replay", when=before) for i in range(20)])
    insert_calls(store, rows)
    return r
