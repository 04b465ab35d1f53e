"""A spec-driven mock of the OpenAI API for conformance runs: Prism (`@stoplight/prism-cli`, installed by
tests/run.sh) serving the OpenAPI spec, behind a small aiohttp front that answers stream requests as event streams.

Prism cannot produce `text/event-stream` (it answers a stream request with the JSON example, and a 500 if asked
for an event stream), and tagway rightly treats JSON to a stream request as an upstream protocol error. So the
front turns Prism's JSON answer to a `stream: true` request into the events the API would send (a chat completion
as one chunk and `[DONE]`; a response as `response.created` and `response.completed`). Both runs of the conformance
test, direct and through tagway, use the same front, so they see the same mock.
"""
from __future__ import annotations

import collections
import gzip
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from tests.http_server import ThreadedServer, free_port

REPO = Path(__file__).resolve().parent.parent
TOOLS = Path(os.environ.get("TAGWAY_TEST_TOOLS", Path.home() / ".cache" / "tagway-test-tools"))


# OpenAI's OpenAPI document (v2.3.0, MIT), kept in the repository so a clean clone runs the conformance test
PACKED_SPEC = REPO / "tests" / "data" / "openai.openapi.yml.gz"


def spec_path() -> Path | None:
    """TAGWAY_OPENAPI_SPEC, else the repository's copy unpacked into the test tools directory."""
    if os.environ.get("TAGWAY_OPENAPI_SPEC") and Path(os.environ["TAGWAY_OPENAPI_SPEC"]).is_file():
        return Path(os.environ["TAGWAY_OPENAPI_SPEC"])
    if not PACKED_SPEC.is_file():
        return None
    out = TOOLS / "openai.openapi.yml"
    if not out.is_file() or out.stat().st_mtime < PACKED_SPEC.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(gzip.decompress(PACKED_SPEC.read_bytes()))
        tmp.replace(out)  # atomic: xdist workers may unpack it at once
    return out


def prism_bin() -> str | None:
    p = TOOLS / "prism" / "node_modules" / ".bin" / "prism"
    return str(p) if p.exists() else shutil.which("prism")


def openai_tests_dir() -> Path | None:
    import openai  # noqa: PLC0415

    d = TOOLS / f"openai-{openai.__version__}"
    return d if (d / "tests" / "api_resources").is_dir() else None


class Prism:
    def __init__(self, spec: Path, binary: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(TOOLS / "prism.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, "mock", str(spec), "-h", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 180) -> "Prism":
        deadline = time.monotonic() + timeout
        import httpx  # noqa: PLC0415
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prism exited with {self.proc.returncode}; see {self.log.name}")
            try:
                httpx.get(self.url + "/models", headers={"authorization": "Bearer x"}, timeout=2)
                return self
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"prism did not start within {timeout}s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _as_events(path: str, obj: dict) -> bytes:
    if path.rstrip("/").endswith("/responses") and isinstance(obj, dict):
        return b"".join(b"event: %s\ndata: %s\n\n" % (t.encode(), orjson.dumps({"type": t, "sequence_number": i,
                                                                                    "response": obj}))
                        for i, t in enumerate(("response.created", "response.completed")))
    if obj.get("object") == "chat.completion":
        choices = [{"index": c.get("index", 0), "delta": {"role": "assistant", "content": (c.get("message") or {})
                                                          .get("content")}, "finish_reason": c.get("finish_reason")}
                   for c in obj.get("choices") or []]
        obj = {**{k: v for k, v in obj.items() if k != "choices"}, "object": "chat.completion.chunk",
               "choices": choices}
    return b"data: " + orjson.dumps(obj) + b"\n\ndata: [DONE]\n\n"


class StreamingFront(ThreadedServer):
    """Forwards everything to Prism; answers stream requests as event streams."""

    def __init__(self, prism_url: str) -> None:
        super().__init__()
        self.prism_url = prism_url
        self.session: aiohttp.ClientSession | None = None
        self.by_key: collections.Counter[str] = collections.Counter()  # requests received by Authorization header

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if self.session is None:
            self.session = aiohttp.ClientSession(auto_decompress=False)
        self.by_key[request.headers.get("authorization", "")] += 1
        body = await request.read()
        stream = request.query.get("stream") == "true"
        if body and request.content_type == "application/json":
            try:
                stream = stream or orjson.loads(body).get("stream") is True
            except (orjson.JSONDecodeError, AttributeError):
                pass
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.session.request(request.method, self.prism_url + request.path_qs, data=body or None,
                                        headers=headers) as up:
            data = await up.read()
            out_headers = {k: v for k, v in up.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive")}
            if stream and up.status == 200 and up.content_type == "application/json":
                out_headers["Content-Type"] = "text/event-stream"
                return web.Response(status=200, body=_as_events(request.path, orjson.loads(data)), headers=out_headers)
            return web.Response(status=up.status, body=data, headers=out_headers)
