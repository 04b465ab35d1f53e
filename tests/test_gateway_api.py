"""The gateway through the real openai SDK against a real upstream HTTP server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from exporters import semconv as sc
from tests.gateway_fixture import KEYS, UPSTREAM_KEY

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"}]


def client(gw, key: str = KEYS["acme"], **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, **kw)


def trace_of(raw) -> str:
    tid = raw.headers["x-tagway-trace-id"]
    assert len(tid) == 32
    return tid


def test_chat_non_stream_forwards_and_stamps(gateway, upstream):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=MSG, temperature=0.2,
        extra_headers={"x-tagway-intent": "Refund Flow", "x-tagway-prompt-version": "v7",
                       "x-tagway-tags": "region=EU,feature=returns"},
        metadata={"experiment": "b"})
    resp = raw.parse()
    assert resp.choices[0].message.content == "Echo: hello there"
    assert resp.usage.prompt_tokens == 12 and resp.usage.completion_tokens == 3
    sent = upstream.last()
    assert sent["body"]["model"] == "ok-model"  # public name mapped to the upstream model
    assert "metadata" not in sent["body"]  # tagway's fields never reach the provider
    assert sent["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the provider key, not the client's
    assert not any(h.lower().startswith("x-tagway") for h in sent["headers"])
    span = gateway.recorder.call(trace_of(raw))
    a = span.attributes
    assert span.name == "chat gpt-test"
    assert span.kind.name == "CLIENT"
    assert a[sc.CUSTOMER] == "acme" and a[sc.KEY_ID] == "acme-1"
    assert a[sc.INTENT] == "refund_flow" and a[sc.PROMPT_VERSION] == "v7"
    assert a[sc.TAG_PREFIX + "region"] == "eu" and a[sc.TAG_PREFIX + "feature"] == "returns"
    assert a[sc.TAG_PREFIX + "experiment"] == "b"
    assert a[sc.INPUT_TOKENS] == 12 and a[sc.OUTPUT_TOKENS] == 3
    assert a[sc.COST_USD] == pytest.approx(12e-6 + 3 * 2e-6)
    assert float(raw.headers["x-tagway-cost-usd"]) == pytest.approx(18e-6)
    assert a[sc.REQUEST_MODEL] == "ok-model" and a[sc.RESPONSE_MODEL] == "ok-model-2026"
    assert a[sc.PROVIDER] == "openai" and a[sc.SERVER_ADDRESS] == "127.0.0.1"
    assert tuple(a[sc.FINISH_REASONS]) == ("stop",)
    assert a[sc.REQUEST_STREAM] is False and a[sc.REQUEST_TEMPERATURE] == 0.2
    assert json.loads(a[sc.SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "You are terse."}]
    assert json.loads(a[sc.INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text", "content": "hello there"}]}]
    out = json.loads(a[sc.OUTPUT_MESSAGES])
    assert out[0]["parts"][0]["content"] == "Echo: hello there" and out[0]["finish_reason"] == "stop"
    assert json.loads(a[sc.REQUEST_PARAMS]) == {"temperature": 0.2}
    assert sc.ERROR_TYPE not in a and span.status.status_code.name == "UNSET"


def test_unchanged_body_is_forwarded_byte_for_byte(gateway, upstream):
    body = b'{"model": "ok-model",   "messages": [{"role": "user", "content": "same bytes"}]}'
    cfg_model = "ok-model"
    # a deployment whose public name equals its upstream name needs no rewrite: add one on the fly via the mock-free
    # path by asking for gpt-test would rewrite, so check the rewrite case keeps every other field intact instead
    r = httpx.post(gateway.url + "/v1/chat/completions", content=body.replace(cfg_model.encode(), b"gpt-test"),
                   headers={"authorization": f"Bearer {KEYS['acme']}", "content-type": "application/json"})
    assert r.status_code == 200
    assert upstream.last()["body"] == {"model": "ok-model", "messages": [{"role": "user", "content": "same bytes"}]}


async def test_async_client_concurrent_calls(gateway):
    c = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    results = await asyncio.gather(*[
        c.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": f"n{i}"}])
        for i in range(20)])
    assert sorted(r.choices[0].message.content for r in results) == sorted(f"Echo: n{i}" for i in range(20))
    await c.close()


def test_stream_with_usage_requested(gateway, upstream):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="gpt-test", messages=MSG, stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hello there"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    a = gateway.recorder.call(trace_of(raw)).attributes
    assert a[sc.REQUEST_STREAM] is True and a[sc.OUTPUT_TOKENS] == 3
    assert a[sc.TIME_TO_FIRST_CHUNK] > 0
    assert json.loads(a[sc.OUTPUT_MESSAGES])[0]["parts"][0]["content"] == "Echo: hello there"


def test_stream_without_usage_hides_the_usage_chunk_but_records_usage(gateway, upstream):
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, stream=True)
    chunks = list(raw.parse())
    assert all(c.choices for c in chunks), "the extra usage chunk must be hidden from a client that did not ask"
    assert all(c.usage is None for c in chunks)
    assert upstream.last()["body"]["stream_options"] == {"include_usage": True}
    a = gateway.recorder.call(trace_of(raw)).attributes
    assert a[sc.INPUT_TOKENS] == 12 and a[sc.OUTPUT_TOKENS] == 3 and a[sc.COST_USD] > 0


def test_tool_calls_non_stream_and_stream(gateway):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client(gateway).chat.completions.create(model="tools", messages=MSG, tools=tools)
    tc = r.choices[0].message.tool_calls[0]
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    raw = client(gateway).chat.completions.with_raw_response.create(model="tools", messages=MSG, tools=tools,
                                                                      stream=True)
    chunks = list(raw.parse())
    args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or ""
                   for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    assert json.loads(args) == {"city": "Paris"}
    a = gateway.recorder.call(trace_of(raw)).attributes
    out = json.loads(a[sc.OUTPUT_MESSAGES])[0]
    assert out["finish_reason"] == "tool_calls"
    assert out["parts"] == [{"type": "tool_call", "id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]
    assert json.loads(a[sc.REQUEST_PARAMS])["tools"] == tools


def test_embeddings_completions_and_models(gateway):
    c = client(gateway)
    e = c.embeddings.with_raw_response.create(model="embed", input=["a", "b"])
    assert [d.embedding for d in e.parse().data] == [[0.1, 0.2, 0.3]] * 2
    a = gateway.recorder.call(trace_of(e)).attributes
    assert a[sc.OPERATION] == "embeddings" and a[sc.INPUT_TOKENS] == 8
    assert sc.OUTPUT_MESSAGES not in a and json.loads(a[sc.INPUT_MESSAGES])[0]["parts"][1]["content"] == "b"
    comp = c.completions.with_raw_response.create(model="gpt-test", prompt="say hi")
    assert comp.parse().choices[0].text == "Echo: say hi"
    assert gateway.recorder.call(trace_of(comp)).attributes[sc.OPERATION] == "text_completion"
    ids = {m.id for m in c.models.list()}
    assert {"gpt-test", "claude", "mock", "embed"} <= ids
    assert c.models.retrieve("gpt-test").id == "gpt-test"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    # a tenant limited to one model sees only that one, and cannot retrieve the others
    g = client(gateway, KEYS["globex"])
    assert [m.id for m in g.models.list()] == ["gpt-test"]
    with pytest.raises(openai.NotFoundError):
        g.models.retrieve("claude")


def test_mock_provider(gateway):
    r = client(gateway).chat.completions.create(model="mock", messages=MSG)
    assert r.choices[0].message.content == "hello from mock"
    s = list(client(gateway).chat.completions.create(model="mock", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "hello from mock"


# -- fallbacks and upstream errors --------------------------------------------------------------------------------
def test_fallback_on_503_records_attempts(gateway, upstream):
    raw = client(gateway).chat.completions.with_raw_response.create(model="flaky", messages=MSG)
    assert raw.parse().choices[0].message.content == "Echo: hello there"
    tid = trace_of(raw)
    call = gateway.recorder.call(tid)
    a = call.attributes
    assert a[sc.ATTEMPTS] == 2 and a[sc.DEPLOYMENT] == "gpt-test" and a[sc.REQUESTED_MODEL] == "flaky"
    assert sc.ERROR_TYPE not in a
    attempts = sorted((s for s in gateway.recorder.spans(tid) if s.attributes.get(sc.KIND) == "attempt"),
                      key=lambda s: s.attributes["tagway.attempt"])
    assert [s.attributes[sc.DEPLOYMENT] for s in attempts] == ["flaky", "gpt-test"]
    assert attempts[0].attributes[sc.ERROR_TYPE] == "http_503" and attempts[0].parent.span_id == call.context.span_id
    assert sc.ERROR_TYPE not in attempts[1].attributes


def test_fallback_chain_429_then_503_then_ok_streaming(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="rate-limited", messages=MSG, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == "Echo: hello there"
    assert gateway.recorder.call(trace_of(raw)).attributes[sc.ATTEMPTS] == 3


def test_fallback_on_timeout_and_connect_error(gateway):
    for model in ("slow", "down"):
        raw = client(gateway).chat.completions.with_raw_response.create(model=model, messages=MSG)
        assert raw.parse().choices[0].message.content == "Echo: hello there"
        tid = trace_of(raw)
        first = [s for s in gateway.recorder.spans(tid) if s.attributes.get("tagway.attempt") == 1][0]
        assert first.attributes[sc.ERROR_TYPE] == ("timeout" if model == "slow" else "connect_error")


def test_client_errors_are_not_retried_elsewhere(gateway, upstream):
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).chat.completions.create(model="bad-request", messages=MSG)
    assert len(upstream.requests) == 1, "a 400 from the provider is the caller's problem: no fallback"
    assert "upstream says 400" in e.value.message


def test_a_provider_refusing_the_gateways_key_is_a_502_not_the_clients_401(gateway, upstream):
    """An upstream 401/403 is about the gateway's provider key or account: relayed as is, the client's SDK raised
    AuthenticationError, as if the client's valid tagway key were wrong. It is a 502 naming the provider's refusal
    (scrubbed), recorded as the upstream's status; another deployment in the chain is tried first."""
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway).chat.completions.create(model="provider-key-bad", messages=MSG)
    err = e.value.response.json()["error"]
    assert e.value.status_code == 502 and (err["code"], err["type"]) == ("upstream_auth_error", "api_error")
    assert err["message"].startswith("The provider refused the gateway's credentials for this model (HTTP 401: "
                                     "upstream says 401 (key ***)). Your key is fine")
    assert UPSTREAM_KEY not in e.value.response.text
    assert e.value.response.headers["x-should-retry"] == "false"  # the SDKs would retry a 5xx that cannot pass
    span = gateway.recorder.call(e.value.response.headers["x-tagway-trace-id"])
    assert span.attributes[sc.ERROR_TYPE] == "http_401"
    # an app whose SDK sends OpenAI-Organization (OPENAI_ORG_ID) hears that its header went with the gateway's key
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway, KEYS["platform"], organization="org-app").chat.completions.create(model="provider-key-bad",
                                                                                       messages=MSG)
    said = e.value.response.json()["error"]["message"]
    assert "Your request's openai-organization: org-app went with the gateway's provider key" in said, said
    assert "Your key is fine" not in said and e.value.response.headers["x-should-retry"] == "false"
    upstream.clear()
    raw = client(gateway).chat.completions.with_raw_response.create(model="provider-forbids", messages=MSG)
    assert raw.parse().choices[0].message.content == "Echo: hello there" and len(upstream.requests) == 2
    assert gateway.recorder.call(raw.headers["x-tagway-trace-id"]).attributes[sc.ATTEMPTS] == 2


