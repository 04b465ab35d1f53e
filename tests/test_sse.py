"""SSE framing across arbitrary network chunk boundaries and line-ending styles."""
from __future__ import annotations

import asyncio

import pytest

from gateway.providers.sse import event_data, iter_events

EVENTS = [b'data: {"a":1}', b'data: {"usage":{"prompt_tokens":3}}', b"data: [DONE]"]


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


async def collect(chunks: list[bytes]) -> list[bytes]:
    async def gen():
        for c in chunks:
            yield c
    return [e async for e in iter_events(gen())]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_events_survive_any_chunking_and_line_ending(eol, size):
    stream = b"".join(e + eol + eol for e in EVENTS)
    got = asyncio.run(collect(split_every(stream, size)))
    assert [event_data(e) for e in got] == [e[6:] for e in EVENTS]


def test_comments_and_multiline_data():
    stream = b": keep-alive\n\nevent: x\ndata: one\ndata: two\n\n"
    got = asyncio.run(collect([stream]))
    assert [event_data(e) for e in got] == [None, b"one\ntwo"]
