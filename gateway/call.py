"""One call on the hot path, as one object: what arrived (route, the few headers we read, the body), who sent it,
what we decided (stream, capture), where the response is, and the record that becomes its span. The proxy's
handlers pass a `Call`, not a dozen loose values, so a new feature joins the request path by adding a field here.

Sending goes through the call too: it knows whether the response has started (after which errors can only be
told in-band) and stops watching for a hang-up before the response completes.
"""
from __future__ import annotations

import asyncio
import zlib
from typing import Any

from .auth import Principal
from .config import TenantConfig
from .errors import GatewayError, shutting_down
from .telemetry import CallRecord

__all__ = ["Call", "ClientGone", "DisconnectWatch"]

_JSON = b"application/json"


class ClientGone(Exception):
    """The client disconnected before we answered."""


class Call:
    __slots__ = ("operation", "upstream_path", "receive", "send", "trace_id", "rec", "watch", "auth", "api_key",
                 "content_length", "tagway_headers", "traceparent", "principal", "body", "payload", "stream",
                 "client_wants_usage", "capture", "started", "answer", "answer_bytes", "repeated", "tenant",
                 "extra_headers", "limited", "forward_headers", "resolved", "api_key_from", "other_api_key",
                 "content_encoding")

    def __init__(self, route: tuple[str, str], scope: dict, receive: Any, send: Any, rec: CallRecord) -> None:
        self.operation, self.upstream_path = route
        self.receive, self.send = receive, send
        self.rec = rec
        self.trace_id = b""  # set once the span exists
        self.watch = DisconnectWatch()
        self.auth: str | None = None
        self.api_key: str | None = None
        self.api_key_from = b""  # which of api-key / x-api-key gave it
        self.other_api_key: str | None = None  # the other one, when both came (the same key, or a conflict)
        self.traceparent: str | None = None
        self.content_length = -1
        self.content_encoding = b""  # a compressed request body (gzip, deflate) is inflated by read_body
        self.tagway_headers: dict[str, str] = {}  # x-tagway-* by short name (customer, intent, tags, ...)
        self.repeated = ""  # a header that says who or what the call is, sent twice: a 400, never a guess
        tw = self.tagway_headers
        for k, v in scope["headers"]:
            if k == b"authorization":
                if self.auth is not None:
                    self.repeated = "authorization"
                self.auth = v.decode("latin-1")
            elif k.startswith(b"x-tagway-"):
                name = k[9:].decode("latin-1")
                if name in tw:
                    if name != "tags":
                        self.repeated = self.repeated or k.decode("latin-1")
                    v = tw[name].encode("latin-1") + b"," + v  # repeated tag headers are one list
                tw[name] = v.decode("latin-1")
            elif k == b"content-length":
                self.content_length = int(v) if v.isdigit() else -1
            elif k == b"api-key" or k == b"x-api-key":  # Azure-style, Anthropic-style
                if self.api_key is None:
                    self.api_key, self.api_key_from = v.decode("latin-1"), k
                elif k == self.api_key_from:
                    self.repeated = k.decode("latin-1")
                else:
                    self.other_api_key = v.decode("latin-1")
            elif k == b"traceparent":
                self.traceparent = v.decode("latin-1")
            elif k == b"content-encoding":
                self.content_encoding = v
        self.principal: Principal | None = None
        self.tenant: TenantConfig | None = None  # the tenant the call is recorded as (its settings apply)
        self.body = b""
        self.payload: dict = {}
        self.resolved = False  # who and why (customer, source, tags) worked out from headers and body
        self.stream = False
        self.client_wants_usage = False  # a stream whose client asked for the usage chunk itself
        self.capture = False  # record the content of this call (the tenant allows it)
        self.started = False  # response headers went out: errors from now on are in-band
        # what the upstream said, kept for capture after the response has gone (a whole response's choices, or
        # the stream's accumulator) and its size, which decides whether capture runs off the event loop
        self.answer: Any = None
        self.answer_bytes = 0
        self.extra_headers: list[tuple[bytes, bytes]] = []  # ours, on whatever response goes out
        self.limited: list = []  # the rate limits / budgets this call was admitted under (charged when it ends)
        self.forward_headers: list[tuple[bytes, bytes]] = []  # the client's headers that go upstream (allow-listed)

    # -- reading ------------------------------------------------------------------------------------------------
    async def read_body(self, limit: int) -> bytes:
        if self.content_length > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            chunk = msg.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            if not msg.get("more_body"):
                break
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self.content_encoding:
            self.body = _decoded(self.body, self.content_encoding, limit)
        return self.body

    # -- answering ----------------------------------------------------------------------------------------------
    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Start the response. The call now counts as answered: a later hang-up is the client's, not ours."""
        self.started = True
        self.rec.http_status = status
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [*headers, *self.extra_headers, (b"x-tagway-trace-id", self.trace_id)]})

    async def respond(self, status: int, body: bytes, content_type: bytes = _JSON,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """A whole response. Watching for a hang-up stops first: completing the response makes the server report
        a disconnect to a pending receive(), which is not the client's doing."""
        self.watch.stop()
        await self.start(status, [(b"content-type", content_type), (b"content-length", b"%d" % len(body)),
                                  *(extra or ())])
        await self.send({"type": "http.response.body", "body": body})

    async def answer_shutdown(self) -> None:
        """uvicorn cancelled the call when server.graceful_shutdown_seconds had passed: recorded as cancelled, and
        a call that sent nothing yet gets the OpenAI-shaped 503 the SDKs retry (a stream has ended with that error
        as its last event, in the relays). The caller ends the cancellation there: re-raised, it is uvicorn's plain
        500 and "Exception in ASGI application" with a traceback, for a cut it made."""
        self.rec.fail("cancelled", "the call was cancelled by the gateway")
        if not self.started:
            try:
                await self.respond_error(shutting_down())
            except BaseException:  # cancelled again, or the client is gone: the record says what happened
                pass

    async def respond_error(self, e: GatewayError) -> None:
        """An error before the response started; the client may be gone already (the record says what it was sent)."""
        try:
            await self.respond(e.status, e.body(), extra=e.headers)
        except OSError:
            pass

    async def chunk(self, data: bytes) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self, last: bytes = b"") -> None:
        self.watch.stop()  # the end of the response is not a client disconnect
        await self.send({"type": "http.response.body", "body": last, "more_body": False})


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"Request body is larger than the limit of {limit} bytes.", code="body_too_large")


