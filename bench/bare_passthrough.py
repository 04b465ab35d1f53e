"""The Python ceiling for a proxy on this machine: a raw ASGI app under uvicorn (uvloop + httptools, as `tagway
serve` runs) that forwards each POST body to the upstream with one pooled aiohttp session and returns the answer.
No auth, tags, routing, spans or recording: what every gateway feature is measured against.

    python bench/bare_passthrough.py PORT UPSTREAM_URL
"""
from __future__ import annotations

import sys

import aiohttp
import uvicorn


class Bare:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    connector = aiohttp.TCPConnector(limit=512, limit_per_host=512)
                    self.session = aiohttp.ClientSession(connector=connector)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        async with self.session.post(self.upstream + scope["path"].removeprefix("/v1"), data=b"".join(chunks),
                                     headers={"Content-Type": "application/json", "User-Agent": "bare"}) as r:
            body = await r.read()
            await send({"type": "http.response.start", "status": r.status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(Bare(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
                access_log=False, log_level="warning")