def test_a_translated_providers_refusal_names_no_header_it_never_got(upstream):
    """litellm's translation sends none of the client's headers: an Anthropic deployment refusing the gateway's key
    is the key's fault, whatever OpenAI-Organization the client sent (review: the 502 blamed the header)."""
    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.config import GatewayConfig  # noqa: PLC0415
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config  # noqa: PLC0415

    cfg = gateway_config(upstream.base_url)
    cfg["models"] = [*cfg["models"], {"name": "claude-key-bad", "provider": "anthropic", "model": "fail401-claude",
                                      "base_url": upstream.url, "api_key_env": "TEST_UPSTREAM_KEY"}]
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=MemoryRecorder())).start()
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client(server, organization="org-app").chat.completions.create(model="claude-key-bad", messages=MSG)
    finally:
        server.stop()
    said = e.value.response.json()["error"]
    assert said["code"] == "upstream_auth_error" and "Your key is fine" in said["message"], said
    assert "org-app" not in said["message"]


def test_final_upstream_error_is_relayed_without_secrets(gateway):
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway).chat.completions.create(model="broken", messages=MSG)
    assert e.value.status_code == 500
    assert UPSTREAM_KEY not in e.value.response.text and "***" in e.value.response.text
    tid = e.value.response.headers["x-tagway-trace-id"]
    span = gateway.recorder.call(tid)
    assert span.attributes[sc.ERROR_TYPE] == "http_500" and span.status.status_code.name == "ERROR"
    assert span.attributes[sc.HTTP_STATUS] == 500
    with pytest.raises(openai.APIStatusError) as e2:
        client(gateway).chat.completions.create(model="garbage", messages=MSG)
    assert e2.value.status_code == 502 and e2.value.response.json()["error"]["code"] == "upstream_error"


