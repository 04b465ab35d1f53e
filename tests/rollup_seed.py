"""Call spans for the rollup tests, written to otel_traces the way the exporter writes them (JSONEachRow batches,
optionally with a dedup token), so they reach llm_calls and the rollups through the materialized views.
Deterministic pseudo-random mix: customers, intents, models, statuses, latencies, TTFT, tokens, costs, tags
(zone, sometimes absent; tier), replay and judge calls of the same customers."""
from __future__ import annotations

import datetime as dt
import random
import uuid

import orjson

from exporters import semconv as sc

__all__ = ["span", "seed_spans", "insert_spans"]

ZONES = ("eu", "us", "apac", None)


def span(t: dt.datetime, customer: str, *, intent: str = "chat", status: str = "ok", error_type: str = "",
         latency_ms: float = 200.0, ttft_s: float | None = None, tokens: tuple[int, int] = (10, 5),
         cost: float = 0.0001, model: str = "gpt-4o-mini", source: str = "production",
         tags: dict[str, str] | None = None, prompt_version: str = "v1") -> dict:
    ns = (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1) * 1000
    attrs = {sc.KIND: "call", sc.CUSTOMER: customer, sc.INTENT: intent, sc.PROMPT_VERSION: prompt_version,
             sc.REQUESTED_MODEL: model, sc.REQUEST_MODEL: model, sc.PROVIDER: "openai", sc.SOURCE: source,
             sc.INPUT_TOKENS: str(tokens[0]), sc.OUTPUT_TOKENS: str(tokens[1]), sc.COST_USD: repr(cost),
             sc.OPERATION: "chat"}
    if error_type:
        attrs[sc.ERROR_TYPE] = error_type
    if ttft_s is not None:
        attrs[sc.TIME_TO_FIRST_CHUNK] = repr(ttft_s)
    for k, v in (tags or {}).items():
        attrs[sc.TAG_PREFIX + k] = v
    return {"Timestamp": f"{ns // 10**9}.{ns % 10**9:09d}", "TraceId": uuid.uuid4().hex, "SpanId": uuid.uuid4().hex[:16],
            "SpanName": f"chat {model}", "SpanKind": "Client", "ServiceName": "tagway",
            "Duration": int(latency_ms * 1e6), "StatusCode": "Error" if status == "error" else "Unset",
            "SpanAttributes": attrs}


def seed_spans(customers: list[str], start: dt.datetime, end: dt.datetime, n: int, seed: int = 7) -> list[dict]:
    """`n` spans with timestamps spread over [start, end) (microsecond precision, not on bucket edges)."""
    rnd = random.Random(seed)
    out = []
    width = (end - start).total_seconds()
    for _ in range(n):
        t = start + dt.timedelta(seconds=rnd.random() * width)
        c = rnd.choice(customers)
        r = rnd.random()
        status, etype = ("error", rnd.choice(["upstream_5xx", "timeout"])) if r < 0.12 else (
            ("cancelled", "client_disconnected") if r < 0.15 else ("ok", ""))
        zone = rnd.choice(ZONES)
        tags = {"tier": rnd.choice(["free", "pro"])}
        if zone:
            tags["zone"] = zone
        src = rnd.choices(["production", "replay", "replay-judge"], [8, 1, 1])[0]
        out.append(span(t, c, intent=rnd.choice(["chat", "refund", "search"]), status=status, error_type=etype,
                        latency_ms=round(50 + rnd.random() ** 2 * 3000, 3),
                        ttft_s=round(0.02 + rnd.random() * 0.5, 4) if rnd.random() < 0.6 else None,
                        tokens=(rnd.randint(1, 4000), rnd.randint(1, 900)), cost=rnd.random() * 0.01,
                        model=rnd.choice(["gpt-4o-mini", "gpt-4o"]), source=src, tags=tags,
                        prompt_version=rnd.choice(["v1", "v2"])))
    return out


def insert_spans(store, spans: list[dict], token: str | None = None) -> None:
    body = b"\n".join(orjson.dumps(s) for s in spans)
    store.insert_json_rows("otel_traces", body, {"insert_deduplication_token": token} if token else None)
