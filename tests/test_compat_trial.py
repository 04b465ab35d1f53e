"""An application developer's compatibility trial: what an app calling OpenAI directly does, sent through tagway,
answered and recorded the same way. Real parts: the fixture upstream on 127.0.0.1, the real openai SDK, the
gateway recording into the session's chDB store."""
from __future__ import annotations

import gzip
import uuid

import httpx
import openai
import pytest
from aiohttp import web

from exporters import responses_format
from replay.slice import case_from_row
from tests.gateway_fixture import KEYS, recorded_gateway
from tests.http_server import ThreadedServer

IMAGE = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
         "AAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def recorded(upstream, chdb_store, tmp_path_factory):
    busy = BusyAnthropic().start()
    claude = {"provider": "anthropic", "base_url": busy.url, "api_key_env": "TEST_UPSTREAM_KEY"}
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("spool")),
                          models=[{"name": "claude-busy", "model": "claude-x", **claude}]) as server:
        yield server
    busy.stop()


class BusyAnthropic(ThreadedServer):
    """Anthropic's Messages API at its rate limit: a 429 as Anthropic words it, with its retry advice."""

    def routes(self, app: web.Application) -> None:
        async def messages(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"type": "error", "error": {"type": "rate_limit_error", "message":
                                      "Number of request tokens has exceeded your per-minute rate limit"}},
                                     status=429, headers={"retry-after": "3", "request-id": "req_busy_1",
                                                          "anthropic-ratelimit-requests-remaining": "0"})

        app.router.add_post("/v1/messages", messages)


def client(gw, customer: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["platform"], max_retries=0,
                         default_headers={"x-tagway-customer": customer}, **kw)


def row(gw, store, trace_id: str) -> dict:
    assert gw.recorder.force_flush()
    rows = store.query("SELECT * FROM llm_calls WHERE trace_id = {id:String}", parameters={"id": trace_id})
    assert len(rows) == 1, f"expected one llm_calls row for {trace_id}"
    return rows[0]


