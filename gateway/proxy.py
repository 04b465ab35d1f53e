"""The hot path: `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings` as a plain ASGI app.

Per request: authenticate, read the body as bytes, parse it once with orjson, resolve tags, pick the deployment
chain, forward (the original bytes when nothing needs rewriting), relay the answer (streams event by event, never
buffered), then stamp one span. Nothing here waits on storage: finishing a span is an O(1) hand-off to the
exporter's queue. Every call ends as a span, whatever happened to it.

Each request is one `Call` (gateway/call.py) that the handlers below pass along; its `rec` becomes the span.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from opentelemetry import trace

from exporters import semconv as sc
from exporters.vocabulary import NON_PRODUCTION_SOURCES, REPLAY_SOURCE, SHADOW_SOURCE

from .auth import CREDENTIAL_HEADERS, KeyRing, duplicate_header
from .call import Call, ClientGone
from .capture import StreamAccumulator, capture_input, output_messages
from .config import GatewayConfig, ModelConfig
from .cooldowns import Cooldowns
from .errors import (UPSTREAM_AUTH_STATUS, GatewayError, forbidden, upstream_auth_error,
                     with_own_headers)
from .limits import CallLimits
from .headers import IDEMPOTENCY_KEY, HeaderFilter, KeyScope
from .pricing import Pricing
from .providers import ProviderRegistry, UpstreamCall, UpstreamFailure, UpstreamResponse, kind_of
from .providers.sse import event_data, json_object
from .redact import Redactor
from .recent import RecentCalls
from .request_checks import check_request, model_of, parse_object, stream_flag
from .model_routes import ModelRoutes
from .routing import body_for, refuses_stream_options
from .shadow import ShadowDispatcher, ShadowJob
from .tags import check_header, normalise, resolve_tags
from .observe import CallObserver
from .telemetry import CallRecord, CallSpans, SpanIds
from .resources import ResourceOwners, as_not_found, referenced_ids
from .usage_estimate import estimate_prompt_tokens, tokens_of_chars
from .wire_formats import API_NAMES, SEMCONV_OPERATION, WIRES, WireStreamRelay, openai_error_event, shutdown_event

__all__ = ["Proxy", "HOT_ROUTES", "ProxyStats"]

log = logging.getLogger("tagway.proxy")

HOT_ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("text_completion", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
    "/v1/responses": ("responses", "/responses"),  # gateway/wire_formats.py: the APIs that are not chat completions
    "/v1/messages": ("messages", "/messages"),  # Anthropic's, for Anthropic-SDK clients
    "/responses": ("responses", "/responses"),
    # clients configured with a base_url lacking /v1
    "/chat/completions": ("chat", "/chat/completions"),
    "/completions": ("text_completion", "/completions"),
    "/embeddings": ("embeddings", "/embeddings"),
}
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
# captured content up to this size (request + response bytes) is redacted inline; above it, on a worker thread
CAPTURE_INLINE_BYTES = 64 * 1024
# the APIs whose bodies can name a provider resource (a previous response, a file, a conversation, a container, vector
# stores): a tenant key's body is checked for another tenant's (api.tenant_resources: isolated)
_NAMES_RESOURCES = frozenset({"chat", "responses", "messages"})
_REPLAY_HEADERS = (("replay-run-id", sc.REPLAY_RUN_ID), ("replay-candidate", sc.REPLAY_CANDIDATE),
                   ("replay-case-id", sc.REPLAY_CASE_ID))


async def _discard(message: dict) -> None:
    """Where a shadow call's answer goes: nobody waits for it."""


class ProxyStats:
    """Counters for /metrics that are not per call (those are in gateway/observe.py); plain ints, updated on the
    event loop thread only."""

    def __init__(self) -> None:
        self.fallbacks = 0
        self.record_failures = 0
        self.capture_failures = 0
        self.in_flight = 0


class _Opened:
    """An upstream stream whose first event has arrived (so the deployment answered and no fallback is needed)."""

    __slots__ = ("stream", "events", "first")

    def __init__(self, stream: Any, events: Any, first: bytes) -> None:
        self.stream, self.events, self.first = stream, events, first


