"""The proxy's request path with a `HandlerProvider` upstream (gateway/providers/handler.py): the whole gateway runs
(auth, tags, routing, fallbacks, relay, span), only the network is a function, so each test states exactly what the
upstream did, including what a real fixture server cannot easily do (a stream that ends before its first event, a
transport failure on one deployment only). The client is the real openai SDK over httpx's ASGI transport."""
from __future__ import annotations

import httpx
import openai
import pytest

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from gateway.providers import HandlerProvider, ProviderRegistry, Stream, UpstreamFailure, UpstreamResponse
from tests.gateway_fixture import MemoryRecorder

KEY = "tw-test-handler-0123456789abcdefghijklmn"
SECRET = "sk-handler-secret-0123456789"


def completion(text: str, model: str = "up-model") -> dict:
    return {"id": "chatcmpl-h", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {},
                                 "finish_reason": finish}]
    out = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
           "choices": choices}
    if usage:
        out["usage"] = usage
    return out


def make(handlers: dict[str, HandlerProvider], monkeypatch: pytest.MonkeyPatch) -> tuple[TagwayApp, MemoryRecorder]:
    monkeypatch.setenv("HANDLER_KEY", SECRET)
    models = [{"name": "primary", "provider": "primary", "model": "up-model", "api_key_env": "HANDLER_KEY",
               "fallbacks": ["backup"]},
              {"name": "backup", "provider": "backup", "model": "backup-model"}]
    config = GatewayConfig(models=models, tenants=[{"customer": "acme", "keys": [{"id": "k1", "hash": hash_key(KEY)}]}])
    recorder = MemoryRecorder()
    return TagwayApp(config, recorder=recorder, providers=ProviderRegistry(overrides=handlers)), recorder


async def client_for(app: TagwayApp) -> openai.AsyncOpenAI:
    await app.startup()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key=KEY, http_client=http, max_retries=0)


async def test_upstream_gets_the_rewritten_body_and_the_span_says_what_happened(monkeypatch):
    primary = HandlerProvider(lambda call: completion("refund issued"))
    app, rec = make({"primary": primary, "backup": HandlerProvider(lambda c: completion("never"))}, monkeypatch)
    client = await client_for(app)
    raw = await client.chat.completions.with_raw_response.create(
        model="primary", messages=[{"role": "user", "content": "where is my refund?"}],
        metadata={"intent": "refund"}, extra_headers={"x-tagway-tags": "region=eu"})
    assert raw.parse().choices[0].message.content == "refund issued"
    sent = primary.calls[0]
    assert sent.payload["model"] == "up-model" and "metadata" not in sent.payload  # tagway's fields stay home
    span = rec.call(raw.headers["x-tagway-trace-id"])
    a = span.attributes
    assert (a[sc.CUSTOMER], a[sc.INTENT], a[sc.TAG_PREFIX + "region"]) == ("acme", "refund", "eu")
    assert (a[sc.INPUT_TOKENS], a[sc.OUTPUT_TOKENS], a[sc.ATTEMPTS]) == (5, 2, 1)
    await app.shutdown()


