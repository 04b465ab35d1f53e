"""The OpenAI routes beyond the hot ones (gateway/routes_table.py: stored chat completions, responses by id,
moderations, images, audio, files, batches, conversations, vector stores, deleting a fine-tuned model), passed
through to an OpenAI-compatible upstream: authorised, tagged and recorded as a span with the route's operation,
like every call.

Which upstream: the request's model (JSON `model`, a multipart `model` field, or `x-tagway-model` for routes that
carry none) routed like the hot path's; for a resource id tagway has seen (a file, batch, stored completion or
response id in an answer that went through here) the upstream that answered it; otherwise the `*` default route,
or the one OpenAI-compatible upstream when there is only one. Bodies go out as the client's bytes (the model name
rewritten when the deployment's differs); answers come back as they are, streamed (file contents, audio, SSE), with
the allow-listed upstream headers. Upstreams that are not OpenAI-compatible (translated by litellm) do not serve
these routes: a clear 501.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from collections import OrderedDict
from typing import Any, Callable

import aiohttp
import orjson

from .auth import CREDENTIAL_HEADERS, KeyRing, duplicate_header
from .call import Call, ClientGone
from .config import GatewayConfig, ModelConfig
from .errors import (UPSTREAM_AUTH_STATUS, GatewayError, bad_request, forbidden, upstream_auth_error,
                     upstream_message, with_own_headers)
from .headers import HeaderFilter, KeyScope
from .model_routes import ModelRoutes
from .providers import ProviderRegistry, UpstreamFailure, kind_of
from .providers.litellm_provider import TRANSLATED_RESPONSE_PREFIX
from .providers.sse import json_object
from .redact import Redactor
from .resources import (CREATING_APIS, ResourceOwners, as_not_found, batch_files, batch_input_ids, not_found,
                        referenced_ids)
from .routes_table import PART_PARAMS, Route, check_resource_id, strip_version
from .tags import check_header, resolve_tags
from .telemetry import CallRecord, CallSpans

__all__ = ["Passthrough"]

log = logging.getLogger("tagway.passthrough")

_READ_WHOLE = 1 << 20  # JSON answers up to this size are read whole (ids, usage, model for the record)
_LIST_PAGES = 5  # upstream pages a tenant's filtered list reads at most for one of its own
_UPSTREAM_PAGE = 100  # items an upstream page of a tenant's list asks for (the largest OpenAI's lists all give)
_OWNERS_MAX = 100_000  # resource ids remembered with the upstream that holds them
_MULTIPART_MODEL = re.compile(rb'(name="model"\r\n(?:[^\r\n]+\r\n)*\r\n)([^\r\n]*)(\r\n)')


class Passthrough:
    def __init__(self, *, config: GatewayConfig, keyring: KeyRing, providers: ProviderRegistry, routes: ModelRoutes,
                 tracer: Any, redactor: Redactor, owners: ResourceOwners | None = None,
                 observe: Callable[..., None] | None = None, cut_at_shutdown: Callable[[], None] | None = None) -> None:
        self.owners = owners  # whose files, batches and responses are whose (api.tenant_resources: isolated)
        self.config, self.keyring, self.providers, self.routes = config, keyring, providers, routes
        self.spans, self.redactor = CallSpans(tracer), redactor
        self._forward_headers = HeaderFilter(config.api.forward_headers)
        self._return_headers = HeaderFilter(config.api.return_headers)
        self._max_body = config.server.max_body_bytes
        self._owners: OrderedDict[str, str] = OrderedDict()  # resource id -> model name that reaches its upstream
        self._secrets = sorted({m.api_key.encode() for m in config.models if m.api_key and len(m.api_key) >= 6},
                               key=len, reverse=True)
        self._key_scope = KeyScope(b"\0".join(sorted(self._secrets)))  # as the hot path's (gateway/headers.py)
        self._tenants = {t.customer: t for t in config.tenants}
        self.calls = 0
        # the hot path's metrics and access log, and its count of calls cut at the shutdown deadline: one place each
        self._observe = observe
        self._cut_at_shutdown = cut_at_shutdown

    async def __call__(self, scope: dict, receive: Any, send: Any, route: Route, params: dict[str, str]) -> None:
        start_ns, t0 = time.time_ns(), time.perf_counter()
        rec = CallRecord(operation=route.operation, source=self.config.recording.source, start_ns=start_ns,
                         api=route.api, output_type=route.output_type or "")
        call = Call((route.operation, scope["path"]), scope, receive, send, rec)
        ids = self.spans.begin(call.traceparent)
        call.trace_id = ids.header
        self.calls += 1
        try:
            await self._handle(call, scope, route, params)
        except GatewayError as e:
            rec.fail(e.error_type, e.message, e.status)
            if not call.started:
                await call.respond_error(e)
        except UpstreamFailure as f:
            e = _failure_error(f)
            rec.fail(e.error_type, e.message, e.status)
            if not call.started:
                await call.respond_error(e)
        except ClientGone:
            rec.hung_up("before the response")
        except OSError:
            rec.hung_up("mid-response")
        except asyncio.CancelledError:
            # uvicorn's cut at the shutdown deadline, as on the hot path (a relayed body ends short): it ends here
            if self._cut_at_shutdown is not None:
                self._cut_at_shutdown()
            await call.answer_shutdown()
        except Exception as e:  # a bug of ours: the client gets a 500, the record is still written
            log.exception("internal error on %s %s", scope["method"], scope["path"])
            rec.fail("internal_error", type(e).__name__, 500)
            if not call.started:
                await call.respond_error(GatewayError(500, "Internal gateway error.", type_="api_error",
                                                      code="internal_error"))
        finally:
            try:
                self.spans.finish(ids, rec, start_ns, start_ns + int((time.perf_counter() - t0) * 1e9))
            except Exception:
                log.exception("could not record call")
            if self._observe is not None:  # metrics and the access line (the observer never raises)
                self._observe(rec, ids.trace_id, time.perf_counter() - t0)

    async def _handle(self, call: Call, scope: dict, route: Route, params: dict[str, str]) -> None:
        rec = call.rec
        if call.repeated in CREDENTIAL_HEADERS:  # as on the hot path: a credential sent twice is refused, not guessed
            self.keyring.refused("duplicate_header")
            raise duplicate_header(call.repeated)
        principal = call.principal = self.keyring.authenticate(call.auth, call.api_key, call.other_api_key)
        rec.key_id, rec.customer = principal.key_id, principal.customer
        if call.repeated:
            raise duplicate_header(call.repeated)
        for name, value in params.items():
            check_resource_id(name, value)
        body = await call.read_body(self._max_body)
        content_type = _header(scope, b"content-type")
        payload: dict = {}
        if route.body == "json" and body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as e:
                raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
            if not isinstance(payload, dict):
                raise bad_request("The request body must be a JSON object.", code="invalid_json")
        model = rec.requested_model = _model_of(route, payload, body, content_type) or \
            call.tagway_headers.get("model", "")
        for name, value in call.tagway_headers.items():
            check_header(f"x-tagway-{name}", value)
        t = resolve_tags(principal, call.tagway_headers, payload if "metadata" in payload else {}, self.config.taxonomy,
                         self.redactor.text)
        rec.customer, rec.intent, rec.prompt_version, rec.tags = t.customer, t.intent, t.prompt_version, t.tags
        d = self._deployment(model, params, route, scope)
        tenant = principal.tenant if rec.customer == principal.customer else self._tenants.get(rec.customer)
        if model and not (principal.allows(model) and (tenant is None or tenant is principal.tenant
                                                       or tenant.allows(model))):
            raise forbidden(f"This key may not use model `{model}`.", code="model_not_allowed", param="model")
        # a tenant key reaches its tenant's resources only, and lists only those (api.tenant_resources: isolated)
        mine_only = principal.customer if self.owners is not None and not principal.may_set_customer else None
        wanted = None  # a tenant key's: the (field, id) its request names, path and body
        if mine_only is not None:
            wanted = await self._check_owned(route, params, payload or _json_or_empty(body, content_type), mine_only,
                                             body, content_type, scope.get("query_string", b"").decode("latin-1"))
        provider = self.providers.for_deployment(d)
        if kind_of(d.provider) != "pass_through" or not hasattr(provider, "open"):
            raise GatewayError(501, f"{scope['method']} {scope['path']} is passed through to OpenAI-compatible "
                               f"upstreams only; the upstream of `{model or d.name}` is {d.provider}.",
                               type_="invalid_request_error", code="route_not_supported",
                               headers=[(b"x-should-retry", b"false")])  # a 5xx that retrying will not change
        rec.begin_attempt(d, self.routes.address(d), time.time_ns())
        if not model:
            rec.upstream_model = rec.attempts[-1].model = ""  # a resource route: no model involved
        if model and d.upstream_model != model:
            body = _with_model(route, payload, body, d.upstream_model)
        path = strip_version(scope["path"])
        query = scope.get("query_string", b"").decode("latin-1")
        forward = self._forward_headers.pick(scope["headers"]) if self._forward_headers else []
        if forward:  # a tenant key's org/project stay behind; idempotency keys get its tenant's namespace
            forward = self._key_scope.fit(forward, principal.customer, not principal.may_set_customer)
        list_for = mine_only if route.method == "GET" and not params else None
        asked = _list_limit(query)
        if list_for is not None:  # upstream pages as large as they come: fewer pages to read past others' items
            query = _with_param(query, "limit", str(_UPSTREAM_PAGE))
        resp = await provider.open(d, route.method, path, query=query, body=body or None, headers=forward,
                                   content_type=content_type if body else None)

        async def next_page(after: str) -> bytes | None:  # the list's next upstream page (tenant lists scan on)
            page = await provider.open(d, "GET", path, query=_with_param(query, "after", after), body=None,
                                       headers=forward, content_type=None)
            try:
                return self._scrub(await page.read()) if page.status == 200 else None
            finally:
                page.release()

        try:
            await self._relay(call, d, resp, model, forward, route, list_for, (next_page, asked), wanted, mine_only)
        finally:
            resp.release()

    async def _check_owned(self, route: Route, params: dict[str, str], payload: dict, customer: str,
                           body: bytes, content_type: str | None, query: str = "") -> list[tuple[str, str]]:
        if route.api == "models.delete":  # the account's models, not any tenant's
            raise forbidden("Deleting a model is the provider account's: it takes a platform or the admin key "
                            "(api.tenant_resources: isolated).", code="permission_denied", param="model")
        # the resource the path names; a part of it (a conversation's item) is found only inside it, so the
        # resource's owner decides: the part is named for the 404s only (`_relay`), not looked up
        wanted = [(name, rid) for name, rid in params.items()]
        parts = [w for w in wanted if w[0] in PART_PARAMS]
        if route.method == "GET" and query and not params:  # a list's cursor: another tenant's id would say it exists
            # (a list inside a resource, its input items or messages, pages by ids of its own parts: not checked)
            wanted += [(k, v) for k, v in urllib.parse.parse_qsl(query) if k in ("after", "before") and v]
        wanted += referenced_ids(payload)  # a batch's input file, a response's predecessor, file parts
        if route.api == "files.create" and body and content_type:  # a batch's input: the requests in its lines
            wanted += await asyncio.get_running_loop().run_in_executor(None, batch_input_ids, body, content_type)
        await self.owners.refuse_foreign([w for w in wanted if w not in parts] if parts else wanted, customer)
        return wanted

    def _deployment(self, model: str, params: dict[str, str], route: Route, scope: dict) -> ModelConfig:
        if model:
            d = self.routes.resolve(model)
            if d is None:
                raise GatewayError(404, f"The model `{model}` does not exist or you do not have access to it.",
                                   code="model_not_found", param="model")
            return d
        if params.get("id", "").startswith(TRANSLATED_RESPONSE_PREFIX):  # a translated provider's: stored nowhere
            raise GatewayError(501, f"{scope['method']} {scope['path']}: the response was made by a provider tagway "
                               "translates (litellm), which keeps no responses; stored-response routes are passed "
                               "through to OpenAI-compatible upstreams only.", type_="invalid_request_error",
                               code="route_not_supported", headers=[(b"x-should-retry", b"false")])
        owner = self._owners.get(params.get("id", ""))
        if owner is not None:
            d = self.routes.resolve(owner)
            if d is not None:
                return d
        d = self.routes.modelless()
        if d is not None:
            return d
        raise bad_request(f"{scope['method']} {scope['path']} carries no model, and tagway cannot tell which of its "
                          "upstreams serves it: send `x-tagway-model: <a model of that upstream>` or configure a `*` "
                          "model as the default upstream.", code="upstream_ambiguous")

    async def _relay(self, call: Call, d: ModelConfig, resp: Any, model: str, forward: list[tuple[bytes, bytes]],
                     route: Route, list_for: str | None, paging: tuple[Any, int] = (None, 0),
                     wanted: list[tuple[str, str]] | None = None, mine: str | None = None) -> None:
        """`mine`: the customer of a tenant key (api.tenant_resources: isolated), else None; `list_for`: the
        customer a list answer is filtered to (its items that customer owns), or None;
        `paging`: the upstream's next page of that list (`next_page(after)`) and how many items the client asked
        for; `wanted`: what a tenant key's request names (path first), whose "no such resource" is answered as the
        gateway's refusal of another tenant's is."""
        rec = call.rec
        ctype = resp.headers.get("Content-Type", "")
        headers = [(b"content-type", ctype.encode("latin-1"))] if ctype else []
        disposition = resp.headers.get("Content-Disposition")  # a file download's name
        if disposition:
            headers.append((b"content-disposition", disposition.encode("latin-1")))
        headers += self._return_headers.pick(resp.raw_headers)
        attempt = rec.attempts[-1]
        attempt.end_ns, attempt.status = time.time_ns(), resp.status
        json_answer = ctype.lower().startswith("application/json")
        if list_for is not None and resp.status < 400 and not json_answer:  # unfiltered, it would show everyone's
            raise _unreadable_list()
        whole = json_answer and (list_for is not None or (resp.content_length or 0) <= _READ_WHOLE)
        if resp.status >= 400 or whole:
            body = self._scrub(await resp.read())
            if resp.status >= 400:
                attempt.error_type = f"http_{resp.status}"
                rec.fail(attempt.error_type, _error_message(body, resp.status), resp.status)
                if resp.status in UPSTREAM_AUTH_STATUS:  # the gateway's provider key, not the client's: a 502
                    e = upstream_auth_error(resp.status, body, attempt.error_type, forward)
                    relayed = [h for h in headers if h[0] not in (b"content-type", b"content-disposition")]
                    await call.respond(e.status, e.body(), b"application/json", with_own_headers(e, relayed))
                    return
                if wanted:  # an id in the path that is not there, or one the body names: as another tenant's
                    path_id = [(n, rid) for n, rid in wanted if params_named(route, n)]
                    # the id the provider's error names first (a body's file_id missing from a tenant's own vector
                    # store was told as the vector store); a bare 404 is the path's innermost id (an item, else the
                    # resource)
                    e = as_not_found(GatewayError(resp.status, "", raw=body),
                                     [w for w in wanted if w not in path_id] + path_id[::-1])
                    if e.code == "resource_not_found":
                        raise e
                    if resp.status == 404 and path_id:
                        raise not_found(path_id[-1][1], path_id[-1][0])
            else:
                self._read_answer(rec, body, d, model, spends=_spends(route))
                if list_for is not None:
                    body = await self._own_items(body, list_for, *paging)
                elif route.api in CREATING_APIS and rec.response_id:
                    rec.creates_resource = True  # whose it is, in the record (exporters/schema.py resource_owners)
                    if self.owners is not None:
                        self.owners.created(rec.response_id, rec.customer)
                if mine and route.api.startswith("batches.") and rec.customer == mine:
                    # a batch's output and error files are its owner's (the provider makes them; they are named
                    # only in the batch objects, which a tenant key reaches for its own batches only)
                    rec.owns_resources = self.owners.made_known(batch_files(json_object(body)), mine)
            await call.respond(resp.status, body, ctype.encode("latin-1") or b"application/json",
                               [h for h in headers if h[0] != b"content-type"])
            return
        call.watch.stop()
        await call.start(resp.status, headers)
        try:
            async for chunk in resp.content.iter_any():
                if rec.ttft_s is None:
                    rec.ttft_s = (time.time_ns() - rec.start_ns) / 1e9
                await call.chunk(self._scrub(chunk) if self._secrets else chunk)  # a key cut across chunks can slip
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # the upstream broke off: the client sees the cut
            rec.fail("stream_cut", f"upstream broke off mid-response: {type(e).__name__}")
        await call.end_stream()

    def _read_answer(self, rec: CallRecord, body: bytes, d: ModelConfig, model: str, *, spends: bool = True) -> None:
        """`spends`: the call made what its answer's usage counts (not a stored object read back: _spends)."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        rid = obj.get("id")
        rec.answered(obj.get("model"), rid if isinstance(rid, str) else "", [])
        usage = obj.get("usage")
        if spends and isinstance(usage, dict):
            rec.usage(usage.get("input_tokens", usage.get("prompt_tokens")),
                      usage.get("output_tokens", usage.get("completion_tokens")))
        owner = model or d.name
        if owner.endswith("*"):  # the default route: it is where a model-less request goes anyway
            return
        ids = [rid] if isinstance(rid, str) else []
        if isinstance(obj.get("data"), list):  # lists: every item's id lives where the list came from
            ids += [x["id"] for x in obj["data"] if isinstance(x, dict) and isinstance(x.get("id"), str)]
        for i in ids:
            self._owners[i] = owner
            self._owners.move_to_end(i)
        while len(self._owners) > _OWNERS_MAX:
            self._owners.popitem(last=False)

    async def _own_items(self, body: bytes, customer: str, next_page: Any, limit: int) -> bytes:
        """A list answer with only the items `customer` owns. Other tenants' items would leave a page short or
        empty (and the SDKs stop paging at an empty one): the upstream's next pages are read on, up to
        _LIST_PAGES, until `limit` own items are found; the client's next page starts after the last one shown."""
        obj = json_object(body)
        items = obj.get("data") if obj is not None else None
        if not isinstance(items, list):  # passed on as it is, it could hold every tenant's items
            raise _unreadable_list()
        kept: list = []
        for pages in range(1, _LIST_PAGES + 1):
            ids = [x["id"] for x in items if isinstance(x, dict) and isinstance(x.get("id"), str)]
            mine = await self.owners.owned(ids, customer) if ids else set()
            kept += [x for x in items if isinstance(x, dict) and x.get("id") in mine]
            if len(kept) >= limit or not obj.get("has_more") or not ids or pages == _LIST_PAGES:
                break
            more = await next_page(ids[-1])
            page = json_object(more) if more is not None else None
            if page is None or not isinstance(page.get("data"), list):
                if not kept:  # an empty 200 would end the client's paging as if there were nothing more
                    raise GatewayError(502, "The upstream's next page of this list failed; retry the request.",
                                       type_="api_error", code="upstream_list_failed")
                obj["has_more"] = True
                break
            obj, items = page, page["data"]
        obj["data"] = kept[:limit]
        obj["has_more"] = bool(obj.get("has_more")) or len(kept) > limit
        for key, at in (("first_id", 0), ("last_id", -1)):
            if key in obj:
                obj[key] = obj["data"][at]["id"] if obj["data"] else None
        return orjson.dumps(obj)

    def _scrub(self, body: bytes) -> bytes:
        for s in self._secrets:
            body = body.replace(s, b"***")
        return body


