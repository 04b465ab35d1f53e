"""OpenAI-compatible upstreams (OpenAI, Azure OpenAI, vLLM, Ollama, any /v1 server) through one shared, pooled
aiohttp session. Bodies go out as the bytes we were given; nothing is re-validated here.

aiohttp, not httpx, on this path: measured in DESIGN.md, httpx's default transport collapses under concurrency
(~310 req/s vs ~2,000+ for aiohttp behind the same app).
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator
from urllib.parse import quote

import aiohttp

from .base import UpstreamCall, UpstreamFailure, UpstreamResponse
from .names import base_url
from .sse import iter_events

if TYPE_CHECKING:  # config imports the provider registry: no import back at run time
    from ..config import ModelConfig

__all__ = ["OpenAICompatibleProvider"]


class _Prepared:
    """Per-deployment values computed once: URL prefix, headers, timeouts."""

    __slots__ = ("url_prefix", "query", "root", "root_query", "headers", "own", "timeout", "stream_timeout")

    def __init__(self, d: ModelConfig) -> None:
        self.headers = {"Content-Type": "application/json", "User-Agent": "tagway", **d.headers}
        key = d.api_key
        if d.provider == "azure":
            # the deployment is one path segment, quoted whatever a wildcard let through (model_routes refuses / .. ?)
            self.url_prefix = f"{base_url(d)}/openai/deployments/{quote(d.upstream_model, safe='')}"
            self.query = f"?api-version={d.api_version}"
            self.root, self.root_query = f"{base_url(d)}/openai", f"api-version={d.api_version}"
            if key:
                self.headers["api-key"] = key
        else:
            self.url_prefix = base_url(d)
            self.query = ""
            self.root, self.root_query = self.url_prefix, ""
            if key:
                self.headers["Authorization"] = f"Bearer {key}"
        # a client's header never replaces one of these (names lower-case bytes, as ASGI gives them)
        self.own = frozenset(k.lower().encode("latin-1") for k in self.headers)
        self.timeout = aiohttp.ClientTimeout(total=d.timeout, connect=d.connect_timeout)
        # a stream may last long; what must not happen is a silence longer than the timeout
        self.stream_timeout = aiohttp.ClientTimeout(total=None, connect=d.connect_timeout, sock_read=d.timeout)


class OpenAICompatibleProvider:
    _prepared_type = _Prepared  # per-deployment URL and auth (Anthropic's native provider has its own)

    def __init__(self, *, pool_size: int = 512) -> None:
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._prepared: dict[int, tuple[ModelConfig, _Prepared]] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=self._pool_size,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            # decompress: we read usage from the body, and the client gets plain JSON back
            # no skip_auto_headers: passing it sends aiohttp down a slow per-request header path (measured ~8% of
            # the gateway's CPU); our own User-Agent in the prepared headers keeps the fast one
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    def _prep(self, d: ModelConfig) -> _Prepared:
        # keyed by identity, holding the deployment so that its id cannot be reused while the entry lives;
        # wildcard routes make deployments per model name, hence the bound
        hit = self._prepared.get(id(d))
        if hit is not None and hit[0] is d:
            return hit[1]
        if len(self._prepared) >= 4096:
            self._prepared.clear()
        p = self._prepared_type(d)
        self._prepared[id(d)] = (d, p)
        return p

    async def send(self, call: UpstreamCall) -> UpstreamResponse | "_Stream":
        p = self._prep(call.deployment)
        url = p.url_prefix + call.path + p.query
        session = self._get_session()
        headers = p.headers
        if call.headers:
            headers = {**{k.decode("latin-1"): v.decode("latin-1") for k, v in call.headers if k not in p.own},
                       **p.headers}
        resp = await _issue(session.post(url, data=call.body, headers=headers,
                                         timeout=p.stream_timeout if call.stream else p.timeout), call.deployment)
        # what the upstream sent, judged by its content type: the proxy decides whether that is what was asked for
        if resp.status == 200 and resp.content_type == "text/event-stream":
            return _Stream(resp)
        try:
            body = await resp.read()
        except asyncio.TimeoutError:
            resp.release()
            raise UpstreamFailure("timeout", f"upstream did not answer within {call.deployment.timeout:g}s") from None
        except aiohttp.ClientError as e:
            raise UpstreamFailure("upstream_error", f"upstream response broke off: {type(e).__name__}") from None
        if resp.status != 200:
            raise UpstreamFailure.from_status(resp.status, body, resp.raw_headers)
        return UpstreamResponse(200, body, resp.headers.get("Content-Type", "application/json"), resp.raw_headers)

    async def open(self, d: ModelConfig, method: str, path: str, *, query: str = "", body: bytes | None = None,
                   headers: list[tuple[bytes, bytes]] = (), content_type: str | None = None) -> aiohttp.ClientResponse:
        """Any other request to the deployment's server (stored completions, responses by id, files, batches, the
        model list...): bytes out as given, the response returned unread for the caller to relay and release."""
        p = self._prep(d)
        q = "&".join(x for x in (query, p.root_query) if x)
        h = {**{k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k not in p.own}, **p.headers}
        if content_type:
            h["Content-Type"] = content_type
        else:
            h.pop("Content-Type", None)
        return await _issue(self._get_session().request(method, p.root + path + (f"?{q}" if q else ""), data=body,
                                                        headers=h, timeout=p.stream_timeout), d)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _issue(request: Any, d: ModelConfig) -> aiohttp.ClientResponse:
    """Await an aiohttp request; transport failures become `UpstreamFailure`s."""
    try:
        return await request
    except asyncio.TimeoutError:
        raise UpstreamFailure("timeout", f"upstream did not answer within {d.timeout:g}s") from None
    except aiohttp.ClientConnectorError as e:
        raise UpstreamFailure("connect_error", f"cannot connect to upstream: {e.os_error or e}") from None
    except aiohttp.ClientError as e:
        raise UpstreamFailure("upstream_error", f"upstream request failed: {type(e).__name__}") from None


class _Stream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.headers = resp.raw_headers

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for event in iter_events(self._resp.content.iter_any()):
                yield event
        except asyncio.TimeoutError:
            raise UpstreamFailure("timeout", "upstream stream went silent") from None
        except aiohttp.ClientPayloadError:
            raise UpstreamFailure("stream_cut", "upstream closed the stream mid-way") from None
        except aiohttp.ClientError as e:
            raise UpstreamFailure("stream_cut", f"upstream stream broke: {type(e).__name__}") from None

    async def aclose(self) -> None:
        self._resp.close()
