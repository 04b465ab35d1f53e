"""The gateway's own work on one call, in-process: no server, no network, recording off (a discarding processor).

    python bench/hot_path_bench.py [--calls 20000] [--rounds 3]

Two figures, in CPU microseconds a call (medians over rounds):
- `proxy`: `TagwayApp` on a chat call with tags in headers, over a provider stub that answers at once. This is what
  the gateway adds to a bare pass-through's server and HTTP client work (gateway_bench.py measures both end to end).
- `span`: one call's span, the SDK's way (`start_span`, `set_attributes`, `end`) against `CallSpans` (gateway/
  telemetry.py: the finished `ReadableSpan` built once and handed to the processor), on the same `CallRecord`.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from opentelemetry.context import Context  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from exporters.recording import disabled_recorder  # noqa: E402
from gateway.app import TagwayApp  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.providers import UpstreamResponse  # noqa: E402
from gateway.telemetry import Attempt, CallRecord, CallSpans, call_attributes, span_name  # noqa: E402

KEY = "tw-bench-0123456789abcdefghijklmnopqrstuv"
ANSWER = (b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-bench","choices":[{"index":0,'
          b'"message":{"role":"assistant","content":"Your refund was issued on Monday."},"finish_reason":"stop"}],'
          b'"usage":{"prompt_tokens":21,"completion_tokens":9,"total_tokens":30}}')
BODY = (b'{"model":"gpt-bench","messages":[{"role":"system","content":"You are a refunds assistant."},'
        b'{"role":"user","content":"Where is my refund for order 1234?"}],"temperature":0.2}')
HEADERS = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
           (b"authorization", f"Bearer {KEY}".encode()), (b"x-tagway-intent", b"refund"),
           (b"x-tagway-prompt-version", b"refund-v4"), (b"x-tagway-tags", b"region=eu,tier=pro"),
           (b"content-length", b"%d" % len(BODY))]


def config(**settings: object) -> GatewayConfig:
    """One model and one tenant key, recording off unless `settings` (top-level sections) say otherwise."""
    return GatewayConfig.model_validate({
        "recording": {"enabled": False},
        "models": [{"name": "gpt-bench", "provider": "openai", "base_url": "http://127.0.0.1:9/v1",
                    "input_cost_per_token": 1.5e-7, "output_cost_per_token": 6e-7}],
        "tenants": [{"customer": "acme", "keys": [{"id": "bench",
                                                   "hash": "sha256:" + hashlib.sha256(KEY.encode()).hexdigest()}]}],
        **settings})


class Instant:
    async def send(self, call: object) -> UpstreamResponse:
        return UpstreamResponse(200, ANSWER, "application/json", [(b"content-type", b"application/json")])


async def proxy_us(calls: int) -> float:
    app = TagwayApp(config(), recorder=disabled_recorder())
    await app.startup()
    stub = Instant()
    app.providers.for_deployment = lambda d, op: stub  # type: ignore[method-assign]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": HEADERS,
             "query_string": b""}
    statuses: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(m: dict) -> None:
        if m["type"] == "http.response.start":
            statuses.append(m["status"])

    for _ in range(2000):  # warm: caches, the first call's start-up
        await app(scope, receive, send)
    statuses.clear()
    t = time.process_time()
    for _ in range(calls):
        await app(scope, receive, send)
    dt = time.process_time() - t
    if statuses != [200] * calls:
        raise SystemExit(f"the bench's calls failed: {sorted(set(statuses))}")
    return dt / calls * 1e6


def record() -> CallRecord:
    now = time.time_ns()
    r = CallRecord(operation="chat", start_ns=now, api="chat.completions", requested_model="gpt-bench", key_id="bench",
                   customer="acme", intent="refund", prompt_version="refund-v4", tags={"region": "eu", "tier": "pro"},
                   provider="openai", deployment="gpt-bench", upstream_model="gpt-bench", http_status=200,
                   server_address="127.0.0.1", response_model="gpt-bench", response_id="chatcmpl-1",
                   input_tokens=21, output_tokens=9, cost_usd=8.55e-6, finish_reasons=["stop"], temperature=0.2)
    r.attempts.append(Attempt("gpt-bench", "openai", "gpt-bench", now, now + 1000))
    return r


def span_us(calls: int) -> tuple[float, float]:
    recorder = disabled_recorder()
    tracer, spans, r, root = recorder.tracer, CallSpans(recorder.tracer), record(), Context()
    t = time.process_time()
    for _ in range(calls):  # the SDK's lifecycle, as the gateway stamped a call before CallSpans
        span = tracer.start_span(r.operation, context=root, kind=SpanKind.CLIENT, start_time=r.start_ns)
        span.update_name(span_name(r))
        span.set_attributes(call_attributes(r, 1.0))
        span.end(end_time=r.start_ns + 1_000_000)
    sdk = (time.process_time() - t) / calls * 1e6
    t = time.process_time()
    for _ in range(calls):
        spans.finish(spans.begin(), r, r.start_ns, r.start_ns + 1_000_000)
    ours = (time.process_time() - t) / calls * 1e6
    return sdk, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    proxy, sdk, ours = [], [], []
    for _ in range(args.rounds):
        proxy.append(asyncio.run(proxy_us(args.calls)))
        s, o = span_us(args.calls)
        sdk.append(s)
        ours.append(o)
    med = statistics.median
    print(f"proxy, one chat call (recording off):  {med(proxy):6.1f} us  (rounds: "
          f"{', '.join(f'{x:.1f}' for x in proxy)})")
    print(f"span, the SDK's lifecycle:             {med(sdk):6.1f} us")
    print(f"span, CallSpans:                       {med(ours):6.1f} us  ({med(ours) / med(sdk):.2f}x)")


if __name__ == "__main__":
    main()
