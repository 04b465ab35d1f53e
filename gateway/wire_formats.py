"""The hot routes that do not speak chat completions: OpenAI's Responses API (`POST /v1/responses`) and Anthropic's
Messages API (`POST /v1/messages`). They take the proxy's whole path (auth, tags, routing with fallbacks, capture,
one span); what differs lives here, one `Wire` per API (request checks are in request_checks.py): where a whole answer keeps its
usage and finish reasons, how a stream is read for the record (its own events, its own last event) and how a
stream that breaks is told to the client. `WireStreamRelay` is the proxy's stream relay for these APIs.

Both record `gen_ai.operation.name = chat`, as the GenAI semantic conventions do for the Responses API
(`openai.api.type = responses`) and for Anthropic messages; `tagway.api` and the recorded request params say which
API it was, so replay re-sends the call the same way.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from exporters import anthropic_format, responses_format
from exporters.responses_format import API_MARK

from .errors import error_body, shutting_down
from .providers import UpstreamFailure
from .providers.sse import event_data, json_object

__all__ = ["WIRES", "SEMCONV_OPERATION", "Wire", "WireStreamRelay", "API_MARK", "openai_error_event",
           "shutdown_event"]

log = logging.getLogger("tagway.proxy")

_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


def _usage_of(obj: Any) -> dict | None:
    return obj if isinstance(obj, dict) else None


class _ResponsesStream:
    """What a Responses stream said: the response object as its lifecycle events carry it (the last one has the
    output and usage), the output items done so far (for a stream cut before the end), and how many characters
    were generated (a stream cut before its usage is billed for them: gateway/usage_estimate.py)."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.response: dict = {}
        self.items: dict[int, dict] = {}
        self.done = False
        self.failed = ""
        self.chars = 0  # text, reasoning, refusals and tool-call names and arguments streamed so far

    def add(self, obj: dict) -> None:
        t = obj.get("type")
        t = t if isinstance(t, str) else ""
        delta = obj.get("delta")
        if isinstance(delta, str) and t.endswith(".delta") and t != "response.audio.delta":  # audio is base64
            self.chars += len(delta)
        elif t.startswith("response.") and isinstance(obj.get("response"), dict):
            self.response = obj["response"]
        elif t == "response.output_item.added" and isinstance(obj.get("item"), dict):
            self.chars += len(str(obj["item"].get("name") or ""))  # a function call's name
        elif t == "response.output_item.done" and self.capture and isinstance(obj.get("item"), dict):
            self.items[int(obj.get("output_index") or 0)] = obj["item"]
        if t == "error":
            self.failed = str(obj.get("message") or obj.get("code") or "error event")
        elif t == "response.failed":
            err = self.response.get("error") or {}
            self.failed = str(err.get("message") if isinstance(err, dict) else err) or "response failed"
        if t in responses_format.TERMINAL_EVENTS:
            self.done = True

    @property
    def model(self) -> str:
        return str(self.response.get("model") or "")

    @property
    def id(self) -> str:
        return str(self.response.get("id") or "")

    def usage(self) -> dict | None:
        return _usage_of(self.response.get("usage"))

    @property
    def usage_final(self) -> bool:
        """The provider's count came (only the last lifecycle events carry usage)."""
        return self.usage() is not None

    def finish_reasons(self) -> list[str]:
        return [responses_format.finish_reason(self.response)] if self.done and self.response else []

    def output(self) -> list[dict]:
        resp = self.response
        if not resp.get("output") and self.items:
            resp = {**resp, "output": [self.items[i] for i in sorted(self.items)]}
        return responses_format.output_to_semconv(resp)


# the field of each Anthropic content delta that holds generated text
_DELTA_TEXT = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}