class Proxy(WireStreamRelay):
    def __init__(self, *, config: GatewayConfig, keyring: KeyRing, providers: ProviderRegistry,
                 tracer: trace.Tracer, pricing: Pricing, redactor: Redactor,
                 limits: CallLimits | None = None, routes: ModelRoutes | None = None, recording: bool = True,
                 owners: ResourceOwners | None = None) -> None:
        self.config = config
        self.owners = owners  # whose files and responses are whose (api.tenant_resources: isolated)
        self.limits = limits if limits is not None else CallLimits()
        self.keyring = keyring
        self.providers = providers
        self.spans = CallSpans(tracer)
        self.pricing = pricing
        self.redactor = redactor
        self.stats = ProxyStats()
        self._cut = 0  # calls cut at the shutdown deadline, not yet logged
        self.observe = CallObserver(config)  # labelled call metrics and the access log (gateway/observe.py)
        self.recent = RecentCalls()  # who owns the calls served lately (feedback may come before they are stored)
        # content is captured (and redacted) only to be recorded: with recording off nobody would ever read it
        self._capture_on = config.recording.capture_content and recording
        self._source = config.recording.source
        self._max_body = config.server.max_body_bytes
        self._max_model_chars = config.server.max_model_chars
        self._max_user_chars = config.recording.max_user_chars
        # provider keys, longest first, scrubbed from everything an upstream says (a provider that echoes its key
        # in an answer must not leak it to the client or the store)
        self._secrets = [s.encode() for s in sorted({m.api_key for m in config.models
                                                     if m.api_key and len(m.api_key) >= 6}, key=len, reverse=True)]
        self._tenants = {t.customer: t for t in config.tenants}
        self.routes = routes or ModelRoutes(config)  # model name -> deployment chain (exact names, wildcards, `*`)
        self.cooldowns = Cooldowns(config.cooldown.after_failures, config.cooldown.seconds)  # failing deployments
        self._forward_headers = HeaderFilter(config.api.forward_headers)  # client -> upstream
        self._return_headers = HeaderFilter(config.api.return_headers)  # upstream -> client
        self._key_scope = KeyScope(b"\0".join(sorted(self._secrets)))  # those headers fitted to the key's tenant
        # mirrors sampled live calls to shadow candidates once they are answered (gateway/shadow.py)
        self.shadow = ShadowDispatcher(config.shadow, self.shadow_call) if config.shadow else None
        # deployments whose upstream refused the stream_options tagway adds to ask for usage: never asked again
        self._usage_refused: set[str] = set()

    # -- ASGI entry ---------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        start_ns = time.time_ns()
        t0 = time.perf_counter()
        route = HOT_ROUTES[scope["path"]]
        rec = CallRecord(operation=SEMCONV_OPERATION.get(route[0], route[0]), source=self._source, start_ns=start_ns,
                         api=API_NAMES[route[0]])
        call = Call(route, scope, receive, send, rec)
        if self._forward_headers:
            call.forward_headers = self._forward_headers.pick(scope["headers"])
        ids = self.spans.begin(call.traceparent)  # a trace of its own; a caller's trace is linked
        call.trace_id = ids.header
        self.stats.in_flight += 1
        reraise: BaseException | None = None
        stopping = False  # cancelled by the server: server.graceful_shutdown_seconds has passed
        try:
            await self._handle(call, scope["method"])
        except GatewayError as e:
            call.watch.stop()
            rec.fail(e.error_type, e.message, e.status)
            if not call.started:
                await call.respond_error(e)
        except ClientGone:
            rec.hung_up("before the response")
        except asyncio.CancelledError:
            if call.watch.client_gone:  # our own watcher cancelled the call: the client hung up, stop paying upstream
                rec.hung_up("mid-stream" if call.started else "before the response")
            else:  # uvicorn cancels what still runs at the deadline: the cancellation ends here
                stopping = True
                self.cut_at_shutdown()
                await call.answer_shutdown()
        except Exception as e:  # a bug of ours: the client gets a 500, the record still gets written
            call.watch.stop()
            log.exception("internal error on %s", scope["path"])
            rec.fail("internal_error", type(e).__name__, 500)
            if not call.started:
                await call.respond_error(GatewayError(500, "Internal gateway error.", type_="api_error",
                                                      code="internal_error"))
        except BaseException as e:  # the process is exiting: record the call, then let it go on
            rec.fail("cancelled", f"the gateway stopped ({type(e).__name__})")
            reraise = e
        finally:
            call.watch.stop()
            self.stats.in_flight -= 1
        if not call.resolved and call.principal is not None:
            self._resolve_after_failure(call)
        if call.capture:  # after the response: the client never waits for capture and redaction
            try:
                await self._capture(call, inline=stopping or reraise is not None)
            except asyncio.CancelledError:  # the deadline, mid-capture: the call is still recorded, without content
                pass
        if call.limited:  # tokens and cost count against the limits the call was admitted under
            self.limits.finish(call.limited, (rec.input_tokens or 0) + (rec.output_tokens or 0), rec.cost_usd or 0.0)
        self.recent.add(call.trace_id, rec.customer, rec.key_id)
        if rec.response_id and _stored(call):  # retrievable later (failed or cut too): whose it is
            rec.creates_resource = True
            if self.owners is not None:
                self.owners.created(rec.response_id, rec.customer)
        self._record(ids, rec, start_ns, t0)
        self.observe(rec, ids.trace_id, time.perf_counter() - t0)  # metrics, access log
        if reraise is not None:
            raise reraise
        if self.shadow is not None:  # the client has its answer: a sampled copy is queued, never awaited
            self.shadow.offer(call)

    def cut_at_shutdown(self) -> None:
        """Count a call cut at the shutdown deadline. uvicorn cancels them all at once: one WARNING says how many,
        a loop iteration later, once each has ended."""
        self._cut += 1
        if self._cut == 1:
            asyncio.get_running_loop().call_soon(self._say_cut)

    def _say_cut(self) -> None:
        log.warning("server.graceful_shutdown_seconds passed: %d call(s) still running were cut (a 503 "
                    "gateway_shutting_down, or that error as a stream's last event; a relayed file or audio body "
                    "ends short) and recorded as errors of type cancelled (`--where error_type=cancelled`)",
                    self._cut)
        self._cut = 0

    async def shadow_call(self, job: ShadowJob) -> bool:
        """Send a live call's request to a shadow candidate through the same routing, providers, capture and
        recording as the live call, answering nobody; recorded with source `shadow`, the live call's tags and its
        trace id as case id. Never streamed (the answer is compared whole). True when the candidate answered."""
        live = job.rec
        start_ns, t0 = time.time_ns(), time.perf_counter()
        rec = CallRecord(operation=live.operation, source=SHADOW_SOURCE, start_ns=start_ns, api=live.api,
                         requested_model=job.model, key_id=live.key_id, customer=live.customer, intent=live.intent,
                         prompt_version=live.prompt_version, tags=dict(live.tags), end_user=live.end_user,
                         session_id=live.session_id, temperature=live.temperature, max_tokens=live.max_tokens,
                         replay={sc.REPLAY_CASE_ID: job.trace_id, sc.REPLAY_CANDIDATE: job.model})
        payload = {k: v for k, v in job.payload.items() if k != "stream_options"}
        payload["model"] = job.model
        if "stream" in payload:
            payload["stream"] = False
        if job.route[0] == "responses" or "store" in payload:
            payload["store"] = False  # a copy leaves no stored response or completion at the provider
        call = Call(job.route, {"headers": ()}, None, _discard, rec)
        call.principal, call.tenant, call.capture = job.principal, job.tenant, job.capture
        # never the live call's idempotency key: the provider would answer the copy with the live call's answer
        call.payload, call.body = payload, orjson.dumps(payload)
        call.forward_headers = [h for h in job.forward_headers if h[0] != IDEMPOTENCY_KEY]
        ids = self.spans.begin()
        call.trace_id = ids.header
        reraise: BaseException | None = None
        try:
            deployment = self.routes.resolve(job.model)
            if deployment is None:
                raise GatewayError(404, f"The shadow model `{job.model}` is not served.", code="model_not_found")
            await self._forward(call, deployment)
        except GatewayError as e:
            rec.fail(e.error_type, e.message, e.status)
        except asyncio.CancelledError as e:  # the gateway is stopping: the shadow call is recorded as cancelled
            rec.fail("cancelled", "the shadow call was cancelled by the gateway")
            reraise = e
        except Exception as e:
            log.exception("internal error on a shadow call to %s", job.model)
            rec.fail("internal_error", type(e).__name__, 500)
        if call.capture and reraise is None:
            await self._capture(call, inline=False)
        self._record(ids, rec, start_ns, t0)
        self.observe(rec, ids.trace_id, time.perf_counter() - t0, count=False)  # an access line, source=shadow
        if reraise is not None:
            raise reraise
        return not rec.error_type

    def _record(self, ids: SpanIds, rec: CallRecord, start_ns: int, t0: float) -> None:
        try:
            self.spans.finish(ids, rec, start_ns, start_ns + int((time.perf_counter() - t0) * 1e9))
        except Exception:  # recording never fails a request; the counter makes the failure visible
            self.stats.record_failures += 1
            log.exception("could not record a %s call", rec.source)

    # -- one call -----------------------------------------------------------------------------------------------
    async def _handle(self, call: Call, method: str) -> None:
        rec = call.rec
        if call.repeated in CREDENTIAL_HEADERS:
            self.keyring.refused("duplicate_header")
            raise duplicate_header(call.repeated)
        principal = self.keyring.authenticate(call.auth, call.api_key, call.other_api_key)
        call.principal = principal
        rec.key_id, rec.customer = principal.key_id, principal.customer
        if call.repeated:
            raise duplicate_header(call.repeated)
        if call.forward_headers:  # a tenant key's org/project stay behind; idempotency keys get its namespace
            call.forward_headers = self._key_scope.fit(call.forward_headers, principal.customer,
                                                       not principal.may_set_customer)
        if method != "POST":
            raise GatewayError(405, f"Method {method} not allowed; use POST.", code="method_not_allowed")
        await call.read_body(self._max_body)
        call.watch.start(call.receive)
        payload = call.payload = parse_object(call.body)
        model = rec.requested_model = model_of(call.operation, payload, self._max_model_chars)
        check_request(call.operation, payload)
        call.stream = rec.stream = stream_flag(call.operation, payload)
        rec.temperature = payload.get("temperature")
        # chat's current name for the limit (max_tokens is its deprecated one), legacy completions', Responses'
        max_tokens = payload.get("max_completion_tokens")
        rec.max_tokens = payload.get("max_tokens", payload.get("max_output_tokens")) if max_tokens is None \
            else max_tokens
        self._resolve_tags(call)
        # The tenant the call is recorded as decides its settings, whoever's key sent it (an admin or platform key
        # may record calls for a tenant that does not want its content stored).
        tenant = call.tenant = principal.tenant if rec.customer == principal.customer else \
            self._tenants.get(rec.customer)
        deployment = self.routes.resolve(model) if model else self.routes.modelless()
        if deployment is None and not model:
            raise GatewayError(400, "The request names no model and no `*` route (a default upstream) is configured.",
                               code="missing_model", param="model")
        if deployment is None:
            raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
        if not self._allows(call, model):
            raise forbidden(f"This key may not use model `{model}`.", code="model_not_allowed", param="model")
        # the resources the body names (a walk of the parsed body: escapes and case variants are already resolved,
        # and it costs less than scanning the bytes; the APIs that name none are not walked)
        wanted = referenced_ids(payload) if self.owners is not None and not principal.may_set_customer \
            and call.operation in _NAMES_RESOURCES else None
        # the gateway's own replay, judge and shadow calls are no tenant's spend (budgets read from the store leave
        # them out too): only the key's limits hold
        production = rec.source not in NON_PRODUCTION_SOURCES
        scopes = self.limits.scopes(principal.key_id, principal.limits, tenant if production else None, model)
        if production and principal.tenant is not None and principal.tenant is not tenant \
                and principal.tenant.limits is not None:
            # a platform key recording calls for other customers: its own tenant's limits hold over them too
            scopes += self.limits.scopes("", None, principal.tenant, model)
        if scopes:
            refusal, warnings = self.limits.admit(scopes)
            if refusal is not None:
                raise refusal.error()
            call.limited = scopes
            call.extra_headers.extend((b"x-tagway-budget-warning", w.encode()) for w in warnings)
        if wanted:  # after the limits: a request naming ids it may not use is a request all the same (and its
            # owner lookups cost the store), so it counts against the key's rate
            await self.owners.refuse_foreign(wanted, principal.customer)
        call.capture = self._capture_on and (tenant.capture_content if tenant is not None else
                                             principal.capture_content)
        if not wanted:
            await self._forward(call, deployment)
            return
        try:
            await self._forward(call, deployment)
        except GatewayError as e:  # "no such resource" looks the same whether the id is another tenant's or nobody's
            raise as_not_found(e, wanted) from None

    def _allows(self, call: Call, model: str) -> bool:
        """The key may use the model, and so may the tenant the call is recorded as. Replays are exempt from the
        latter: comparing a tenant's traffic on a candidate it does not use yet is what they are for."""
        tenant = call.tenant
        return call.principal.allows(model) and (
            tenant is None or tenant is call.principal.tenant or call.rec.source in NON_PRODUCTION_SOURCES
            or tenant.allows(model))

    # -- capture ------------------------------------------------------------------------------------------------
    async def _capture(self, call: Call, *, inline: bool) -> None:
        """Record what the call said, redacted. Big content is redacted on a worker thread, so one huge prompt
        costs the event loop at most a GIL switch interval at a time, not its whole redaction."""
        if inline or len(call.body) + call.answer_bytes <= CAPTURE_INLINE_BYTES:
            ok = self._capture_now(call)
        else:
            ok = await asyncio.get_running_loop().run_in_executor(None, self._capture_now, call)
        if not ok:
            self.stats.capture_failures += 1

    def _capture_now(self, call: Call) -> bool:
        rec, redactor = call.rec, self.redactor
        try:
            capture_input(call.operation, call.payload, rec, redactor)
            out = None
            if isinstance(call.answer, StreamAccumulator):
                out = call.answer.output()
            elif call.answer is not None:
                out = output_messages(call.operation, call.answer)
            if out is not None:  # embeddings: no output recorded
                rec.output_messages = redactor.json(out)
            return True
        except Exception:  # odd shapes must never change the call's outcome
            log.warning("could not capture the content of a %s call", call.operation, exc_info=True)
            return False

    def _resolve_after_failure(self, call: Call) -> None:
        """A call that failed, or whose client left, before its tags were worked out (a bad or unread body) is
        still recorded as what its headers say: a replay's call as a replay, for the customer it names, not as a
        production call of nobody. The body's metadata counts when the body was read; bad input there is no
        second error."""
        for payload in (call.payload, {}) if call.payload else ({},):
            try:
                self._resolve_tags(call, payload)
                return
            except GatewayError:
                if call.resolved:  # a refused replay mark: recorded as what it claimed to be
                    return
            except Exception:  # recording never fails a call; what was set stays
                log.debug("could not resolve the tags of a failed call", exc_info=True)
                return

    def _resolve_tags(self, call: Call, payload: dict | None = None) -> None:
        tw, rec = call.tagway_headers, call.rec
        for name, value in tw.items():
            check_header(f"x-tagway-{name}", value)
        t = resolve_tags(call.principal, tw, call.payload if payload is None else payload, self.config.taxonomy,
                         self.redactor.text)
        rec.customer, rec.intent, rec.prompt_version, rec.tags = t.customer, t.intent, t.prompt_version, t.tags
        rec.session_id = t.session_id
        user, cap = t.end_user, self._max_user_chars
        if len(user) > cap:
            rec.truncated = {"user": len(user)}
            # redact a margin past the cut, so a secret straddling it is replaced whole before the cut
            rec.end_user = self.redactor.text(user[:cap + 256])[:cap]
        elif user:
            rec.end_user = self.redactor.text(user)
        # Replay marks its calls so that slices and stats can tell them from production; only keys that may speak
        # for other customers (the admin key, platform keys: what the replay runner uses) may set those marks.
        source = normalise(tw["source"]) if tw.get("source") else ""
        replay = [(attr, tw[h][:128]) for h, attr in _REPLAY_HEADERS if tw.get(h)]
        if (replay or source in NON_PRODUCTION_SOURCES) and not call.principal.may_set_customer:
            # Still recorded, but as what it claimed to be: a refused replay attempt is no production error.
            rec.source = source if source in NON_PRODUCTION_SOURCES else REPLAY_SOURCE
            call.resolved = True
            raise forbidden("Only the admin key or a key that may set its customer can mark calls as replay.",
                            code="replay_marks_not_allowed", param="x-tagway-source")
        if source:
            rec.source = source
        rec.replay.update(replay)
        call.resolved = True

    # -- forwarding with fallbacks ------------------------------------------------------------------------------
    async def _forward(self, call: Call, first: ModelConfig) -> None:
        chain = self.routes.chain(call.rec.requested_model)
        opts = call.payload.get("stream_options")
        call.client_wants_usage = bool(call.stream and isinstance(opts, dict) and opts.get("include_usage") is True)
        failure: UpstreamFailure | None = None
        last = first
        cooldowns = self.cooldowns
        for d in chain:
            if d is not first and not self._allows(call, d.name):
                call.rec.skipped = [*(call.rec.skipped or ()), d.name]  # a fallback this tenant may not use
                continue
            probe = False  # this call is the one that tries a deployment whose cooldown is over
            if cooldowns.failing:  # some deployment fails or cools (almost never: the cheap test, every call)
                if cooldowns.cooling(d.name) and self._another(call, chain, chain.index(d)):
                    call.rec.cooling = [*(call.rec.cooling or ()), d.name]  # it kept failing: its fallback answers
                    cooldowns.pass_over(d.name)
                    continue
                probe = cooldowns.trying(d.name)
            if failure is not None:  # the one before failed: this call moves on to a fallback it may use
                self.stats.fallbacks += 1
            attempt = call.rec.begin_attempt(d, self.routes.address(d), time.time_ns())
            last = d
            try:
                result = await self._try(call, d)
            except UpstreamFailure as f:
                attempt.end_ns, attempt.error_type, attempt.status = time.time_ns(), f.error_type, f.status or 0
                failure = f
                if not f.retryable:
                    if probe:  # the request's fault, not the deployment's: the next call tries it
                        cooldowns.ended(d.name)
                    break
                cooldowns.failed(d.name, f.error_type)
                continue
            except BaseException:  # cancelled, the client gone: no word on the deployment
                if probe:
                    cooldowns.ended(d.name)
                raise
            if cooldowns.failing:
                cooldowns.answered(d.name)
            attempt.end_ns, attempt.status = time.time_ns(), 200
            if isinstance(result, UpstreamResponse):
                await self._respond_whole(call, d, result)
            elif call.operation in WIRES:
                await self._relay_wire_stream(call, d, result, WIRES[call.operation])
            else:
                await self._relay_stream(call, d, result)
            return
        if failure is None:  # pragma: no cover - the first deployment is always tried
            raise GatewayError(502, "No deployment could serve this call.", type_="api_error", code="no_deployment")
        raise self._final_error(failure, _sent_upstream(call.forward_headers, last))

    def _another(self, call: Call, chain: list[ModelConfig], i: int) -> bool:
        """A deployment after chain[i] that this call may use and that is not cooling down."""
        return any(self._allows(call, d.name) and not self.cooldowns.cooling(d.name) for d in chain[i + 1:])

    async def _try(self, call: Call, d: ModelConfig) -> UpstreamResponse | _Opened:
        """One deployment: its whole answer, or its stream once the first event is in (a stream that ends before
        any event is a failure, so the next deployment can still answer)."""
        ask_usage = call.stream and not call.client_wants_usage and call.operation not in WIRES and d.stream_usage \
            and d.name not in self._usage_refused
        up_payload, up_body = body_for(call.payload, call.body, d, ask_usage, call.operation)
        provider = self.providers.for_deployment(d, call.operation)
        try:
            result = await provider.send(UpstreamCall(d, call.operation, call.upstream_path, up_body, up_payload,
                                                      call.stream, call.forward_headers))
        except UpstreamFailure as f:
            if not (ask_usage and refuses_stream_options(f.status, f.body, call.payload)):
                raise
            # the field tagway added, refused: once more without it; and, once that is answered, never again for
            # this deployment (its streams' tokens are then estimated)
            up_payload, up_body = body_for(call.payload, call.body, d, False, call.operation)
            result = await provider.send(UpstreamCall(d, call.operation, call.upstream_path, up_body, up_payload,
                                                      call.stream, call.forward_headers))
            if d.name not in self._usage_refused:
                self._usage_refused.add(d.name)
                log.warning("model %r: the upstream refused stream_options (HTTP %s); its streams go without it "
                            "from now on and their tokens are estimated (`stream_usage: false` on the model skips "
                            "this first refusal)", d.name, f.status)
        if isinstance(result, UpstreamResponse):
            # a protocol error keeps the upstream's headers: its x-request-id is what its support asks for
            if call.stream:  # e.g. a server that ignores `stream`: relaying its JSON would break the client's parser
                raise UpstreamFailure("protocol_error", "upstream answered a stream request with "
                                      f"{result.content_type.split(';')[0] or 'no content type'}, not an event stream",
                                      headers=result.headers)
            try:
                result.parsed = orjson.loads(result.body)
            except orjson.JSONDecodeError:
                result.parsed = None
            if not isinstance(result.parsed, dict):
                raise UpstreamFailure("protocol_error", "upstream answered with a body that is not a JSON object",
                                      headers=result.headers)
            return result
        if not call.stream:
            await result.aclose()
            raise UpstreamFailure("protocol_error", "upstream answered a non-stream request with an event stream",
                                  headers=getattr(result, "headers", ()))
        events = result.__aiter__()
        try:
            return _Opened(result, events, await events.__anext__())
        except StopAsyncIteration:
            await result.aclose()
            raise UpstreamFailure("stream_cut", "upstream closed the stream before any event") from None
        except BaseException:
            await result.aclose()
            raise

    def _final_error(self, f: UpstreamFailure, forwarded: list[tuple[bytes, bytes]] = ()) -> GatewayError:
        """All deployments failed: relay the last upstream answer (secrets scrubbed, its retry advice and request id
        kept), or say what happened. `forwarded`: the client's headers that went upstream."""
        e = self._final_error_body(f, forwarded)
        e.headers = with_own_headers(e, self._return_headers.pick(f.headers))
        return e

    def _final_error_body(self, f: UpstreamFailure, forwarded: list[tuple[bytes, bytes]]) -> GatewayError:
        if f.status in UPSTREAM_AUTH_STATUS:
            return upstream_auth_error(f.status, self._scrub(f.body) if f.body else None, f.error_type, forwarded)
        if f.status and f.body:
            body = self._scrub(f.body)
            try:
                obj = orjson.loads(body)
                err = obj.get("error") if isinstance(obj, dict) else None
            except orjson.JSONDecodeError:
                err = None
            if isinstance(err, dict):
                return GatewayError(f.status, str(err.get("message") or f.message),
                                    type_=str(err.get("type") or "api_error"),
                                    code=err.get("code") if isinstance(err.get("code"), str) else None,
                                    error_type=f.error_type, raw=body)  # the upstream's own bytes, relayed
            return GatewayError(f.status, f.message, type_="api_error", code="upstream_error", error_type=f.error_type)
        if f.error_type == "protocol_error":
            return GatewayError(502, f"Upstream protocol error: {f.message}.", type_="api_error",
                                code="upstream_protocol_error", error_type="protocol_error")
        if f.error_type == "timeout":
            return GatewayError(504, f"Upstream timed out: {f.message}.", type_="api_error", code="upstream_timeout",
                                error_type="timeout")
        return GatewayError(502, f"Upstream unavailable: {f.message}.", type_="api_error", code="upstream_unavailable",
                            error_type=f.error_type)

    def _scrub(self, body: bytes) -> bytes:
        for s in self._secrets:
            if s in body:
                body = body.replace(s, b"***")
        return body

    # -- answers ------------------------------------------------------------------------------------------------
    async def _respond_whole(self, call: Call, d: ModelConfig, result: UpstreamResponse) -> None:
        rec = call.rec
        body = self._scrub(result.body) if self._secrets else result.body
        obj: Any = result.parsed if body is result.body else orjson.loads(body)  # parsed once, unless scrubbed
        extra = self._return_headers.pick(result.headers)
        wire = WIRES.get(call.operation)
        if isinstance(obj, dict) and wire is not None:  # Responses, Anthropic messages: their own shapes
            self._read_usage(obj.get("usage"), rec, d)
            rec.answered(obj.get("model"), obj.get("id"), wire.finish_reasons(obj))
            if call.capture:
                call.answer, call.answer_bytes = obj, len(result.body)
            if rec.cost_usd is not None:
                extra.append((b"x-tagway-cost-usd", b"%.10f" % rec.cost_usd))
        elif isinstance(obj, dict):
            self._read_usage(obj.get("usage"), rec, d)
            choices = obj.get("choices")
            has_choices = isinstance(choices, list)  # embeddings answer `data`, not choices
            rec.answered(obj.get("model"), obj.get("id"),
                         [str(c.get("finish_reason") or "") for c in choices if isinstance(c, dict)]
                         if has_choices else [])
            if call.capture and has_choices:
                call.answer, call.answer_bytes = choices, len(body)
            if rec.cost_usd is not None:
                extra.append((b"x-tagway-cost-usd", b"%.10f" % rec.cost_usd))
        self._own(call, rec.response_id)
        await call.respond(200, body, result.content_type.encode("latin-1"), extra)

    def _own(self, call: Call, rid: str) -> None:
        """A stored response or completion is its caller's before the client can name it: a follow-up turn
        (`previous_response_id`) may come the moment the answer, or a stream's first event, arrives. (Recorded after
        capture, a long call's own id was refused to it for as long as capture ran on a worker thread.)"""
        if self.owners is not None and rid and _stored(call):
            self.owners.created(rid, call.rec.customer)

    def _read_usage(self, usage: Any, rec: CallRecord, d: ModelConfig) -> None:
        if not isinstance(usage, dict):
            return
        rec.usage(usage.get("prompt_tokens", usage.get("input_tokens")),
                  usage.get("completion_tokens", usage.get("output_tokens", 0)))
        rec.detail_usage(usage)
        if rec.input_tokens is not None:
            rec.cost_usd = self.pricing.cost(d, rec.input_tokens, rec.output_tokens or 0)

    def _estimate_usage(self, call: Call, d: ModelConfig, generated_chars: int) -> None:
        """A stream cut short (the client hung up, the upstream broke off): the provider bills the prompt and what
        it generated, so the record carries estimated counts and their cost, marked as estimates. A prompt count
        the stream already gave (Anthropic's message_start) is kept; its output count there is a stub."""
        rec = call.rec
        prompt = rec.input_tokens or estimate_prompt_tokens(call.payload, call.operation)
        rec.usage(prompt, max(rec.output_tokens or 0, tokens_of_chars(generated_chars)))
        rec.usage_estimated = True
        rec.cost_usd = self.pricing.cost(d, rec.input_tokens, rec.output_tokens or 0)

    async def _relay_stream(self, call: Call, d: ModelConfig, opened: _Opened) -> None:
        rec = call.rec
        acc = StreamAccumulator(call.capture)
        if call.capture:
            call.answer = acc
        done = failed = owned = False  # failed: the upstream's own error event came (OpenAI ends the stream there)
        await call.start(200, [*_SSE_HEADERS, *self._return_headers.pick(getattr(opened.stream, "headers", ()))])
        event: bytes | None = opened.first
        last = b""  # what ends the stream besides the upstream's events
        try:
            while event is not None:
                if self._secrets:
                    event = self._scrub(event)
                data = event_data(event)
                relay = True
                if data == b"[DONE]":
                    done = True
                elif data:
                    obj = json_object(data)
                    if obj is not None:
                        if obj.get("error"):
                            rec.fail("upstream_stream_error", str(obj["error"])[:500])
                            failed = True
                        usage = obj.get("usage")
                        if usage:
                            self._read_usage(usage, rec, d)
                            relay = call.client_wants_usage or bool(obj.get("choices"))
                        acc.add(obj)
                        if not owned and acc.id:  # a stored completion's id, before the client has it
                            self._own(call, acc.id)
                            owned = True
                if relay:
                    if rec.ttft_s is None and data and data != b"[DONE]":
                        rec.ttft_s = (time.time_ns() - rec.start_ns) / 1e9
                    call.answer_bytes += len(event)
                    await call.chunk(event)
                if done:
                    break
                try:
                    event = await opened.events.__anext__()
                except StopAsyncIteration:
                    event = None
            if not done and not failed:  # after its error event the client has the upstream's own word
                raise UpstreamFailure("stream_cut", "upstream ended the stream without [DONE]")
        except UpstreamFailure as f:
            # bytes already reached the client: no fallback is possible; end with an error event the SDK raises on
            rec.fail(f.error_type, f.message)
            await call.chunk(openai_error_event(f"Upstream stream failed: {f.message}.", f.error_type))
        except OSError:  # a send to a client that has gone
            rec.hung_up("mid-stream")
        except asyncio.CancelledError:
            if not call.watch.client_gone:  # the shutdown grace is over: an error the SDKs raise, not a silent cut
                last = shutdown_event(openai_error_event)
            raise
        finally:  # a stream cut or cancelled before its usage chunk, or without one, is billed all the same
            await self._end_relayed(call, d, opened, cut=rec.input_tokens is None, chars=acc.chars,
                                    answer=(acc.model, acc.id, acc.finish_reasons()), last=last)


def _sent_upstream(forwarded: list[tuple[bytes, bytes]], d: ModelConfig) -> list[tuple[bytes, bytes]]:
    """The client's headers that went with a deployment's request: an OpenAI-compatible provider sends them unless
    the deployment sets the same header itself; litellm's translation sends none."""
    if not forwarded or kind_of(d.provider) != "pass_through":
        return []
    own = {k.lower().encode("latin-1") for k in d.headers}
    return [(k, v) for k, v in forwarded if k not in own]


def _stored(call: Call) -> bool:
    """The answer is kept by the provider, retrievable by its id: a response unless `store: false`, a chat
    completion with `store: true`."""
    store = call.payload.get("store") if isinstance(call.payload, dict) else None
    return store is not False if call.operation == "responses" else call.operation == "chat" and store is True