def test_timeout_without_fallback_is_504(gateway):
    with pytest.raises(openai.APIStatusError) as e:
        client(gateway).chat.completions.create(model="slow-alone", messages=MSG)
    assert e.value.status_code == 504
    assert gateway.recorder.call(e.value.response.headers["x-tagway-trace-id"]).attributes[sc.ERROR_TYPE] == "timeout"


def test_stream_cut_midway_ends_with_an_error_the_sdk_raises(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="cut", messages=MSG, stream=True)
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in raw.parse():
            got.append(c)
    assert got, "the first chunk reached the client before the cut"
    assert "stream" in str(e.value).lower()
    span = gateway.recorder.call(trace_of(raw))
    assert span.attributes[sc.ERROR_TYPE] == "stream_cut" and span.status.status_code.name == "ERROR"
    # cut before its usage chunk, yet billed: estimated counts, marked. Prompt: 25 characters -> 7 tokens, plus 3
    # for each of the 2 messages and the reply's primer; output: "Echo:" before the cut -> 2
    assert (span.attributes[sc.INPUT_TOKENS], span.attributes[sc.OUTPUT_TOKENS]) == (16, 2)
    assert span.attributes[sc.USAGE_ESTIMATED] is True


def test_client_disconnect_mid_stream_is_recorded(gateway):
    with httpx.Client(base_url=gateway.url, timeout=10) as h:
        with h.stream("POST", "/v1/chat/completions", json={"model": "slowstream", "messages": MSG, "stream": True},
                      headers={"authorization": f"Bearer {KEYS['acme']}"}) as r:
            tid = r.headers["x-tagway-trace-id"]
            next(r.iter_raw())  # first event arrives, then we hang up
    span = gateway.recorder.call(tid, timeout=10)
    assert span.attributes[sc.ERROR_TYPE] == "client_disconnected"
    assert span.attributes[sc.CLIENT_DISCONNECTED] is True
    assert span.attributes[sc.INPUT_TOKENS] == 16 and span.attributes[sc.USAGE_ESTIMATED] is True
    # a stream that ends with its usage chunk keeps the provider's counts, unmarked
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, stream=True)
    list(raw.parse())
    done = gateway.recorder.call(trace_of(raw))
    usage = (done.attributes[sc.INPUT_TOKENS], done.attributes[sc.OUTPUT_TOKENS])
    assert sc.USAGE_ESTIMATED not in done.attributes and usage == (12, 3)  # tests/upstream.py's counts