async def test_stream_relayed_usage_hidden_unless_asked(monkeypatch):
    events = [chunk("Your "), chunk("refund."), chunk(finish="stop"),
              chunk(usage={"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})]
    primary = HandlerProvider(lambda call: Stream(events))
    app, rec = make({"primary": primary, "backup": HandlerProvider(lambda c: completion("never"))}, monkeypatch)
    client = await client_for(app)
    stream = await client.chat.completions.create(model="primary", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    got = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Your refund."
    assert all(c.usage is None for c in got)  # the client did not ask for the usage chunk
    assert primary.calls[0].payload["stream_options"] == {"include_usage": True}  # but tagway did, for the record
    span = [s for s in rec.exporter.get_finished_spans() if s.attributes.get(sc.KIND) == "call"][-1]
    assert (span.attributes[sc.INPUT_TOKENS], span.attributes[sc.OUTPUT_TOKENS]) == (4, 3)
    assert '"Your refund."' in span.attributes[sc.OUTPUT_MESSAGES]
    await app.shutdown()


async def test_stream_that_ends_before_any_event_falls_back(monkeypatch):
    backup = HandlerProvider(lambda call: Stream([chunk("from backup"), chunk(finish="stop")]))
    empty = HandlerProvider(lambda call: Stream([], done=False))
    app, rec = make({"primary": empty, "backup": backup}, monkeypatch)
    client = await client_for(app)
    stream = await client.chat.completions.create(model="primary", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "from backup" and len(backup.calls) == 1
    span = [s for s in rec.exporter.get_finished_spans() if s.attributes.get(sc.KIND) == "call"][-1]
    assert span.attributes[sc.ATTEMPTS] == 2 and span.attributes[sc.DEPLOYMENT] == "backup"
    attempts = [s for s in rec.exporter.get_finished_spans() if s.attributes.get(sc.KIND) == "attempt"]
    assert [s.attributes.get(sc.ERROR_TYPE) for s in attempts[-2:]] == ["stream_cut", None]
    await app.shutdown()


async def test_stream_breaking_midway_cannot_fall_back_and_is_recorded(monkeypatch):
    broken = HandlerProvider(lambda call: Stream([chunk("partial "), UpstreamFailure("stream_cut", "connection reset")],
                                                 done=False))
    backup = HandlerProvider(lambda call: completion("never"))
    app, rec = make({"primary": broken, "backup": backup}, monkeypatch)
    client = await client_for(app)
    stream = await client.chat.completions.create(model="primary", stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    assert backup.calls == []  # bytes had reached the client: no second answer can follow
    span = [s for s in rec.exporter.get_finished_spans() if s.attributes.get(sc.KIND) == "call"][-1]
    assert span.attributes[sc.ERROR_TYPE] == "stream_cut"
    await app.shutdown()


async def test_a_provider_refusing_the_gateways_key_falls_back_then_is_a_502_with_the_key_scrubbed(monkeypatch):
    """A provider's 401 is about the gateway's own key: the next deployment is tried (another key, another
    provider), and when every one refuses, the client gets a 502 upstream_auth_error quoting the provider (its key
    scrubbed), not a 401 its SDK would blame on the client's valid key."""
    body = ('{"error": {"message": "Incorrect API key provided: %s", "type": "invalid_request_error", '
            '"param": null, "code": "invalid_api_key"}}' % SECRET).encode()
    primary = HandlerProvider(lambda call: UpstreamResponse(401, body))
    refused = ('{"error": {"message": "project of key %s has no access"}}' % SECRET).encode()
    backup = HandlerProvider(lambda call: UpstreamResponse(403, refused))
    app, rec = make({"primary": primary, "backup": backup}, monkeypatch)
    client = await client_for(app)
    with pytest.raises(openai.InternalServerError) as e:
        await client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "hi"}])
    assert SECRET not in e.value.response.text and e.value.status_code == 502
    assert e.value.code == "upstream_auth_error" and "HTTP 403: project of key *** has no access" in e.value.message
    assert len(backup.calls) == 1  # tried: its key may work where the first one's did not
    span = rec.call(e.value.response.headers["x-tagway-trace-id"])
    assert span.attributes[sc.ERROR_TYPE] == "http_403" and span.attributes[sc.ATTEMPTS] == 2
    await app.shutdown()


async def test_transport_failure_on_one_deployment_falls_back(monkeypatch):
    def refuse(call):
        raise UpstreamFailure("connect_error", "cannot connect to upstream: refused")

    backup = HandlerProvider(lambda call: completion("from backup", model="backup-model"))
    app, rec = make({"primary": HandlerProvider(refuse), "backup": backup}, monkeypatch)
    client = await client_for(app)
    out = await client.chat.completions.create(model="primary", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == "from backup"
    assert backup.calls[0].payload["model"] == "backup-model"
    assert app.proxy.stats.fallbacks == 1
    await app.shutdown()


def test_an_errors_own_headers_replace_the_upstreams_of_the_same_name():
    """A provider's 401 with `x-should-retry: true` and `retry-after`: the 502 said both true and false (read as
    'true, false', which the SDKs take for neither, so they retried) and relayed the provider's retry advice."""
    from gateway.errors import upstream_auth_error, with_own_headers  # noqa: PLC0415

    relayed = [(b"x-request-id", b"req-1"), (b"x-should-retry", b"true"), (b"retry-after", b"3"),
               (b"retry-after-ms", b"3000")]
    e = upstream_auth_error(401, b'{"error": {"message": "bad key"}}', "http_401")
    assert with_own_headers(e, relayed) == [(b"x-request-id", b"req-1"), (b"x-should-retry", b"false")]