# Content-Encoding -> zlib's wbits: gzip, and deflate as HTTP means it (zlib-wrapped; auto-detected with gzip by 47)
_INFLATE_WBITS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 47}
_MAX_MEMBERS = 16


def _decoded(body: bytes, encoding: bytes, limit: int) -> bytes:
    """A request body sent with `Content-Encoding`, inflated (its inflated size is bounded by the body limit too: a
    small compressed body may not expand past it). The upstream gets the plain bytes, as it gets no such header."""
    name = encoding.strip().lower()
    if name in (b"", b"identity") or not body:
        return body
    wbits = _INFLATE_WBITS.get(name)
    if wbits is None:
        raise GatewayError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; send the body "
                           "uncompressed, or gzip or deflate.", code="unsupported_content_encoding")
    parts: list[bytes] = []
    size, data, members = 0, body, 0
    try:
        # gzip allows several members, one after the other; each costs a copy of what follows it (unused_data), so
        # a body of thousands of empty members held the event loop for minutes: a few are plenty
        while data and data.strip(b"\0"):  # trailing zero padding ends a gzip file, as Python's gzip reads it
            members += 1
            if members > _MAX_MEMBERS:
                raise GatewayError(400, f"The request body has more than {_MAX_MEMBERS} {name.decode('latin-1')} "
                                   "members.", code="invalid_content_encoding")
            d = zlib.decompressobj(wbits)
            part = d.decompress(data, limit + 1 - size)
            size += len(part)
            if size > limit or d.unconsumed_tail:
                raise _too_large(limit)
            parts.append(part)
            parts.append(d.flush())
            size += len(parts[-1])
            if not d.eof:
                raise GatewayError(400, f"The request body is truncated {name.decode('latin-1')} data.",
                                   code="invalid_content_encoding")
            data = d.unused_data
    except zlib.error:
        raise GatewayError(400, f"The request body is not valid {name.decode('latin-1')} data.",
                           code="invalid_content_encoding") from None
    if size > limit:
        raise _too_large(limit)
    return b"".join(parts)


class DisconnectWatch:
    """The watch for a client that hangs up: when it does, the call's task is cancelled so the upstream request
    stops too (and stops costing), and the record says so.

    The watch starts only once a call has lasted `AFTER` seconds: a watcher task per call costs ~10% of the
    gateway's throughput on fast calls, and only a call that takes a while can be abandoned mid-way."""

    AFTER = 0.25
    __slots__ = ("client_gone", "_watcher", "_timer", "_watching")

    def __init__(self) -> None:
        self.client_gone = False
        self._watcher: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False

    def start(self, receive: Any) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        self._watching = True
        self._timer = asyncio.get_running_loop().call_later(self.AFTER, self._start_watcher, receive, task)

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

    def stop(self) -> None:
        self._watching = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None


async def _wait_disconnect(receive: Any) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