# -- litellm-translated provider -----------------------------------------------------------------------------------
def test_anthropic_through_litellm(gateway, upstream):
    raw = client(gateway).chat.completions.with_raw_response.create(model="claude", messages=MSG, max_tokens=50)
    r = raw.parse()
    assert r.choices[0].message.content == "Claude echo: hello there"
    sent = upstream.last("/v1/messages")
    assert sent["body"]["model"] == "claude-test" and sent["headers"]["x-api-key"] == UPSTREAM_KEY
    assert sent["body"]["system"][0]["text"] == "You are terse." if isinstance(sent["body"]["system"], list) \
        else sent["body"]["system"] == "You are terse."
    a = gateway.recorder.call(trace_of(raw)).attributes
    assert a[sc.PROVIDER] == "anthropic" and a[sc.INPUT_TOKENS] == 11 and a[sc.OUTPUT_TOKENS] == 4
    assert a[sc.COST_USD] == pytest.approx(11 * 3e-6 + 4 * 1.5e-5)
    chunks = list(client(gateway).chat.completions.create(model="claude", messages=MSG, max_tokens=50, stream=True,
                                                          stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == "Claude echo: hello there"


def test_a_parameter_the_translated_provider_lacks_is_refused_in_tagways_terms_or_dropped(gateway, upstream):
    """litellm refuses an OpenAI parameter Anthropic has no equivalent for, telling the client to set
    `litellm.drop_params` or a LiteLLM proxy setting: the client gets OpenAI's own shape for it instead, naming the
    parameter and tagway's setting; a model with `drop_params: true` drops it and answers."""
    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.config import GatewayConfig  # noqa: PLC0415
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config  # noqa: PLC0415

    with pytest.raises(openai.BadRequestError) as e:
        client(gateway).chat.completions.create(model="claude", messages=MSG, max_tokens=50, presence_penalty=0.5)
    err = e.value
    assert (err.code, err.type, err.param) == ("unsupported_parameter", "invalid_request_error", "presence_penalty")
    assert "anthropic does not support presence_penalty" in err.message and "drop_params: true" in err.message
    assert "litellm" not in err.message.lower() and "claude-test" not in err.message  # the public model name
    span = gateway.recorder.call(err.response.headers["x-tagway-trace-id"])
    assert span.attributes[sc.ERROR_TYPE] == "unsupported_parameter" and span.attributes[sc.HTTP_STATUS] == 400

    cfg = gateway_config(upstream.base_url)
    cfg["models"] = [dict(m, drop_params=True) if m["name"] == "claude" else m for m in cfg["models"]]
    recorder = MemoryRecorder()
    lenient = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=recorder)).start()
    try:
        for stream in (False, True):
            r = client(lenient).chat.completions.create(model="claude", messages=MSG, max_tokens=50, seed=3,
                                                        presence_penalty=0.5, stream=stream)
            text = r.choices[0].message.content if not stream else "".join(
                c.choices[0].delta.content or "" for c in r if c.choices)
            assert text.strip() == "Claude echo: hello there"
            sent = upstream.last("/v1/messages")["body"]
            assert "presence_penalty" not in sent and "seed" not in sent and sent["max_tokens"] == 50
    finally:
        lenient.stop()
        recorder.shutdown()


