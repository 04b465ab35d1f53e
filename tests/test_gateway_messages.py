"""Anthropic's Messages API through tagway, for Anthropic-SDK clients: passed through to an Anthropic-compatible
upstream (the fixture's /v1/messages), streamed and not, recorded as a chat span; and translated by litellm when
the deployment is an OpenAI-compatible one."""
from __future__ import annotations

import json

import pytest

from exporters import semconv as sc
from tests.gateway_fixture import KEYS, UPSTREAM_KEY

anthropic = pytest.importorskip("anthropic")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MSGS = [{"role": "user", "content": "hello claude"}]


def client(gw) -> "anthropic.Anthropic":
    return anthropic.Anthropic(base_url=gw.url, api_key=KEYS["acme"], max_retries=0)  # sends x-api-key


def test_messages_create_is_passed_through(gateway, upstream):
    raw = client(gateway).messages.with_raw_response.create(
        model="claude", max_tokens=64, system="Be brief.", messages=MSGS,
        extra_headers={"anthropic-beta": "tools-2024-05-16", "x-tagway-intent": "hello"})
    msg = raw.parse()
    assert msg.content[0].text == "Claude echo: hello claude" and msg.usage.input_tokens == 11
    sent = upstream.last("/v1/messages")
    assert sent["body"]["model"] == "claude-test" and sent["body"]["system"] == "Be brief."
    h = {k.lower(): v for k, v in sent["headers"].items()}
    assert h["x-api-key"] == UPSTREAM_KEY and h["anthropic-version"] and h["anthropic-beta"] == "tools-2024-05-16"
    assert "authorization" not in h
    a = gateway.recorder.call(raw.headers["x-tagway-trace-id"]).attributes
    assert a[sc.OPERATION] == "chat" and a[sc.API] == "messages" and a[sc.PROVIDER] == "anthropic"
    assert a[sc.INTENT] == "hello" and a[sc.INPUT_TOKENS] == 11 and a[sc.OUTPUT_TOKENS] == 4
    assert tuple(a[sc.FINISH_REASONS]) == ("stop",) and a[sc.RESPONSE_ID] == "msg_test"
    assert json.loads(a[sc.SYSTEM_INSTRUCTIONS]) == [{"type": "text", "content": "Be brief."}]
    assert json.loads(a[sc.INPUT_MESSAGES]) == [{"role": "user", "parts": [{"type": "text", "content": "hello claude"}]}]
    assert json.loads(a[sc.OUTPUT_MESSAGES])[0]["parts"] == [{"type": "text", "content": "Claude echo: hello claude"}]
    assert json.loads(a[sc.REQUEST_PARAMS]) == {"max_tokens": 64, "tagway.api": "messages"}


def test_messages_stream(gateway):
    with client(gateway).messages.stream(model="claude", max_tokens=64, messages=MSGS) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() == "Claude echo: hello claude" and final.stop_reason == "end_turn"
    spans = [s for s in gateway.recorder.exporter.get_finished_spans()
             if s.attributes.get(sc.KIND) == "call" and s.attributes.get(sc.API) == "messages"
             and s.attributes.get(sc.REQUEST_STREAM)]
    a = spans[-1].attributes
    assert a[sc.INPUT_TOKENS] == 11 and a[sc.OUTPUT_TOKENS] == 4 and sc.ERROR_TYPE not in a
    assert json.loads(a[sc.OUTPUT_MESSAGES])[0]["parts"][0]["content"].strip() == "Claude echo: hello claude"
    events = [e.type for e in client(gateway).messages.create(model="claude", max_tokens=64, messages=MSGS,
                                                                  stream=True)]
    assert events[0] == "message_start" and events[-1] == "message_stop"


def test_upstream_error_reaches_the_sdk(gateway):
    with pytest.raises(anthropic.APIStatusError):
        client(gateway).messages.create(model="nope-model", max_tokens=8, messages=MSGS)


def test_messages_to_an_openai_deployment_are_translated(gateway, upstream):
    upstream.clear()
    msg = client(gateway).messages.create(model="gpt-test", max_tokens=64, messages=MSGS)
    assert msg.content[0].text == "Echo: hello claude"
    # litellm speaks OpenAI's own API to the upstream (its Responses or chat completions route), never /v1/messages
    assert [(r["path"], r["body"]["model"]) for r in upstream.requests] in (
        [("/v1/responses", "ok-model")], [("/v1/chat/completions", "ok-model")])
