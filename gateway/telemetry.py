"""Span stamping: everything the proxy learnt about one call becomes one CLIENT span with the OpenTelemetry GenAI
attributes and the tags under `tagway.*`, plus a child span per upstream attempt when there was more than one.

`CallSpans` takes the call's ids when the request arrives (its trace id goes back in a response header) and, when the
call ends, builds the finished span as the SDK's own `ReadableSpan` (a `JSONTypedSpan`: exporters/rows.py writes its
typed attributes into the row as they are) and hands it to the tracer's span processor (`Tracer.span_processor`): the
record the SDK's `Span.end()` would hand over, without its mutable life in between.
That life cost the event loop ~20 us a call (a lock, a `BoundedAttributes`, `set_attributes` validating each of ~30
attributes the gateway itself had just built from typed fields): 25.7 -> 5.7 us in bench/hot_path_bench.py, where
the gateway's whole work on a call was ~90 us. What it leaves out: processors' `on_start` (ours have none; a call
span is only ever read whole), the sampler (every call is recorded, so a call span is always sampled, as `ALWAYS_ON`
in exporters/recording.py decides) and the SDK's attribute limits, counts and lengths alike, including
OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT: a call span has ~40 attributes and at most 64 tags, tagway caps captured content
itself (recording.capture_max_chars) and a length limit would cut a content attribute's JSON into something no
reader can parse. Attempt spans are built the same way from their recorded times: a call served on the first try
pays for none.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from exporters import semconv as sc
from exporters.rows import JSONTypedSpan

__all__ = ["CallRecord", "Attempt", "CallSpans", "SpanIds"]

_PROPAGATOR = TraceContextTextMapPropagator()
_OK = Status(StatusCode.UNSET)


@dataclasses.dataclass(slots=True)
class Attempt:
    deployment: str
    provider: str
    model: str
    start_ns: int
    end_ns: int = 0
    error_type: str = ""
    status: int = 0
    server_address: str = ""


@dataclasses.dataclass(slots=True)
class CallRecord:
    """Mutable state of one call, filled in by the proxy as it goes."""
    operation: str = "chat"
    start_ns: int = 0
    api: str = ""  # the exact API (chat.completions, responses, messages, files.create, ...): tagway.api
    requested_model: str = ""
    stream: bool = False
    key_id: str = ""
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    end_user: str = ""
    session_id: str = ""
    source: str = "production"
    replay: dict[str, str] = dataclasses.field(default_factory=dict)  # replay.run_id/candidate/case_id
    provider: str = ""
    deployment: str = ""
    upstream_model: str = ""
    server_address: str = ""
    response_model: str = ""
    response_id: str = ""
    http_status: int = 0
    error_type: str = ""
    error_message: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None  # of the output tokens
    cache_read_tokens: int | None = None  # of the input tokens
    cost_usd: float | None = None
    finish_reasons: list[str] = dataclasses.field(default_factory=list)
    ttft_s: float | None = None
    client_disconnected: bool = False
    usage_estimated: bool = False  # the token counts are an estimate (a stream that ended before its usage)
    creates_resource: bool = False  # the answer's id is a resource the call's customer owns (gateway/resources.py)
    owns_resources: tuple[str, ...] = ()  # other ids the answer made known that the call's customer owns from now on
    temperature: Any = None
    max_tokens: Any = None
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    # captured content, redacted, as the JSON text it is recorded as (Redactor.json)
    system_instructions: str | None = None
    input_messages: str | None = None
    output_messages: str | None = None
    request_params: str | None = None
    truncated: dict[str, int] | None = None  # client values cut to their cap: field -> original length
    skipped: list[str] | None = None  # fallbacks passed over: the tenant may not use them
    cooling: list[str] | None = None  # deployments passed over: cooling down after failures (gateway/cooldowns.py)
    output_type: str = ""  # what a request asked for (text, json, image, speech), where its route says

    def fail(self, error_type: str, message: str, http_status: int = 0) -> None:
        self.error_type, self.error_message = error_type, message
        if http_status:
            self.http_status = http_status

    def hung_up(self, when: str) -> None:
        """The client went away (`when`: before the response / mid-stream)."""
        self.error_type, self.error_message, self.client_disconnected = (
            "client_disconnected", f"client disconnected {when}", True)

    def begin_attempt(self, deployment: Any, server_address: str, start_ns: int) -> Attempt:
        """A try on one deployment (a `ModelConfig`): the call is now attributed to it."""
        at = Attempt(deployment=deployment.name, provider=deployment.provider, model=deployment.upstream_model,
                     start_ns=start_ns, server_address=server_address)
        self.attempts.append(at)
        self.deployment, self.provider, self.upstream_model = at.deployment, at.provider, at.model
        self.server_address = server_address
        return at

    def answered(self, model: Any, response_id: Any, finish_reasons: list[str]) -> None:
        self.response_model, self.response_id = str(model or ""), str(response_id or "")
        self.finish_reasons = finish_reasons

    def usage(self, input_tokens: Any, output_tokens: Any) -> None:
        self.input_tokens = input_tokens if isinstance(input_tokens, int) else None
        self.output_tokens = output_tokens if isinstance(output_tokens, int) else None

    def detail_usage(self, usage: dict) -> None:
        """Reasoning and cached tokens, where an API reports them (chat: *_tokens_details; Responses:
        input/output_tokens_details; Anthropic: cache_read_input_tokens)."""
        out = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
        if isinstance(out, dict) and isinstance(out.get("reasoning_tokens"), int):
            self.reasoning_tokens = out["reasoning_tokens"]
        inp = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        cached = inp.get("cached_tokens") if isinstance(inp, dict) else usage.get("cache_read_input_tokens")
        if isinstance(cached, int):
            self.cache_read_tokens = cached


def _json(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def call_attributes(r: CallRecord, latency_ms: float) -> dict[str, Any]:
    a: dict[str, Any] = {
        sc.KIND: "call",
        sc.OPERATION: r.operation,
        sc.REQUEST_MODEL: r.upstream_model or r.requested_model,
        sc.REQUESTED_MODEL: r.requested_model,
        sc.REQUEST_STREAM: r.stream,
        sc.SOURCE: r.source,
        sc.LATENCY_MS: round(latency_ms, 3),
        sc.ATTEMPTS: len(r.attempts),
    }
    if r.http_status:
        a[sc.HTTP_STATUS] = r.http_status
    for key, value in ((sc.CUSTOMER, r.customer), (sc.INTENT, r.intent), (sc.PROMPT_VERSION, r.prompt_version),
                       (sc.KEY_ID, r.key_id), (sc.END_USER, r.end_user), (sc.CONVERSATION_ID, r.session_id),
                       (sc.PROVIDER, r.provider),
                       (sc.DEPLOYMENT, r.deployment), (sc.SERVER_ADDRESS, r.server_address),
                       (sc.RESPONSE_MODEL, r.response_model), (sc.RESPONSE_ID, r.response_id),
                       (sc.ERROR_TYPE, r.error_type)):
        if value:
            a[key] = value
    for k, v in r.tags.items():
        a[sc.TAG_PREFIX + k] = v
    for k, v in r.replay.items():
        a[k] = v
    if r.input_tokens is not None:
        a[sc.INPUT_TOKENS] = r.input_tokens
    if r.output_tokens is not None:
        a[sc.OUTPUT_TOKENS] = r.output_tokens
    if r.reasoning_tokens is not None:
        a[sc.REASONING_TOKENS] = r.reasoning_tokens
    if r.cache_read_tokens is not None:
        a[sc.CACHE_READ_TOKENS] = r.cache_read_tokens
    if r.api:
        a[sc.API] = r.api
    if r.cost_usd is not None:
        a[sc.COST_USD] = round(r.cost_usd, 10)
    if r.finish_reasons:
        a[sc.FINISH_REASONS] = tuple(r.finish_reasons)  # immutable, as the SDK stores a sequence attribute
    if r.ttft_s is not None:
        a[sc.TIME_TO_FIRST_CHUNK] = round(r.ttft_s, 6)
    if r.client_disconnected:
        a[sc.CLIENT_DISCONNECTED] = True
    if r.usage_estimated:
        a[sc.USAGE_ESTIMATED] = True
    if r.creates_resource:
        a[sc.CREATES_RESOURCE] = True
    if r.owns_resources:
        a[sc.OWNS_RESOURCES] = r.owns_resources
    if isinstance(r.temperature, (int, float)) and not isinstance(r.temperature, bool):
        a[sc.REQUEST_TEMPERATURE] = float(r.temperature)
    if isinstance(r.max_tokens, int) and not isinstance(r.max_tokens, bool):
        a[sc.REQUEST_MAX_TOKENS] = r.max_tokens
    if r.input_messages is not None:
        a[sc.INPUT_MESSAGES] = r.input_messages
    if r.system_instructions:
        a[sc.SYSTEM_INSTRUCTIONS] = r.system_instructions
    if r.output_messages is not None:
        a[sc.OUTPUT_MESSAGES] = r.output_messages
    if r.request_params:
        a[sc.REQUEST_PARAMS] = r.request_params
    if r.truncated:
        a[sc.TRUNCATED] = _json(r.truncated)
    if r.skipped:
        a[sc.FALLBACKS_SKIPPED] = _json(r.skipped)
    if r.cooling:
        a[sc.DEPLOYMENTS_COOLING] = _json(r.cooling)
    if r.output_type:
        a[sc.OUTPUT_TYPE] = r.output_type
    return a


def span_name(r: CallRecord) -> str:
    return f"{r.operation} {r.requested_model}" if r.requested_model else r.operation


@dataclasses.dataclass(slots=True, frozen=True)
class SpanIds:
    """A call span's identity, fixed when the call arrives: its trace (a new one per call), its span id, and the
    caller's trace when the request carried a valid `traceparent` (linked, not adopted as parent: a trace id then
    names exactly one call, for the response header, `tagway show` and replay case ids)."""
    trace_id: int
    span_id: int
    links: tuple[Link, ...] = ()

    @property
    def header(self) -> bytes:
        return b"%032x" % self.trace_id


class CallSpans:
    """Each call's spans for a tracer of the OpenTelemetry SDK (its resource, id generator, scope and processor)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        processor = getattr(tracer, "span_processor", None)
        if processor is None:
            raise TypeError(f"calls are recorded through an OpenTelemetry SDK tracer, not {type(tracer).__name__}")
        self._on_end = processor.on_end
        self._resource = tracer.resource
        ids = tracer.id_generator
        self._trace_id, self._span_id = ids.generate_trace_id, ids.generate_span_id
        # the flags the SDK's start_span gives a sampled span of a random trace id (W3C trace context level 2)
        self._flags = TraceFlags(TraceFlags.SAMPLED | (TraceFlags.RANDOM_TRACE_ID if ids.is_trace_id_random() else 0))
        info = tracer.instrumentation_info
        self._info = info
        # the tracer's own scope (with any attributes) where the SDK keeps it; else the same name and version
        self._scope = getattr(tracer, "_instrumentation_scope", None) or InstrumentationScope(
            info.name, info.version, info.schema_url)

    def begin(self, traceparent: str | None = None) -> SpanIds:
        links: tuple[Link, ...] = ()
        if traceparent:
            ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
            if ctx.is_valid:
                links = (Link(ctx, {"tagway.link": "caller"}),)
        return SpanIds(self._trace_id(), self._span_id(), links)

    def finish(self, ids: SpanIds, r: CallRecord, start_ns: int, end_ns: int) -> None:
        """Hand the call's finished span (and its attempts', when there were several) to the span processor."""
        ctx = SpanContext(ids.trace_id, ids.span_id, False, self._flags)
        attempts = r.attempts
        if len(attempts) > 1:  # children end first, as they would have in a live trace
            for i, at in enumerate(attempts):
                self._attempt(ctx, r, at, i + 1, end_ns)
        status = Status(StatusCode.ERROR, r.error_message[:500] or r.error_type) if r.error_type else _OK
        self._on_end(JSONTypedSpan(
            span_name(r), ctx, resource=self._resource, attributes=call_attributes(r, (end_ns - start_ns) / 1e6),
            links=ids.links, kind=SpanKind.CLIENT, instrumentation_info=self._info, status=status, start_time=start_ns,
            end_time=end_ns, instrumentation_scope=self._scope))

    def _attempt(self, parent: SpanContext, r: CallRecord, at: Attempt, n: int, end_ns: int) -> None:
        attrs: dict[str, Any] = {sc.KIND: "attempt", sc.OPERATION: r.operation, sc.REQUEST_MODEL: at.model,
                                 sc.PROVIDER: at.provider, sc.DEPLOYMENT: at.deployment,
                                 sc.REQUESTED_MODEL: r.requested_model, "tagway.attempt": n}
        if at.server_address:
            attrs[sc.SERVER_ADDRESS] = at.server_address
        if at.status:
            attrs[sc.HTTP_STATUS] = at.status
        if at.error_type:
            attrs[sc.ERROR_TYPE] = at.error_type
        ctx = SpanContext(parent.trace_id, self._span_id(), False, self._flags)
        self._on_end(JSONTypedSpan(
            f"{r.operation} {at.model}", ctx, parent, resource=self._resource, attributes=attrs, kind=SpanKind.CLIENT,
            instrumentation_info=self._info, status=Status(StatusCode.ERROR, at.error_type) if at.error_type else _OK,
            start_time=at.start_ns, end_time=at.end_ns or end_ns, instrumentation_scope=self._scope))
