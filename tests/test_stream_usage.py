"""tagway adds `stream_options: {include_usage: true}` to a pass-through stream so that it can count the call's
tokens. An upstream that refuses fields it does not know (older Azure api-versions, strict OpenAI-compatible
servers) answers that with a 400 (`Unrecognized request argument supplied: stream_options`), so a plain
`stream=True` that worked against it directly failed through tagway. Now the refusal of the field tagway added is
retried once without it, remembered for the deployment (no refusal the next time), and the call's tokens are
estimated and marked so; `stream_usage: false` on a model never sends it. Real upstream on 127.0.0.1, the openai
SDK as client."""
from __future__ import annotations

import os
import time

import openai
import orjson
import pytest
from aiohttp import web

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from gateway.config_check import findings
from gateway.routing import refuses_stream_options
from tests.gateway_fixture import KEYS, UPSTREAM_KEY, GatewayServer, MemoryRecorder, gateway_config
from tests.http_server import ThreadedServer

MSG = [{"role": "user", "content": "hello there"}]


class StrictUpstream(ThreadedServer):
    """An OpenAI-compatible chat server that refuses any request field it does not know, as older Azure
    api-versions do for `stream_options`; its streams carry no usage."""

    def __init__(self) -> None:
        super().__init__()
        self.base_url = f"{self.url}/v1"
        self.requests: list[dict] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(body)
        if "stream_options" in body:
            return web.json_response({"error": {
                "message": "Unrecognized request argument supplied: stream_options", "type": "invalid_request_error",
                "param": None, "code": None}}, status=400)
        text = "Echo: " + body["messages"][-1]["content"]
        base = {"id": "chatcmpl-strict", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for i, word in enumerate(text.split(" ")):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
            await resp.write(b"data: " + orjson.dumps({**chunk, "choices": [
                {"index": 0, "delta": delta, "finish_reason": None}]}) + b"\n\n")
        await resp.write(b"data: " + orjson.dumps({**chunk, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture(scope="module")
def strict():
    up = StrictUpstream().start()
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    cfg = gateway_config(up.base_url)
    price = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    common = {"provider": "openai", "base_url": up.base_url, "api_key_env": "TEST_UPSTREAM_KEY", **price}
    cfg["models"] = [{"name": "azure-old", "model": "gpt-strict", **common},
                     {"name": "azure-old-2", "model": "gpt-strict-2", **common},
                     {"name": "azure-optout", "model": "gpt-strict-3", "stream_usage": False, **common}]
    cfg["tenants"] = [t for t in cfg["tenants"] if t["customer"] == "acme"]
    recorder = MemoryRecorder()
    gw = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=recorder)).start()
    gw.upstream, gw.recorder = up, recorder
    yield gw
    gw.stop()
    recorder.shutdown()
    up.stop()


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["acme"], max_retries=0)


def stream_text(gw, model: str, **kw) -> tuple[str, str]:
    """The streamed text and the call's trace id."""
    raw = client(gw).chat.completions.with_raw_response.create(model=model, messages=MSG, stream=True, **kw)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers["x-tagway-trace-id"]


def test_a_refused_stream_options_is_retried_without_it_once_then_never_sent(strict):
    up = strict.upstream
    up.requests.clear()
    text, trace = stream_text(strict, "azure-old")
    assert text == "Echo: hello there"
    # the field tagway added was refused, then the same request went without it
    assert [("stream_options" in r, r["model"]) for r in up.requests] == [(True, "gpt-strict"), (False, "gpt-strict")]
    a = strict.recorder.call(trace).attributes
    assert a[sc.USAGE_ESTIMATED] is True and sc.ERROR_TYPE not in a and a[sc.ATTEMPTS] == 1
    assert a[sc.INPUT_TOKENS] > 0 and a[sc.OUTPUT_TOKENS] == 5  # "Echo: hello there": 17 characters, ~4 a token
    assert a[sc.COST_USD] == pytest.approx(a[sc.INPUT_TOKENS] * 1e-6 + 5 * 2e-6)

    up.requests.clear()  # remembered for the deployment: no refusal to pay for again
    text, trace = stream_text(strict, "azure-old")
    assert text == "Echo: hello there" and ["stream_options" in r for r in up.requests] == [False]
    assert strict.recorder.call(trace).attributes[sc.USAGE_ESTIMATED] is True


def test_stream_options_the_client_sent_itself_is_its_own_to_be_refused(strict):
    """No retry then: dropping a field the client chose would change its request behind its back."""
    up = strict.upstream
    up.requests.clear()
    with pytest.raises(openai.BadRequestError) as e:
        stream_text(strict, "azure-old-2", stream_options={"include_usage": True})
    assert "stream_options" in e.value.message and len(up.requests) == 1
    up.requests.clear()  # and a refusal of the client's own field teaches the gateway nothing
    assert stream_text(strict, "azure-old-2")[0] == "Echo: hello there"
    assert ["stream_options" in r for r in up.requests] == [True, False]


def test_stream_usage_false_never_asks(strict):
    up = strict.upstream
    up.requests.clear()
    text, trace = stream_text(strict, "azure-optout")
    assert text == "Echo: hello there" and ["stream_options" in r for r in up.requests] == [False]
    a = strict.recorder.call(trace).attributes
    assert a[sc.USAGE_ESTIMATED] is True and a[sc.OUTPUT_TOKENS] == 5
    # a call that is not streamed never had the field, and keeps the upstream's own counts
    raw = client(strict).chat.completions.with_raw_response.create(model="azure-optout", messages=MSG)
    a = strict.recorder.call(raw.headers["x-tagway-trace-id"]).attributes
    assert (a[sc.INPUT_TOKENS], a[sc.OUTPUT_TOKENS]) == (9, 3) and sc.USAGE_ESTIMATED not in a


def test_config_check_says_stream_usage_is_for_pass_through_models():
    cfg = GatewayConfig(models=[{"name": "a", "provider": "openai", "stream_usage": False},
                                {"name": "c", "provider": "anthropic", "model": "claude", "stream_usage": False}])
    said = [f.line() for f in findings(cfg, "tagway.yaml", {}, None) if "stream_usage" in f.where]
    assert said == ["models[1] (c).stream_usage: has no effect: anthropic is not passed the request as it is sent, "
                    "and its translation always counts a stream's tokens; remove it"]


@pytest.mark.parametrize("status,body,refused", [
    (400, {"error": {"message": "Unrecognized request argument supplied: stream_options", "param": None}}, True),
    (400, {"error": {"message": "bad", "param": "stream_options"}}, True),
    (422, {"detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
                       "msg": "Extra inputs are not permitted"}]}, True),
    # an error about something else that echoes the request (with the field tagway added) is not a refusal of it
    (422, {"detail": [{"type": "int_parsing", "loc": ["body", "max_tokens"], "msg": "Input should be an integer",
                       "input": {"max_tokens": "x", "stream_options": {"include_usage": True}}}]}, False),
    (400, {"error": {"message": "max_tokens is too large; request was {'stream_options': {'include_usage': true}}",
                     "param": "max_tokens"}}, False),
    (500, {"error": {"message": "Unrecognized request argument supplied: stream_options"}}, False),
    (400, {"error": 'json: unknown field "stream_options"'}, True),  # the error as a string (Go, TGI-style)
])
def test_only_an_error_about_the_field_is_a_refusal_of_it(status, body, refused):
    """A tenant's bad request that an upstream answers with an echo of the body must not switch usage off for every
    tenant of the deployment (review)."""
    assert refuses_stream_options(status, orjson.dumps(body), {"model": "m", "stream": True}) is refused
    assert refuses_stream_options(status, orjson.dumps(body), {"stream_options": {}}) is False  # the client's own