def _spends(route: Route) -> bool:
    """Whether the usage in the route's answer was spent by this call: a stored response or completion read back,
    updated, cancelled or listed carries the usage of the call that made it (counted then), not this one's."""
    return route.method == "POST" and not route.api.endswith((".cancel", ".update"))


def params_named(route: Route, name: str) -> bool:
    """Whether `name` is one of the route's path parameters."""
    return "{" + name + "}" in route.path


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def _model_of(route: Route, payload: dict, body: bytes, content_type: str | None) -> str:
    if route.body == "json":
        m = payload.get("model")
        if m is not None and not isinstance(m, str):
            raise bad_request("model must be a string.", code="invalid_type", param="model")
        return m or ""
    if route.body == "multipart" and content_type and content_type.startswith("multipart/form-data"):
        m = _MULTIPART_MODEL.search(body)
        return m.group(2).decode("utf-8", "replace") if m else ""
    return ""


def _with_model(route: Route, payload: dict, body: bytes, upstream_model: str) -> bytes:
    """The body with the deployment's model name (a wildcard or renamed deployment)."""
    if route.body == "json":
        return orjson.dumps({**payload, "model": upstream_model})
    return _MULTIPART_MODEL.sub(lambda m: m.group(1) + upstream_model.encode() + m.group(3), body, count=1)


