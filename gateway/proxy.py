"""The hot path: `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` as a plain ASGI app.

Per request: authenticate, read the body as bytes, parse it once with orjson, resolve tags, pick the deployment
chain, forward (the original bytes when nothing needs rewriting), relay the answer (streams event by event, never
buffered), then stamp one span. Nothing here waits on storage: finishing a span is an O(1) hand-off to the
exporter's queue. Every call ends as a span, whatever happened to it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from exporters import semconv as sc
from exporters.genai_messages import choices_to_semconv_output, to_semconv_input
from exporters.vocabulary import NON_PRODUCTION_SOURCES

from .auth import KeyRing, Principal
from .config import GatewayConfig, ModelConfig
from .errors import GatewayError, bad_request, error_body, forbidden
from .pricing import Pricing
from .providers import Providers, UpstreamCall, UpstreamFailure, UpstreamResponse, server_address
from .providers.sse import event_data
from .redact import Redactor
from .tags import check_header, normalise, resolve_tags
from .telemetry import Attempt, CallRecord, finish_call_span

__all__ = ["Proxy", "HOT_ROUTES", "ProxyStats"]

log = logging.getLogger("tagway.proxy")

HOT_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("text_completion", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
    # clients configured with a base_url lacking /v1
    "/chat/completions": ("chat", "/chat/completions"),
    "/completions": ("text_completion", "/completions"),
    "/embeddings": ("embeddings", "/embeddings"),
}
# body fields that are request parameters worth keeping for replay (everything except content and plumbing)
_NOT_PARAMS = frozenset({"messages", "model", "stream", "stream_options", "metadata", "prompt", "input", "user"})
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
_PROPAGATOR = TraceContextTextMapPropagator()
_ROOT = Context()  # an empty context: start a new trace
_REPLAY_HEADERS = (("replay-run-id", sc.REPLAY_RUN_ID), ("replay-candidate", sc.REPLAY_CANDIDATE),
                   ("replay-case-id", sc.REPLAY_CASE_ID))


def _caller_link(traceparent: str) -> list[Link] | None:
    ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return [Link(ctx, {"tagway.link": "caller"})] if ctx.is_valid else None


class ClientGone(Exception):
    """The client disconnected before we answered."""


class ProxyStats:
    """Counters for /metrics (plain ints: updated on the event loop thread only)."""

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.fallbacks = 0
        self.record_failures = 0
        self.capture_failures = 0
        self.in_flight = 0


class Proxy:
    def __init__(self, *, config: GatewayConfig, keyring: KeyRing, providers: Providers, tracer: trace.Tracer,
                 pricing: Pricing, redactor: Redactor) -> None:
        self.config = config
        self.keyring = keyring
        self.providers = providers
        self.tracer = tracer
        self.pricing = pricing
        self.redactor = redactor
        self.stats = ProxyStats()
        self._capture = config.recording.capture_content
        self._source = config.recording.source
        self._max_body = config.server.max_body_bytes
        self._secrets = sorted({m.api_key for m in config.models if m.api_key and len(m.api_key) >= 6}, key=len,
                               reverse=True)
        self._addresses = {m.name: server_address(m)[0] for m in config.models}
        self._chains = {m.name: fallback_chain(config, m) for m in config.models}

    # -- ASGI entry ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        operation, upstream_path = HOT_ROUTES[scope["path"]]
        start_ns = time.time_ns()
        t0 = time.perf_counter()
        auth = api_key = traceparent = None
        content_length = -1
        tw: dict[str, str] = {}
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v.decode("latin-1")
            elif k.startswith(b"x-tagway-"):
                tw[k[9:].decode("latin-1")] = v.decode("latin-1")
            elif k == b"content-length":
                content_length = int(v) if v.isdigit() else -1
            elif k == b"api-key":
                api_key = v.decode("latin-1")
            elif k == b"traceparent":
                traceparent = v.decode("latin-1")
        # Every call is the root of its own trace, so its trace id names exactly one call (the response header,
        # `tagway show`, replay case ids). A caller's trace is linked, not adopted as parent.
        links = _caller_link(traceparent) if traceparent else None
        span = self.tracer.start_span(operation, context=_ROOT, kind=SpanKind.CLIENT, start_time=start_ns,
                                      links=links)
        rec = CallRecord(operation=operation, source=self._source, start_ns=start_ns)
        trace_id = b"%032x" % span.get_span_context().trace_id
        state = _CallState()
        self.stats.calls += 1
        self.stats.in_flight += 1
        reraise: BaseException | None = None
        try:
            if scope["method"] != "POST":
                raise GatewayError(405, f"Method {scope['method']} not allowed; use POST.", code="method_not_allowed")
            await self._handle(operation, upstream_path, auth, api_key, content_length, tw, receive, send, rec,
                               trace_id, state)
        except GatewayError as e:
            state.stop_watching()
            rec.error_type, rec.http_status, rec.error_message = e.error_type, e.status, e.message
            if not state.started:
                await _send_json(send, e.status, e.body(), trace_id)
        except ClientGone:
            rec.error_type, rec.client_disconnected = "client_disconnected", True
            rec.error_message = "client disconnected before the response"
        except asyncio.CancelledError as e:
            if state.client_gone:  # our own watcher cancelled the call: the client hung up, stop paying upstream
                rec.error_type, rec.client_disconnected = "client_disconnected", True
                rec.error_message = "client disconnected " + ("mid-stream" if state.started else "before the response")
            else:  # the server is shutting down (or something above us cancelled): record it, then let it go on
                rec.error_type, rec.error_message = "cancelled", "the call was cancelled by the gateway"
                reraise = e
        except Exception as e:  # a bug of ours: the client gets a 500, the record still gets written
            state.stop_watching()
            log.exception("internal error on %s", scope["path"])
            rec.error_type, rec.http_status, rec.error_message = "internal_error", 500, type(e).__name__
            if not state.started:
                await _send_json(send, 500, error_body("Internal gateway error.", "api_error", "internal_error"),
                                 trace_id)
        finally:
            state.stop_watching()
            self.stats.in_flight -= 1
            if rec.error_type:
                self.stats.errors += 1
            try:
                finish_call_span(self.tracer, span, rec, start_ns, start_ns + int((time.perf_counter() - t0) * 1e9))
            except Exception:  # recording never fails a request; the counter makes the failure visible
                self.stats.record_failures += 1
                log.exception("could not record call")
        if reraise is not None:
            raise reraise

    # -- one call -----------------------------------------------------------------------------------------------
    async def _handle(self, operation: str, upstream_path: str, auth: str | None, api_key: str | None,
                      content_length: int, tw: dict[str, str], receive: Any, send: Any, rec: CallRecord,
                      trace_id: bytes, state: "_CallState") -> None:
        principal = self.keyring.authenticate(auth, api_key)
        rec.key_id, rec.customer = principal.key_id, principal.customer
        body = await _read_body(receive, self._max_body, content_length)
        state.watch_disconnect(receive)
        payload = _parse(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise bad_request("You must provide a model parameter.", code="missing_model", param="model")
        rec.requested_model = model
        _validate(operation, payload)
        stream = payload.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise bad_request("stream must be a boolean.", code="invalid_type", param="stream")
        if stream and operation == "embeddings":
            raise bad_request("Embeddings cannot be streamed.", param="stream")
        rec.stream = stream
        rec.temperature, rec.max_tokens = payload.get("temperature"), payload.get("max_tokens")
        self._resolve_tags(principal, tw, payload, rec)
        deployment = self.config.model(model)
        if deployment is None:
            raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
        if not principal.allows(model):
            raise forbidden(f"This key may not use model `{model}`.", code="model_not_allowed", param="model")
        capture = self._capture and principal.capture_content
        try:
            await self._forward(operation, upstream_path, deployment, payload, body, stream, send, rec, trace_id,
                                state, capture)
        finally:
            if capture:
                try:
                    self._capture_input(operation, payload, rec)
                except Exception:  # odd input shapes must never change the call's outcome
                    self.stats.capture_failures += 1
                    log.warning("could not capture the input of a %s call", operation, exc_info=True)

    def _resolve_tags(self, principal: Principal, tw: dict[str, str], payload: dict, rec: CallRecord) -> None:
        for name, value in tw.items():
            check_header(f"x-tagway-{name}", value)
        t = resolve_tags(bound_customer=principal.customer, may_set_customer=principal.may_set_customer,
                         key_tags=principal.key_tags, headers=tw, metadata=payload.get("metadata"),
                         user=payload.get("user"), taxonomy=self.config.taxonomy)
        rec.customer, rec.intent, rec.prompt_version, rec.tags, rec.end_user = (
            t.customer, t.intent, t.prompt_version, t.tags, t.end_user)
        # Replay marks its calls so that slices and stats can tell them from production; only keys that may speak
        # for other customers (the admin key, platform keys: what the replay runner uses) may set those marks.
        source = normalise(tw["source"]) if tw.get("source") else ""
        replay = [(attr, tw[h][:128]) for h, attr in _REPLAY_HEADERS if tw.get(h)]
        if (replay or source in NON_PRODUCTION_SOURCES) and not principal.may_set_customer:
            raise forbidden("Only the admin key or a key that may set its customer can mark calls as replay.",
                            code="replay_marks_not_allowed", param="x-tagway-source")
        if source:
            rec.source = source
        rec.replay.update(replay)

    # -- forwarding with fallbacks ------------------------------------------------------------------------------
    async def _forward(self, operation: str, upstream_path: str, first: ModelConfig, payload: dict, body: bytes,
                       stream: bool, send: Any, rec: CallRecord, trace_id: bytes, state: "_CallState",
                       capture: bool) -> None:
        chain = self._chains[first.name]
        opts = payload.get("stream_options")
        client_wants_usage = bool(stream and isinstance(opts, dict) and opts.get("include_usage") is True)
        failure: UpstreamFailure | None = None
        for d in chain:
            provider = self.providers.for_deployment(d)
            up_payload, up_body = _rewrite(payload, body, d, stream, client_wants_usage)
            attempt = Attempt(deployment=d.name, provider=d.provider, model=d.upstream_model,
                              start_ns=time.time_ns(), server_address=self._addresses.get(d.name, ""))
            rec.attempts.append(attempt)
            rec.deployment, rec.provider, rec.upstream_model = d.name, d.provider, d.upstream_model
            rec.server_address = attempt.server_address
            call = UpstreamCall(d, operation, upstream_path, up_body, up_payload, stream)
            first_event: bytes | None = None
            try:
                result = await provider.send(call)
                if stream and not isinstance(result, UpstreamResponse):
                    events = result.__aiter__()
                    try:
                        first_event = await events.__anext__()
                    except StopAsyncIteration:
                        await result.aclose()
                        raise UpstreamFailure("stream_cut", "upstream closed the stream before any event") from None
                    except BaseException:
                        await result.aclose()
                        raise
            except UpstreamFailure as f:
                attempt.end_ns, attempt.error_type, attempt.status = time.time_ns(), f.error_type, f.status or 0
                failure = f
                if not f.retryable:
                    break
                if d is not chain[-1]:
                    self.stats.fallbacks += 1
                continue
            attempt.end_ns, attempt.status = time.time_ns(), 200
            if isinstance(result, UpstreamResponse):
                await self._respond_whole(operation, d, result, send, rec, trace_id, state, capture)
            else:
                await self._relay_stream(operation, d, result, events, first_event, send, rec, trace_id, state,
                                         capture, client_wants_usage)
            return
        assert failure is not None
        raise self._final_error(failure)

    def _final_error(self, f: UpstreamFailure) -> GatewayError:
        """All deployments failed: relay the last upstream answer (secrets scrubbed), or say what happened."""
        if f.status and f.body:
            body = self._scrub(f.body)
            try:
                obj = orjson.loads(body)
                err = obj.get("error") if isinstance(obj, dict) else None
            except orjson.JSONDecodeError:
                err = None
            if isinstance(err, dict):
                message = str(err.get("message") or f.message)
                e = GatewayError(f.status, message, type_=str(err.get("type") or "api_error"),
                                 code=err.get("code") if isinstance(err.get("code"), str) else None,
                                 error_type=f.error_type)
                e.body = lambda b=body: b  # relay the upstream's own bytes
                return e
            return GatewayError(f.status, f.message, type_="api_error", code="upstream_error", error_type=f.error_type)
        if f.error_type == "timeout":
            return GatewayError(504, f"Upstream timed out: {f.message}.", type_="api_error", code="upstream_timeout",
                                error_type="timeout")
        return GatewayError(502, f"Upstream unavailable: {f.message}.", type_="api_error", code="upstream_unavailable",
                            error_type=f.error_type)

    def _scrub(self, body: bytes) -> bytes:
        for s in self._secrets:
            if s.encode() in body:
                body = body.replace(s.encode(), b"***")
        return body

    # -- answers ------------------------------------------------------------------------------------------------
    async def _respond_whole(self, operation: str, d: ModelConfig, result: UpstreamResponse, send: Any,
                             rec: CallRecord, trace_id: bytes, state: "_CallState", capture: bool) -> None:
        body = result.body
        obj: Any = None
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        headers = [(b"content-type", result.content_type.encode("latin-1")), (b"content-length", b"%d" % len(body)),
                   (b"x-tagway-trace-id", trace_id)]
        if isinstance(obj, dict):
            self._read_usage(obj.get("usage"), rec, d)
            rec.response_model = str(obj.get("model") or "")
            rec.response_id = str(obj.get("id") or "")
            choices = obj.get("choices")
            if isinstance(choices, list):
                rec.finish_reasons = [str(c.get("finish_reason") or "") for c in choices if isinstance(c, dict)]
                if capture:
                    rec.output_messages = self.redactor.deep(_output_messages(operation, choices))
            if rec.cost_usd is not None:
                headers.append((b"x-tagway-cost-usd", b"%.10f" % rec.cost_usd))
        rec.http_status = 200
        state.started = True
        state.stop_watching()  # completing the response makes uvicorn report a disconnect: not the client's doing
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _read_usage(self, usage: Any, rec: CallRecord, d: ModelConfig) -> None:
        if not isinstance(usage, dict):
            return
        inp = usage.get("prompt_tokens", usage.get("input_tokens"))
        out = usage.get("completion_tokens", usage.get("output_tokens", 0))
        rec.input_tokens = inp if isinstance(inp, int) else None
        rec.output_tokens = out if isinstance(out, int) else None
        if rec.input_tokens is not None:
            rec.cost_usd = self.pricing.cost(d, rec.input_tokens, rec.output_tokens or 0)

    async def _relay_stream(self, operation: str, d: ModelConfig, stream: Any, events: Any, first_event: bytes,
                            send: Any, rec: CallRecord, trace_id: bytes, state: "_CallState", capture: bool,
                            client_wants_usage: bool) -> None:
        acc = _StreamAccumulator(capture)
        done = False
        state.started = True
        rec.http_status = 200
        await send({"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS,
                                                                             (b"x-tagway-trace-id", trace_id)]})
        event: bytes | None = first_event
        try:
            while event is not None:
                data = event_data(event)
                relay = True
                if data == b"[DONE]":
                    done = True
                elif data:
                    try:
                        obj = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        obj = None
                    if isinstance(obj, dict):
                        if obj.get("error"):
                            event = self._scrub(event)
                            rec.error_type = "upstream_stream_error"
                            rec.error_message = self._scrub(str(obj["error"]).encode()).decode()[:500]
                        usage = obj.get("usage")
                        if usage:
                            self._read_usage(usage, rec, d)
                            relay = client_wants_usage or bool(obj.get("choices"))
                        acc.add(obj)
                if relay:
                    if rec.ttft_s is None and data and data != b"[DONE]":
                        rec.ttft_s = (time.time_ns() - rec.start_ns) / 1e9
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                if done:
                    break
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    event = None
            if not done:
                raise UpstreamFailure("stream_cut", "upstream ended the stream without [DONE]")
        except UpstreamFailure as f:
            # bytes already reached the client: no fallback is possible; end with an error event the SDK raises on
            rec.error_type, rec.error_message = f.error_type, f.message
            await send({"type": "http.response.body", "more_body": True, "body": b"data: " + error_body(
                f"Upstream stream failed: {f.message}.", "api_error", f.error_type) + b"\n\n"})
        except OSError:  # a send to a client that has gone
            rec.error_type, rec.client_disconnected = "client_disconnected", True
            rec.error_message = "client disconnected mid-stream"
        finally:
            await stream.aclose()
            rec.response_model, rec.response_id = acc.model, acc.id
            rec.finish_reasons = acc.finish_reasons()
            if capture:
                rec.output_messages = self.redactor.deep(acc.output(operation))
            if not rec.client_disconnected and not state.client_gone:
                state.stop_watching()  # the end of the response is not a client disconnect
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    rec.error_type, rec.client_disconnected = "client_disconnected", True

    # -- capture ------------------------------------------------------------------------------------------------
    def _capture_input(self, operation: str, payload: dict, rec: CallRecord) -> None:
        if operation == "chat":
            messages = payload.get("messages")
            system, inp = to_semconv_input(messages if isinstance(messages, list) else [])
            rec.system_instructions = self.redactor.deep(system) if system else None
            rec.input_messages = self.redactor.deep(inp)
        else:
            content = payload.get("prompt" if operation == "text_completion" else "input")
            texts = content if isinstance(content, list) else [content]
            rec.input_messages = self.redactor.deep(
                [{"role": "user", "parts": [{"type": "text", "content": t if isinstance(t, str) else orjson.dumps(t).decode()}
                                            for t in texts]}])
        params = {k: v for k, v in payload.items() if k not in _NOT_PARAMS}
        rec.request_params = self.redactor.deep(params) if params else None


class _CallState:
    """Where the response is, and the watch for a client that hangs up: when it does, the call's task is cancelled
    so the upstream request stops too (and stops costing), and the record says so.

    The watch starts only once a call has lasted `WATCH_AFTER` seconds: a watcher task per call costs ~10% of the
    gateway's throughput on fast calls, and only a call that takes a while can be abandoned mid-way."""

    WATCH_AFTER = 0.25
    __slots__ = ("started", "client_gone", "_watcher", "_timer", "_watching")

    def __init__(self) -> None:
        self.started = False
        self.client_gone = False
        self._watcher: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False

    def watch_disconnect(self, receive: Any) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        self._watching = True
        self._timer = asyncio.get_running_loop().call_later(self.WATCH_AFTER, self._start_watcher, receive, task)

    def _start_watcher(self, receive: Any, task: asyncio.Task) -> None:
        self._timer = None
        if not self._watching:
            return

        def gone(f: asyncio.Future) -> None:
            # done callbacks run a loop iteration later: `_watching` says whether we still care
            if self._watching and not f.cancelled() and f.exception() is None:
                self.client_gone = True
                task.cancel()

        self._watcher = asyncio.ensure_future(_wait_disconnect(receive))
        self._watcher.add_done_callback(gone)

    def stop_watching(self) -> None:
        """Call before completing the response: uvicorn then reports `http.disconnect` to a pending receive()."""
        self._watching = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


