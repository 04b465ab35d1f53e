"""A provider whose answers come from a function, as httpx's `MockTransport` is a transport: for tests (the proxy's
whole request path runs, only the network is a function) and for embedders who answer in-process.

    def handler(call: UpstreamCall) -> dict | UpstreamResponse | Stream     (or an async function)

A dict is a 200 JSON body; an `UpstreamResponse` with another status is treated as that upstream error (fallbacks
apply as for a real one); a `Stream` is relayed event by event; raising `UpstreamFailure` is a transport failure
(timeout, connection refused...). Every call is kept in `calls`.
"""
from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Callable, Iterable

import orjson

from .base import UpstreamCall, UpstreamFailure, UpstreamResponse

__all__ = ["HandlerProvider", "Stream", "sse_event"]


def sse_event(item: dict | bytes | str) -> bytes:
    """A dict as `data: <json>`; bytes or str as the event's data as given (e.g. "[DONE]")."""
    if isinstance(item, dict):
        data = orjson.dumps(item)
    else:
        data = item.encode() if isinstance(item, str) else item
    return b"data: " + data + b"\n\n"


class Stream:
    """SSE events to relay: dicts, raw data (bytes/str), or an exception to raise at that point (a stream that
    breaks mid-way). `done=True` ends it with `data: [DONE]`."""

    def __init__(self, events: Iterable[dict | bytes | str | BaseException], *, done: bool = True,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self._events = list(events)
        self._done = done
        self.headers = headers
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for item in self._events:
            if isinstance(item, BaseException):
                raise item
            yield sse_event(item)
        if self._done:
            yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.closed = True


class HandlerProvider:
    def __init__(self, handler: Callable[[UpstreamCall], Any]) -> None:
        self.handler = handler
        self.calls: list[UpstreamCall] = []

    async def send(self, call: UpstreamCall) -> UpstreamResponse | Stream:
        self.calls.append(call)
        reply = self.handler(call)
        if inspect.isawaitable(reply):
            reply = await reply
        if isinstance(reply, dict):
            return UpstreamResponse(200, orjson.dumps(reply))
        if isinstance(reply, UpstreamResponse) and reply.status != 200:
            raise UpstreamFailure.from_status(reply.status, reply.body, reply.headers)
        if isinstance(reply, (UpstreamResponse, Stream)):
            return reply
        raise TypeError(f"a handler returns a dict, an UpstreamResponse or a Stream, not {type(reply).__name__}")

    async def aclose(self) -> None:
        pass
