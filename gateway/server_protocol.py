"""The HTTP/1.1 protocol `tagway serve` runs under uvicorn: its httptools protocol with a cap on the request head.

httptools (llhttp) sets no limit on the request line and headers, and uvicorn's protocol adds none: it accumulated a
40 MB header block from a client that had not authenticated yet (the h11 protocol has one, 16 KiB by default).
"""
from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .errors import error_body

__all__ = ["DEFAULT_MAX_HEADER_BYTES", "HeadCappedProtocol"]

# the base class's methods, called directly: a zero-argument super() makes an object per call, three a request
# (+1.3 us on the ~16 us uvicorn's protocol spends on a request; called directly the cap costs 0.2-0.5 us)
_feed = HttpToolsProtocol.data_received
_header = HttpToolsProtocol.on_header
_body = HttpToolsProtocol.on_body
_headers_complete = HttpToolsProtocol.on_headers_complete
_message_complete = HttpToolsProtocol.on_message_complete

DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # server.max_header_bytes; Node allows 16 KiB, nginx 4 buffers of 8 KiB


class HeadCappedProtocol(HttpToolsProtocol):
    """Answers a request whose line and headers pass `max_head` bytes with a 431 and closes the connection, having fed
    the parser no more than `max_head` bytes of that head. The cap travels as uvicorn's own setting for it,
    `h11_max_incomplete_event_size` (a Config field, so it reaches the workers of `--workers N` too)."""

    # slots, not two more keys in the instance dict: past 30 keys CPython stops sharing the keys of instance dicts,
    # and every attribute uvicorn's protocol reads got slower (~1 us a request, measured)
    __slots__ = ("head_bytes", "max_head", "past_head")

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head = config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES
        # bytes received of the request head being read; None while a body is read or nothing is pending.
        # Bytes of the next request that arrive in the same read as the end of the previous one are not counted
        # (the parser does not say where in a read a message ended): a head can pass the cap by at most one read
        # (256 KiB), and only on a connection that pipelines.
        self.head_bytes: int | None = 0
        # the request's head is over: header fields from here are trailers (after a chunked body)
        self.past_head = False

    def data_received(self, data: bytes) -> None:
        seen = self.head_bytes
        if seen is None or seen + len(data) <= self.max_head:  # the whole per-read cost on the hot path
            if seen is not None:
                self.head_bytes = seen + len(data)
            _feed(self, data)
            return
        room = self.max_head - seen
        if room > 0:  # the head may end within the cap: let the parser see only that much
            self.head_bytes = self.max_head
            _feed(self, data[:room])
            if self.head_bytes != self.max_head:  # it ended (or a message and the next head began): go on
                if not self.transport.is_closing():
                    self.data_received(data[room:])
                return
        self._refuse_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.past_head:
            # a trailer field, after a chunked body: the base class appended it to the request's headers, and
            # tagway reads none. (Its bytes are capped as a head's: on_chunk_header.)
            return
        _header(self, name, value)

    def on_headers_complete(self) -> None:
        self.head_bytes, self.past_head = None, True
        _headers_complete(self)

    def on_chunk_header(self) -> None:
        # A chunk's size line. The last chunk's (size 0) is followed by the trailer section, which the parser
        # builds up whole, each field's value by concatenation, before it says anything: one 128 MB field with no
        # key took ~300 MB and 17 s of the event loop. So bytes count as a head's from each chunk's size line until
        # that chunk's data begins (on_body), and the trailer section is held to the head's cap.
        self.head_bytes = 0

    def on_body(self, body: bytes) -> None:
        self.head_bytes = None
        _body(self, body)

    def on_message_complete(self) -> None:
        self.head_bytes, self.past_head = 0, False  # a next request on this connection starts its head
        _message_complete(self)

    def _refuse_head(self) -> None:
        if self.transport.is_closing():
            return
        # a response still being written on this connection (pipelining) would be corrupted by one written now
        if self.cycle is None or self.cycle.response_complete:
            msg = f"The request line and headers are over {self.max_head} bytes (server.max_header_bytes)."
            body = error_body(msg, "invalid_request_error", "request_header_fields_too_large")
            head = [STATUS_LINE[431]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nconnection: close\r\n\r\n", body]
            self.transport.write(b"".join(head))
        self.logger.warning("Refused a request head over %d bytes (431).", self.max_head)
        self.transport.close()