class _StreamAccumulator:
    """Reassembles what a stream said (for the record), by choice index."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.model = ""
        self.id = ""
        self.text: dict[int, list[str]] = {}
        self.tools: dict[int, dict[int, dict]] = {}
        self.finish: dict[int, str] = {}

    def add(self, obj: dict) -> None:
        if not self.model and obj.get("model"):
            self.model, self.id = str(obj.get("model")), str(obj.get("id") or "")
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            i = c.get("index", 0)
            if c.get("finish_reason"):
                self.finish[i] = str(c["finish_reason"])
            if not self.capture:
                continue
            delta = c.get("delta")
            if isinstance(delta, dict):
                if delta.get("content"):
                    self.text.setdefault(i, []).append(str(delta["content"]))
                for tc in delta.get("tool_calls") or ():
                    slot = self.tools.setdefault(i, {}).setdefault(tc.get("index", 0), {
                        "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
            elif "text" in c:  # /v1/completions streams
                self.text.setdefault(i, []).append(str(c.get("text") or ""))

    def finish_reasons(self) -> list[str]:
        return [self.finish[i] for i in sorted(self.finish)]

    def output(self, operation: str) -> list[dict]:
        indexes = sorted(set(self.text) | set(self.tools) | set(self.finish))
        choices = [{"index": i, "finish_reason": self.finish.get(i, ""),
                    "message": {"role": "assistant", "content": "".join(self.text.get(i, [])) or None,
                                "tool_calls": [self.tools[i][k] for k in sorted(self.tools.get(i, {}))] or None}}
                   for i in indexes]
        return choices_to_semconv_output(choices)


def _output_messages(operation: str, choices: list) -> list[dict] | None:
    if operation == "chat":
        return choices_to_semconv_output([c for c in choices if isinstance(c, dict)])
    if operation == "text_completion":
        return [{"role": "assistant", "parts": [{"type": "text", "content": str(c.get("text") or "")}],
                 "finish_reason": c.get("finish_reason") or ""} for c in choices if isinstance(c, dict)]
    return None  # embeddings: vectors are not worth recording


# -- helpers ---------------------------------------------------------------------------------------------------
def fallback_chain(config: GatewayConfig, first: ModelConfig) -> list[ModelConfig]:
    """The deployment and its fallbacks, followed transitively (a fallback's own fallbacks come after it), each
    deployment once, so cycles end."""
    chain: list[ModelConfig] = []
    seen: set[str] = set()

    def visit(m: ModelConfig) -> None:
        if m.name in seen:
            return
        seen.add(m.name)
        chain.append(m)
        for name in m.fallbacks:
            nxt = config.model(name)
            if nxt is not None:
                visit(nxt)

    visit(first)
    # breadth matters more than depth: direct fallbacks first, then theirs
    direct = [first] + [m for m in (config.model(n) for n in first.fallbacks) if m is not None]
    return direct + [m for m in chain if m not in direct]


async def _read_body(receive: Any, limit: int, content_length: int) -> bytes:
    if content_length > limit:
        raise GatewayError(413, f"Request body is larger than the limit of {limit} bytes.", code="body_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone
        chunk = msg.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise GatewayError(413, f"Request body is larger than the limit of {limit} bytes.",
                                   code="body_too_large")
            chunks.append(chunk)
        if not msg.get("more_body"):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _parse(body: bytes) -> dict:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "UTF-8" in str(e) or "utf-8" in str(e):
            raise bad_request("The request body is not valid UTF-8.", code="invalid_encoding") from None
        raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


def _validate(operation: str, p: dict) -> None:
    if operation == "chat":
        msgs = p.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_request("messages must be a non-empty array.", code="invalid_messages", param="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad_request(f"messages[{i}] must be an object with a role.", code="invalid_messages",
                                  param=f"messages[{i}]")
    elif operation == "text_completion":
        if not isinstance(p.get("prompt"), (str, list)):
            raise bad_request("prompt must be a string or an array.", code="invalid_prompt", param="prompt")
    elif operation == "embeddings":
        if not isinstance(p.get("input"), (str, list)) or p.get("input") in ("", []):
            raise bad_request("input must be a non-empty string or array.", code="invalid_input", param="input")
    for name in ("temperature", "top_p"):
        v = p.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad_request(f"{name} must be a number.", code="invalid_type", param=name)
    v = p.get("max_tokens")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise bad_request("max_tokens must be a positive integer.", code="invalid_type", param="max_tokens")


def _rewrite(payload: dict, body: bytes, d: ModelConfig, stream: bool, client_wants_usage: bool) -> tuple[dict, bytes]:
    """The body for this deployment: the client's bytes untouched when possible; otherwise a shallow copy with the
    upstream model name, tagway's `metadata` removed and usage requested for streams."""
    needs_model = payload.get("model") != d.upstream_model
    needs_usage = stream and not client_wants_usage
    if not (needs_model or "metadata" in payload or needs_usage):
        return payload, body
    p = dict(payload)
    p["model"] = d.upstream_model
    p.pop("metadata", None)
    if needs_usage:
        opts = p.get("stream_options")
        p["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return p, orjson.dumps(p)


async def _wait_disconnect(receive: Any) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def _send_json(send: Any, status: int, body: bytes, trace_id: bytes) -> None:
    try:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"x-tagway-trace-id", trace_id)]})
        await send({"type": "http.response.body", "body": body})
    except OSError:
        pass  # the client is gone; the record says what it was sent
