"""The request line and headers are capped (`server.max_header_bytes`, 64 KiB) in the real `tagway serve`, single
process and `--workers N`: uvicorn's httptools protocol read a 40 MB header block from a client with no key."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import orjson
import pytest

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess

KEY = "tw-headcap-acme-0123456789abcdefghijklmnop"
CAP = 64 * 1024
CONFIG = {"recording": {"enabled": False},
          "models": [{"name": "echo", "provider": "mock", "mock": {"reply": "hello"}}],
          "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEY)}]}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with GatewayProcess(tmp_path_factory.mktemp("headcap"), {**CONFIG}) as g:
        yield g


def head(size: int, path: str = "/healthz") -> bytes:
    """A GET whose request line and headers are exactly `size` bytes, the blank line included."""
    start = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ".encode()
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def answers(sock: socket.socket, n: int) -> list[tuple[int, bytes]]:
    """`n` responses read off `sock` (status, body), each with a content-length."""
    out, buf = [], b""
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            more = sock.recv(65536)
            assert more, (out, buf[:300])
            buf += more
        top, _, buf = buf.partition(b"\r\n\r\n")
        lines = top.split(b"\r\n")
        length = int(next(v for k, _, v in (x.partition(b": ") for x in lines[1:]) if k.lower() == b"content-length"))
        while len(buf) < length:
            buf += sock.recv(65536)
        out.append((int(lines[0].split()[1]), buf[:length]))
        buf = buf[length:]
    return out


def test_a_head_over_the_cap_is_refused_as_it_arrives(gw):
    """431 once the cap is passed, while the client is still sending the head; the rest is never read."""
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head(CAP + 4096)[:-4])  # no end of head: the old protocol kept waiting (and reading) for it
        (status, body), = answers(s, 1)
        assert status == 431
        error = orjson.loads(body)["error"]
        assert error["code"] == "request_header_fields_too_large" and "65536" in error["message"]
        assert s.recv(1) == b""  # and the connection is closed
    # as the OpenAI SDK sees it: an error it can show, not a reset connection
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0,
                        default_headers={"x-pad": "a" * (1024 * 1024)})
    with pytest.raises(openai.APIStatusError) as e:
        sdk.models.list()
    assert e.value.status_code == 431 and e.value.code == "request_header_fields_too_large"


def test_the_cap_counts_each_head_alone(gw):
    """Exactly the cap is served; kept-alive and pipelined requests each get the whole cap (their heads together
    are over it), and a body sent with its head is not counted as head."""
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(3):  # one after another on a kept-alive connection
            s.sendall(head(CAP))
            assert answers(s, 1) == [(200, b'{"status":"ok"}')]
        s.sendall(head(40_000) * 3)  # pipelined, in one write
        assert [status for status, _ in answers(s, 3)] == [200, 200, 200]
        s.sendall(head(CAP + 1))
        assert answers(s, 1)[0][0] == 431
    body = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "x" * 500_000}]})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
        (status, answer), = answers(s, 1)
        assert status == 200 and orjson.loads(answer)["choices"][0]["message"]["content"] == "hello"


def test_workers_take_the_configured_cap(tmp_path):
    """`--workers N` runs the protocol in each worker process, with `server.max_header_bytes` from the config."""
    g = GatewayProcess(tmp_path, {**CONFIG}, env={"TAGWAY_SERVER__MAX_HEADER_BYTES": "8192"})
    with open(g.stderr_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", g.config_path,
                                 "--workers", "2"], stdout=subprocess.DEVNULL, stderr=err, env=g.env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, g.stderr()
            try:
                if httpx.get(g.url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        for _ in range(6):  # new connections, spread over the workers
            assert httpx.get(g.url + "/healthz", headers={"x-pad": "a" * 7000}).status_code == 200
            r = httpx.get(g.url + "/healthz", headers={"x-pad": "a" * 9000})
            assert r.status_code == 431 and "8192 bytes" in r.json()["error"]["message"], r.text
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0, g.stderr()


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _send_trailers(port: int, pieces) -> bool:
    """A chunked POST with no key whose trailer section is `pieces`; True when the gateway closed the connection
    before all of it was sent (it refused the section at the cap)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n")
        try:
            for piece in pieces:
                s.sendall(piece)
        except OSError:
            return True
        return False


def test_a_trailer_section_past_the_cap_is_refused_and_kept_nowhere(gw):
    """A chunked body may end in trailer fields: uvicorn's protocol appended them to the request's headers past every
    cap (32 MB of fields with no key grew the gateway by 25 MB), and the parser builds each field whole before it
    says anything (one 128 MB field took ~300 MB and 17 s of the event loop). The section is held to the head's cap,
    and the fields are not kept."""
    port = int(gw.url.rsplit(":", 1)[1])
    before = _rss_kb(gw.proc.pid)
    many = [(b"X-Trailer: " + b"t" * 8000 + b"\r\n") * 100] * 40  # 32 MB in 8 KB fields
    one = [b"X-Trailer: "] + [b"t" * 512 * 1024] * 64  # one 32 MB field, no line end
    assert _send_trailers(port, many) and _send_trailers(port, one)
    grown_mb = (_rss_kb(gw.proc.pid) - before) / 1024
    assert grown_mb < 12, f"the gateway grew by {grown_mb:.0f} MB reading trailers"
    assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200


def test_a_chunked_body_with_big_chunks_and_a_small_trailer_is_served(gw):
    """The cap counts a chunk's size line, not its data: chunks of 150 KB go through, and a small trailer too."""
    port = int(gw.url.rsplit(":", 1)[1])
    body = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "x" * 300_000}]})
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 150_000]), body[i:i + 150_000])
                      for i in range(0, len(body), 150_000))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks +
                  b"0\r\nX-Small-Trailer: ok\r\n\r\n")
        (status, answer), = answers(s, 1)
    assert status == 200 and b"hello" in answer
