"""The Responses API through tagway: the real openai SDK (create, the streaming helper) and the openai Agents SDK
(a tool-calling turn) against the fixture upstream's /v1/responses; recorded as chat spans with the Responses
shape's messages, tool calls, reasoning and cached tokens; fallbacks, cut streams, bad input; and litellm's
translation for a provider without the API."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from exporters import semconv as sc
from tests.gateway_fixture import KEYS, UPSTREAM_KEY

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["acme"], max_retries=0, **kw)


def attrs(gw, trace_id: str) -> dict:
    return dict(gw.recorder.call(trace_id).attributes)


def test_create_is_passed_through_and_recorded(gateway, upstream):
    raw = client(gateway).responses.with_raw_response.create(
        model="gpt-test", input="hello there", instructions="Be terse.", temperature=0.3, max_output_tokens=0,
        metadata={"intent": "greeting", "experiment": "b"}, extra_headers={"OpenAI-Beta": "responses=v1"})
    resp = raw.parse()
    assert resp.output_text == "Echo: hello there" and raw.headers["x-request-id"].startswith("req-")
    sent = upstream.last("/v1/responses")
    assert sent["body"]["model"] == "ok-model" and sent["body"]["max_output_tokens"] == 0
    assert sent["body"]["metadata"] == {"experiment": "b"}  # Responses store by default: metadata goes, tagway's keys not
    assert sent["headers"]["openai-beta"] == "responses=v1"
    a = attrs(gateway, raw.headers["x-tagway-trace-id"])
    assert a[sc.OPERATION] == "chat" and a[sc.API] == "responses" and a[sc.INTENT] == "greeting"
    assert a[sc.REQUEST_MODEL] == "ok-model" and a[sc.RESPONSE_MODEL] == "ok-model-2026" and a[sc.RESPONSE_ID] == resp.id
    assert a[sc.INPUT_TOKENS] == 12 and a[sc.OUTPUT_TOKENS] == 3
    assert a[sc.REASONING_TOKENS] == 3 and a[sc.CACHE_READ_TOKENS] == 2
    assert tuple(a[sc.FINISH_REASONS]) == ("stop",) and a[sc.REQUEST_MAX_TOKENS] == 0
    assert json.loads(a[sc.SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Be terse."}]
    assert json.loads(a[sc.INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text", "content": "hello there"}]}]
    assert json.loads(a[sc.OUTPUT_MESSAGES]) == [{"role": "assistant", "finish_reason": "stop", "parts": [
        {"type": "text", "content": "Echo: hello there"}]}]
    params = json.loads(a[sc.REQUEST_PARAMS])
    assert params == {"temperature": 0.3, "max_output_tokens": 0, "tagway.api": "responses"}  # replay reads the mark


def test_streaming_helper(gateway):
    with client(gateway).responses.stream(model="gpt-test", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "stream this please"}]}]) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Echo: stream this please"
    tid = stream.response.headers["x-tagway-trace-id"] if hasattr(stream, "response") else None
    spans = [s for s in gateway.recorder.exporter.get_finished_spans()
             if s.attributes.get(sc.RESPONSE_ID) == final.id and s.attributes.get(sc.KIND) == "call"]
    assert len(spans) == 1 and (tid is None or f"{spans[0].context.trace_id:032x}" == tid)
    a = spans[0].attributes
    assert a[sc.REQUEST_STREAM] is True and a[sc.TIME_TO_FIRST_CHUNK] > 0 and sc.ERROR_TYPE not in a
    assert a[sc.INPUT_TOKENS] == 13 and a[sc.OUTPUT_TOKENS] == 4 and tuple(a[sc.FINISH_REASONS]) == ("stop",)
    assert json.loads(a[sc.OUTPUT_MESSAGES])[0]["parts"] == [{"type": "text", "content": "Echo: stream this please"}]


def test_agents_sdk_runs_a_tool_calling_turn(gateway, upstream):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # the SDK would export its traces to OpenAI otherwise
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = agents.OpenAIResponsesModel(model="tools", openai_client=openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=KEYS["acme"], max_retries=0))
    agent = agents.Agent(name="weather", instructions="Use tools.", tools=[get_weather], model=model)
    upstream.clear()
    result = agents.Runner.run_sync(agent, "What's the weather in Paris?")
    assert calls == ["Paris"] and result.final_output == "The weather is sunny in Paris"
    first, second = [r for r in upstream.requests if r["path"] == "/v1/responses"]
    assert first["body"]["tools"][0]["name"] == "get_weather"
    outputs = [i for i in second["body"]["input"] if i.get("type") == "function_call_output"]
    assert outputs == [{"call_id": "call_w1", "output": "sunny in Paris", "type": "function_call_output"}]
    spans = sorted((s for s in gateway.recorder.exporter.get_finished_spans()
                    if s.attributes.get(sc.KIND) == "call" and s.attributes.get(sc.REQUESTED_MODEL) == "tools"
                    and s.attributes.get(sc.API) == "responses"), key=lambda s: s.start_time)[-2:]
    out1 = json.loads(spans[0].attributes[sc.OUTPUT_MESSAGES])
    assert out1 == [{"role": "assistant", "finish_reason": "tool_calls", "parts": [
        {"type": "tool_call", "id": "call_w1", "name": "get_weather", "arguments": {"city": "Paris"}}]}]
    in2 = json.loads(spans[1].attributes[sc.INPUT_MESSAGES])
    assert in2[-2]["parts"][0]["type"] == "tool_call" and in2[-1] == {
        "role": "tool", "parts": [{"type": "tool_call_response", "id": "call_w1", "response": "sunny in Paris"}]}


def test_agents_sdk_streamed_turn(gateway):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"rain in {city}"

    model = agents.OpenAIResponsesModel(model="tools", openai_client=openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=KEYS["acme"], max_retries=0))
    agent = agents.Agent(name="weather", instructions="Use tools.", tools=[get_weather], model=model)

    async def run() -> str:
        result = agents.Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in result.stream_events():
            pass
        return result.final_output

    import asyncio
    assert asyncio.run(run()) == "The weather is rain in Paris"


def test_fallback_and_cut_stream(gateway):
    raw = client(gateway).responses.with_raw_response.create(model="flaky", input="hi")
    assert raw.parse().output_text == "Echo: hi"
    a = attrs(gateway, raw.headers["x-tagway-trace-id"])
    assert a[sc.ATTEMPTS] == 2 and a[sc.DEPLOYMENT] == "gpt-test"
    with pytest.raises(openai.APIError, match="Upstream stream failed"):
        for _ in client(gateway).responses.create(model="cut", input="one two three", stream=True):
            pass
    cut = [s for s in gateway.recorder.exporter.get_finished_spans() if s.attributes.get(sc.REQUESTED_MODEL) == "cut"
           and s.attributes.get(sc.API) == "responses"]
    assert cut and cut[-1].attributes[sc.ERROR_TYPE] == "stream_cut"


@pytest.mark.parametrize("body,code,param", [
    ({"model": "gpt-test", "input": 42}, "invalid_input", "input"),
    ({"model": "gpt-test", "input": ["x"]}, "invalid_input", "input[0]"),
    ({"model": "gpt-test", "input": "x", "instructions": {"a": 1}}, "invalid_type", "instructions"),
    ({"input": "x"}, "missing_model", "model"),
])
def test_bad_responses_requests(gateway, body, code, param):
    r = httpx.post(gateway.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == code and r.json()["error"]["param"] == param
    assert attrs(gateway, r.headers["x-tagway-trace-id"])[sc.ERROR_TYPE] == code


def test_translated_for_a_provider_without_the_api(gateway, upstream):
    """`claude` is an Anthropic deployment: litellm turns the Responses call into Anthropic messages and back."""
    raw = client(gateway).responses.with_raw_response.create(model="claude", input="translate me", max_output_tokens=50)
    assert "translate me" in raw.parse().output_text
    assert upstream.last("/v1/messages")["body"]["model"] == "claude-test"
    a = attrs(gateway, raw.headers["x-tagway-trace-id"])
    assert a[sc.PROVIDER] == "anthropic" and a[sc.API] == "responses" and a[sc.INPUT_TOKENS] == 11


def test_a_translated_call_takes_only_the_apis_fields_not_litellms_controls(gateway, upstream):
    """Every body field went to litellm as a keyword argument, among them its own controls: `api_base` (where the
    operator's provider key is sent), `api_key`, `mock_response` (an answer no provider gave). Only the API's fields
    go now; the call reaches the configured upstream with the configured key."""
    upstream.clear()
    r = httpx.post(gateway.url + "/v1/responses", headers={"authorization": f"Bearer {KEYS['acme']}"}, json={
        "model": "claude", "input": "translate me", "max_output_tokens": 50, "api_base": "http://127.0.0.1:9/v1",
        "api_key": "sk-client-chosen", "mock_response": "pwned", "custom_llm_provider": "openai"})
    assert r.status_code == 200, r.text
    assert "translate me" in r.text and "pwned" not in r.text
    sent = upstream.last("/v1/messages")
    assert sent["body"]["model"] == "claude-test" and sent["headers"]["x-api-key"] == UPSTREAM_KEY
    r = httpx.post(gateway.url + "/v1/messages", headers={"authorization": f"Bearer {KEYS['acme']}"}, json={
        "model": "gpt-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
        "mock_response": "pwned", "api_key": "sk-client-chosen"})
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "Echo: hi", r.text


def test_a_module_litellm_lacks_is_a_one_line_500_of_ours_not_an_upstream_failure(gateway, upstream, monkeypatch):
    """litellm imports some modules only when a call needs them (its Responses path imports `mcp`); one that is not
    installed is the gateway's failure: a 500 naming the module, no traceback or bug-report link for the client,
    recorded as `translation_unavailable` after one attempt (no fallback), not as the upstream's 500."""
    import sys  # noqa: PLC0415
    for name in [m for m in sys.modules if m.startswith(("litellm.responses.mcp", "litellm.proxy._experimental"))]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("mcp", "mcp.types"):
        monkeypatch.setitem(sys.modules, name, None)  # `import mcp.types` now raises ImportError
    with pytest.raises(openai.InternalServerError) as e:
        client(gateway).responses.create(model="claude", input="translate me", max_output_tokens=50)
    err = e.value.body
    assert err["code"] == "translation_unavailable" and "mcp" in err["message"], err
    assert "Traceback" not in err["message"] and "\n" not in err["message"] and "github.com" not in err["message"]
    a = attrs(gateway, e.value.response.headers["x-tagway-trace-id"])
    assert a[sc.ERROR_TYPE] == "translation_unavailable" and a["tagway.attempts"] == 1


def test_a_tenants_response_is_its_own_the_moment_it_arrives(gateway, monkeypatch):
    """A follow-up turn may name a response the moment its answer (or its stream's first event) arrives: its owner
    is known before the answer leaves the gateway. It was recorded after capture, which runs on a worker thread for
    a long call, and a tenant's next turn was refused its own response meanwhile (a review: 1-3 in 10 with a 300 KB
    input). Capture is slowed here so the gap cannot close by luck."""
    proxy = gateway.app.proxy
    capture = proxy._capture

    async def slow_capture(call, *, inline):
        await asyncio.sleep(1.5)
        await capture(call, inline=inline)

    monkeypatch.setattr(proxy, "_capture", slow_capture)
    c = client(gateway)
    first = c.responses.create(model="gpt-test", input="hello there")
    assert c.responses.create(model="gpt-test", input="and again", previous_response_id=first.id).id
    with c.responses.stream(model="gpt-test", input="streamed") as s:
        created = next(e for e in s if e.type == "response.created").response.id
        # the stream is still open (and its capture not begun): its id is already the tenant's
        assert c.responses.create(model="gpt-test", input="and again", previous_response_id=created).id
        assert created == s.get_final_response().id
