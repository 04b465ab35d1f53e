"""Split a byte stream into SSE events without copying more than needed."""
from __future__ import annotations

from typing import AsyncIterator

import orjson

__all__ = ["iter_events", "event_data", "json_object"]


async def iter_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield each complete event (terminated by a blank line, normalised to b"\\n\\n"). A trailing partial event
    at EOF is yielded as-is only if it carries data (some servers omit the last blank line)."""
    buf = b""
    pending_cr = False  # a chunk ended in "\r": its "\n" may start the next chunk
    async for chunk in chunks:
        if pending_cr:
            chunk = b"\r" + chunk
            pending_cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, pending_cr = chunk[:-1], True
            # SSE allows CRLF, LF or a bare CR as line ends; normalise all to LF
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf += chunk
        while True:
            i = buf.find(b"\n\n")
            if i < 0:
                break
            event, buf = buf[: i + 2], buf[i + 2:]
            if event.strip():
                yield event
    if pending_cr:
        buf += b"\n"
    if buf.strip():
        yield buf.rstrip(b"\n") + b"\n\n"


def json_object(data: bytes) -> dict | None:
    """An event's data as a JSON object, or None when it is not one (the relay passes such events on untouched)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def event_data(event: bytes) -> bytes | None:
    """The concatenated `data:` payload of one event, or None if it has none (comments, keep-alives)."""
    if event.startswith(b"data:") and event.count(b"\n") <= 2:  # the common single-line case
        return event[5:].strip()
    parts = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None