class _GzipRequests(httpx.HTTPTransport):
    """What an app does when it compresses its big prompts on the wire: every request body gzipped."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        packed = gzip.compress(request.read())
        request.headers["Content-Encoding"] = "gzip"
        request.headers["Content-Length"] = str(len(packed))
        request.stream = httpx.ByteStream(packed)
        request._content = packed
        return super().handle_request(request)


def test_a_gzipped_request_body_is_answered_and_recorded(recorded, upstream, chdb_store):
    cust = f"gz-{uuid.uuid4().hex[:8]}"
    c = client(recorded, cust, http_client=httpx.Client(transport=_GzipRequests()))
    raw = c.chat.completions.with_raw_response.create(model="gpt-test",
                                                      messages=[{"role": "user", "content": "packed prompt"}])
    assert raw.parse().choices[0].message.content == "Echo: packed prompt"  # was a 400 'not valid UTF-8'
    sent = upstream.last()
    assert sent["body"]["messages"] == [{"role": "user", "content": "packed prompt"}]
    assert "Content-Encoding" not in sent["headers"]  # the upstream gets plain JSON, as it is told
    r = row(recorded, chdb_store, raw.headers["x-tagway-trace-id"])
    assert (r["status"], r["customer"]) == ("ok", cust) and "packed prompt" in r["request_json"]
    # a body tagway cannot inflate is an OpenAI-shaped refusal that says why, not a JSON or UTF-8 complaint
    h = {"authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"}
    bad = httpx.post(recorded.url + "/v1/chat/completions", content=b"not gzip",
                     headers={**h, "content-encoding": "gzip"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_content_encoding"
    br = httpx.post(recorded.url + "/v1/chat/completions", content=b"{}", headers={**h, "content-encoding": "br"})
    assert br.status_code == 415 and br.json()["error"]["code"] == "unsupported_content_encoding"
    # a small body may not inflate past the body limit (64 KiB in the test config)
    bomb = gzip.compress(b'{"model": "gpt-test", "messages": [], "pad": "' + b"x" * 200_000 + b'"}')
    big = httpx.post(recorded.url + "/v1/chat/completions", content=bomb, headers={**h, "content-encoding": "gzip"})
    assert big.status_code == 413
    # thousands of empty members cost a copy of the rest of the body each (quadratic: 1 MB held the event loop for
    # ~1 s, 8 MB for minutes): more than a few are refused at once
    members = gzip.compress(b"") * 3000
    many = httpx.post(recorded.url + "/v1/chat/completions", content=members,
                      headers={**h, "content-encoding": "gzip"})
    assert many.status_code == 400 and "more than 16 gzip members" in many.json()["error"]["message"]
    # two members and the zero padding some writers leave after the last one are a body like any other
    padded = gzip.compress(b'{"model": "gpt-test", ') + gzip.compress(b'"messages": [{"role": "user", "content": '
                                                                       b'"two parts"}]}') + b"\0" * 64
    two = httpx.post(recorded.url + "/v1/chat/completions", content=padded, headers={**h, "content-encoding": "gzip"})
    assert two.status_code == 200 and two.json()["choices"][0]["message"]["content"] == "Echo: two parts"


def test_max_completion_tokens_is_recorded_as_the_requested_limit(recorded, chdb_store):
    c = client(recorded, f"mct-{uuid.uuid4().hex[:8]}")
    raw = c.chat.completions.with_raw_response.create(model="gpt-test", max_completion_tokens=37,
                                                      messages=[{"role": "user", "content": "hi"}])
    trace_id = raw.headers["x-tagway-trace-id"]
    row(recorded, chdb_store, trace_id)
    got = chdb_store.query("SELECT SpanAttributes['gen_ai.request.max_tokens'] AS m FROM otel_traces "
                           "WHERE TraceId = {id:String} AND SpanAttributes['tagway.kind'] = 'call'",
                           parameters={"id": trace_id})
    assert [g["m"] for g in got] == ["37"]  # chat's current parameter (max_tokens is the deprecated one)


def test_an_upstream_protocol_error_keeps_the_upstreams_request_id(recorded, chdb_store):
    """A 200 whose body is not JSON: the client gets a 502, and the upstream's x-request-id with it (what the
    provider's support asks for), as it does for every other upstream failure."""
    with pytest.raises(openai.InternalServerError) as e:
        client(recorded, f"pe-{uuid.uuid4().hex[:8]}").chat.completions.create(
            model="bad-json", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and e.value.code == "upstream_protocol_error"
    assert (e.value.request_id or "").startswith("req-")
    r = row(recorded, chdb_store, e.value.response.headers["x-tagway-trace-id"])
    assert (r["status"], r["error_type"], r["http_status"]) == ("error", "protocol_error", 502)


def test_image_detail_is_recorded_and_replayed_as_sent(recorded, upstream, chdb_store):
    """`detail: low` decides what an image costs and what the model sees: the record keeps it, and a replay of the
    call (chat or Responses) sends it again."""
    c = client(recorded, f"img-{uuid.uuid4().hex[:8]}")
    raw = c.chat.completions.with_raw_response.create(model="gpt-test", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}]}])
    assert upstream.last()["body"]["messages"][0]["content"][1]["image_url"]["detail"] == "low"
    case, why = case_from_row(row(recorded, chdb_store, raw.headers["x-tagway-trace-id"]), "all")
    assert why is None
    assert case.messages[0]["content"][1] == {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}

    raw = c.responses.with_raw_response.create(model="gpt-test", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "and this"}, {"type": "input_image", "image_url": IMAGE, "detail": "high"}]}])
    case, why = case_from_row(row(recorded, chdb_store, raw.headers["x-tagway-trace-id"]), "all")
    assert why is None
    body = responses_format.request_from_chat(case.messages, case.params)
    assert body["input"][0]["content"][1] == {"type": "input_image", "image_url": IMAGE, "detail": "high"}


def test_a_translated_providers_429_keeps_its_retry_advice(recorded, chdb_store):
    """Anthropic through litellm answers 429 with retry-after: the client's SDK gets it (and the provider's request
    id and rate-limit state), so it waits as the provider asked, as it would calling the provider; the error carries
    the provider's words and type and OpenAI's code, not litellm's exception name and the provider's raw JSON."""
    with pytest.raises(openai.RateLimitError) as e:
        client(recorded, f"rl-{uuid.uuid4().hex[:8]}").chat.completions.create(
            model="claude-busy", messages=[{"role": "user", "content": "hi"}])
    h = e.value.response.headers
    assert h.get("retry-after") == "3" and h.get("request-id") == "req_busy_1"
    assert h.get("anthropic-ratelimit-requests-remaining") == "0"
    err = e.value.body
    assert err["message"] == "Number of request tokens has exceeded your per-minute rate limit"
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    r = row(recorded, chdb_store, h["x-tagway-trace-id"])
    assert (r["status"], r["error_type"], r["http_status"]) == ("error", "http_429", 429)