class _MessagesStream:
    """What an Anthropic Messages stream said, block by block, and how many characters were generated (a stream
    cut before its final usage is billed for them: gateway/usage_estimate.py)."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.message: dict = {}
        self.blocks: dict[int, dict] = {}
        self.json: dict[int, list[str]] = {}
        self.stop_reason = ""
        self.usage_: dict = {}
        self.usage_final = False  # message_delta brought the final output count (message_start's is a stub)
        self.done = False
        self.failed = ""
        self.chars = 0

    def add(self, obj: dict) -> None:
        t = obj.get("type")
        if t == "message_start" and isinstance(obj.get("message"), dict):
            self.message = obj["message"]
            self.usage_.update(self.message.get("usage") or {})
        elif t == "message_delta":
            self.stop_reason = str((obj.get("delta") or {}).get("stop_reason") or self.stop_reason)
            usage = obj.get("usage") or {}
            self.usage_.update({k: v for k, v in usage.items() if v is not None})
            self.usage_final = self.usage_final or "output_tokens" in usage
        elif t == "error":
            err = obj.get("error") or {}
            self.failed = str(err.get("message") if isinstance(err, dict) else err) or "error event"
        elif t == "content_block_start" and isinstance(obj.get("content_block"), dict):
            self.chars += len(str(obj["content_block"].get("name") or ""))  # a tool use's name
            if self.capture:
                self.blocks[int(obj.get("index") or 0)] = dict(obj["content_block"])
        elif t == "content_block_delta":
            i, delta = int(obj.get("index") or 0), obj.get("delta") or {}
            field = _DELTA_TEXT.get(delta.get("type"))
            text = str(delta.get(field, "")) if field else ""
            self.chars += len(text)
            if self.capture and field == "partial_json":
                self.json.setdefault(i, []).append(text)
            elif self.capture and field:
                block = self.blocks.setdefault(i, {"type": "text", "text": ""})
                block[field] = block.get(field, "") + text
        if t in anthropic_format.TERMINAL_EVENTS:
            self.done = True

    @property
    def model(self) -> str:
        return str(self.message.get("model") or "")

    @property
    def id(self) -> str:
        return str(self.message.get("id") or "")

    def usage(self) -> dict | None:
        return self.usage_ or None

    def finish_reasons(self) -> list[str]:
        return [anthropic_format.FINISH_REASONS.get(self.stop_reason, self.stop_reason)] if self.stop_reason else []

    def output(self) -> list[dict]:
        blocks = []
        for i in sorted(self.blocks):
            b = dict(self.blocks[i])
            if i in self.json:
                raw = "".join(self.json[i])
                try:
                    b["input"] = orjson.loads(raw) if raw else b.get("input", {})
                except orjson.JSONDecodeError:
                    b["input"] = raw
            blocks.append(b)
        return anthropic_format.output_to_semconv({"content": blocks, "stop_reason": self.stop_reason})


class Wire:
    """One non-chat API on the hot path."""

    def __init__(self, name: str, stream_type: type, finish: Any, output: Any, error_event: Any) -> None:
        self.name = name
        self._stream_type, self._finish, self._output, self._error_event = stream_type, finish, output, error_event

    def finish_reasons(self, obj: dict) -> list[str]:
        return self._finish(obj)

    def output(self, obj: dict) -> list[dict]:
        return self._output(obj)

    def reader(self, capture: bool) -> Any:
        return self._stream_type(capture)

    def error_event(self, message: str, code: str, type_: str = "api_error") -> bytes:
        return self._error_event(message, code, type_)


def openai_error_event(message: str, code: str, type_: str = "api_error") -> bytes:
    """The in-band error that ends an OpenAI stream (chat completions' and the Responses API's): the SDKs raise it."""
    return b"data: " + error_body(message, type_, code) + b"\n\n"


def _anthropic_error_event(message: str, code: str, type_: str = "api_error") -> bytes:
    # the Anthropic SDK raises on an `error` event with this shape (its error types are its own: api_error here)
    return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {"type": "api_error",
                                                                             "message": message}}) + b"\n\n"


WIRES: dict[str, Wire] = {
    "responses": Wire("responses", _ResponsesStream, lambda o: [responses_format.finish_reason(o)],
                      responses_format.output_to_semconv, openai_error_event),
    "messages": Wire("messages", _MessagesStream,
                     lambda o: [anthropic_format.FINISH_REASONS.get(o.get("stop_reason") or "",
                                                                    o.get("stop_reason") or "")],
                     anthropic_format.output_to_semconv, _anthropic_error_event),
}
SEMCONV_OPERATION = {"responses": "chat", "messages": "chat"}
API_NAMES = {"chat": "chat.completions", "text_completion": "completions", "embeddings": "embeddings",
             "responses": "responses", "messages": "messages"}


def shutdown_event(error_event: Any) -> bytes:
    """The error event that ends a stream still running when server.graceful_shutdown_seconds has passed, in the
    stream's API's shape (`error_event`): the SDKs raise it, where a bare end would read as a complete answer."""
    e = shutting_down()
    return error_event(e.message, e.code, e.type)


class WireStreamRelay:
    """The stream relay for `WIRES` (a mixin of the proxy, which provides `_return_headers`, `_read_usage`,
    `_estimate_usage`, `_own`, `_secrets` and `_scrub`): events go to the client as they come, each read once for the
    record; the stream is over at the API's last event, and one that ends before it is a cut stream, told in-band in
    the API's own error shape and billed at estimated counts."""

    async def _relay_wire_stream(self, call: Any, d: Any, opened: Any, wire: Wire) -> None:
        rec = call.rec
        reader = wire.reader(call.capture)
        if call.capture:
            call.answer = reader
        await call.start(200, [*_SSE_HEADERS, *self._return_headers.pick(getattr(opened.stream, "headers", ()))])
        event: bytes | None = opened.first
        last = b""  # what ends the stream besides its own events
        owned = False
        try:
            while event is not None:
                if self._secrets:  # a provider that echoes its key must not leak it to the client or the store
                    event = self._scrub(event)
                data = event_data(event)
                if data == b"[DONE]":
                    reader.done = True
                elif data:
                    obj = json_object(data)
                    if obj is not None:
                        reader.add(obj)
                        if not owned and reader.id:  # a stored response's id, before the client has it
                            self._own(call, reader.id)
                            owned = True
                        if reader.failed and not rec.error_type:
                            rec.fail("upstream_stream_error", reader.failed[:500])
                    if rec.ttft_s is None:
                        rec.ttft_s = (time.time_ns() - rec.start_ns) / 1e9
                call.answer_bytes += len(event)
                await call.chunk(event)
                if reader.done:
                    break
                try:
                    event = await opened.events.__anext__()
                except StopAsyncIteration:
                    event = None
            if not reader.done:
                raise UpstreamFailure("stream_cut", "upstream ended the stream before its last event")
        except UpstreamFailure as f:
            rec.fail(f.error_type, f.message)
            await call.chunk(wire.error_event(f"Upstream stream failed: {f.message}.", f.error_type))
        except OSError:  # a send to a client that has gone
            rec.hung_up("mid-stream")
        except asyncio.CancelledError:
            if not call.watch.client_gone:  # the shutdown grace is over: an error the SDKs raise, not a silent cut
                last = shutdown_event(wire.error_event)
            raise
        finally:
            self._read_usage(reader.usage(), rec, d)
            # an error event ends the stream without the provider's count: billed at estimates, as a cut is
            cut = not reader.usage_final and (not reader.done or bool(reader.failed))
            await self._end_relayed(call, d, opened, cut=cut, chars=reader.chars,
                                    answer=(reader.model, reader.id, reader.finish_reasons()), last=last)

    async def _end_relayed(self, call: Any, d: Any, opened: Any, *, cut: bool, chars: int, answer: tuple,
                           last: bytes) -> None:
        """The end of a relayed stream (every API's), whatever ended it. One `cut` (or cancelled) before its usage
        is billed all the same, at estimated counts from the `chars` generated; the upstream is released; the
        answer (model, id, finish reasons) is recorded; the client's response ends with `last` (the shutdown's error
        event, or nothing) unless the client has gone."""
        rec = call.rec
        if cut:
            try:
                self._estimate_usage(call, d, chars)
            except Exception:  # an estimate must never cost the call its ending or its record
                log.exception("could not estimate a cut stream's usage")
        await opened.stream.aclose()
        rec.answered(*answer)
        if not rec.client_disconnected and not call.watch.client_gone:
            try:
                await call.end_stream(last)
            except OSError:
                rec.hung_up("mid-stream")
