"""An OpenAI-compatible upstream that answers instantly: a bare asyncio protocol (uvloop when available) that
returns the same chat completion for every POST, so benchmarks measure the gateway, not the upstream.

    python bench/instant_upstream.py PORT
"""
from __future__ import annotations

import asyncio
import sys

BODY = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1764000000,"model":"gpt-bench",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"Your refund was issued yesterday."},'
        b'"finish_reason":"stop","logprobs":null}],'
        b'"usage":{"prompt_tokens":21,"completion_tokens":7,"total_tokens":28}}')
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(BODY)).encode()
            + b"\r\nConnection: keep-alive\r\n\r\n" + BODY)


class Instant(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            i = head.find(b"content-length:")
            length = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None]) if i >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.t.write(RESPONSE)


def main() -> None:
    port = int(sys.argv[1])
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(Instant, "127.0.0.1", port, backlog=1024))
    print(f"instant upstream on 127.0.0.1:{port}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