def test_mid_stream_error_event_is_relayed_without_secrets(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="midstream-error", messages=MSG,
                                                                      stream=True)
    with pytest.raises(openai.APIError) as e:
        list(raw.parse())
    assert "overloaded" in str(e.value) and UPSTREAM_KEY not in str(e.value)
    span = gateway.recorder.call(trace_of(raw))
    assert span.attributes[sc.ERROR_TYPE] == "upstream_stream_error"
    assert UPSTREAM_KEY not in (span.status.description or "") and "***" in span.status.description


def test_a_stream_the_upstream_ends_with_its_error_event_is_its_error_told_once_and_billed(gateway):
    """OpenAI ends a failed stream with an error event and no [DONE]: the client gets that event alone (it was
    followed by tagway's own 'stream without [DONE]' one), and the record says the provider's error, not a cut,
    at estimated counts (app-developer trial)."""
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['acme']}"},
                      json={"model": "error-end", "messages": MSG, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
        trace = r.headers["x-tagway-trace-id"]
    errors = [json.loads(e[6:]) for e in events if '"error"' in e]
    assert [e["error"]["message"] for e in errors] == ["The server had an error while processing your request."]
    with pytest.raises(openai.APIError, match="The server had an error"):  # the SDK raises the provider's words
        list(client(gateway).chat.completions.create(model="error-end", messages=MSG, stream=True))
    a = gateway.recorder.call(trace).attributes
    assert a[sc.ERROR_TYPE] == "upstream_stream_error" and a[sc.USAGE_ESTIMATED] in (True, "true")
    assert a[sc.INPUT_TOKENS] > 0 and a[sc.OUTPUT_TOKENS] >= 1
    # the Responses API's error event: the provider's error, and billed at estimates too (it was 0 tokens)
    with httpx.stream("POST", gateway.url + "/v1/responses", headers={"authorization": f"Bearer {KEYS['acme']}"},
                      json={"model": "error-end", "input": "hello there", "stream": True}) as r:
        assert sum(1 for line in r.iter_lines() if line.startswith("event: error")) == 1
        trace = r.headers["x-tagway-trace-id"]
    a = gateway.recorder.call(trace).attributes
    assert a[sc.ERROR_TYPE] == "upstream_stream_error" and a[sc.USAGE_ESTIMATED] in (True, "true")
    assert a[sc.INPUT_TOKENS] > 0 and a[sc.OUTPUT_TOKENS] >= 1


def test_non_stream_client_hang_up_cancels_the_upstream_call_and_is_recorded(gateway, upstream):
    upstream.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.url + "/v1/chat/completions", json={"model": "slow-alone", "messages": MSG},
                   headers={"authorization": f"Bearer {KEYS['acme']}", "x-tagway-intent": "hangup"}, timeout=0.3)
    deadline = time.monotonic() + 5
    span = None
    while span is None and time.monotonic() < deadline:
        spans = [s for s in gateway.recorder.exporter.get_finished_spans()
                 if s.attributes.get(sc.INTENT) == "hangup" and s.attributes.get(sc.KIND) == "call"]
        span = spans[0] if spans else None
        time.sleep(0.05)
    assert span is not None
    assert span.attributes[sc.ERROR_TYPE] == "client_disconnected" and span.attributes[sc.CLIENT_DISCONNECTED]
    assert (span.end_time - span.start_time) / 1e9 < 1.5, "the 2 s upstream call was abandoned, not awaited"


def test_caller_trace_is_linked_and_each_call_gets_its_own_trace(gateway):
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    c = client(gateway, default_headers={"traceparent": parent})
    a = c.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG)
    b = c.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG)
    assert trace_of(a) != trace_of(b) != "0af7651916cd43dd8448eb211c80319c"
    span = gateway.recorder.call(trace_of(a))
    assert span.parent is None
    assert [f"{link.context.trace_id:032x}" for link in span.links] == ["0af7651916cd43dd8448eb211c80319c"]