def _error_message(body: bytes, status: int) -> str:
    return upstream_message(body) or f"upstream answered HTTP {status}"


def _failure_error(f: UpstreamFailure) -> GatewayError:
    if f.error_type == "timeout":
        return GatewayError(504, f"Upstream timed out: {f.message}.", type_="api_error", code="upstream_timeout",
                            error_type="timeout")
    return GatewayError(502, f"Upstream unavailable: {f.message}.", type_="api_error", code="upstream_unavailable",
                        error_type=f.error_type)


def _json_or_empty(body: bytes, content_type: str | None) -> dict:
    """A JSON body on a route whose model may come in multipart (the JSON form of images.edits names files by
    id): read for the resources it names."""
    if not body or not (content_type or "").lower().startswith("application/json"):
        return {}
    return json_object(body) or {}


def _unreadable_list() -> GatewayError:
    return GatewayError(502, "The upstream answered this list in a form the gateway cannot filter to this key's "
                        "items.", type_="api_error", code="upstream_protocol_error")


def _with_param(query: str, name: str, value: str) -> str:
    """The query string with `name` set to `value` (a tenant's list: the upstream's page size, the next page)."""
    pairs = [(k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True) if k != name]
    return urllib.parse.urlencode([*pairs, (name, value)])


def _list_limit(query: str) -> int:
    """The page size a list request asks for (`limit`, 1-100; 20 when it says none, as most of OpenAI's lists)."""
    for k, v in urllib.parse.parse_qsl(query):
        if k == "limit" and v.isdigit():
            return min(max(int(v), 1), 100)
    return 20
