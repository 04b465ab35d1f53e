"""What an OpenAI-SDK app gets from a model tagway translates with litellm (the test upstream's Anthropic Messages
API on 127.0.0.1, provider anthropic), beside what OpenAI itself answers (app-developer trial):

- chat streams in OpenAI's chunk shape: the usage on a chunk of its own with `choices: []`, sent only when the
  client asked (`stream_options.include_usage`); none of litellm's own keys (`provider_specific_fields`,
  `citations`), in the stream or in a whole answer;
- a Responses follow-up turn (`previous_response_id`) a clear 400 naming what to send instead, not litellm's 500
  asking for its proxy's dependencies (which the SDK retried 3 times);
- a translated response's id opaque (litellm's is base64 naming the provider), and the stored-response routes
  answering it the README's 501, not 400 invalid_resource_id."""
from __future__ import annotations

import base64

import httpx
import openai
import orjson
import pytest

from exporters import semconv as sc
from tests.gateway_fixture import KEYS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MSG = [{"role": "user", "content": "hello there"}]
AUTH = {"authorization": f"Bearer {KEYS['acme']}"}
LITELLM_ONLY = ("provider_specific_fields", "citations")


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["acme"], max_retries=0)


def sse_chunks(gw, **body) -> tuple[list[dict], str]:
    r = httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "claude", "messages": MSG, "max_tokens": 50, "stream": True, **body})
    assert r.status_code == 200, r.text
    data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [orjson.loads(d) for d in data[:-1]], r.headers["x-tagway-trace-id"]


def litellm_keys(chunk: dict) -> list[str]:
    found = [k for k in LITELLM_ONLY if k in chunk]
    for c in chunk.get("choices") or []:
        found += [f"choices.{k}" for k in LITELLM_ONLY if k in c]
        for part in ("delta", "message"):
            found += [f"{part}.{k}" for k in LITELLM_ONLY if k in (c.get(part) or {})]
    return found


def test_a_translated_stream_with_include_usage_ends_with_a_usage_chunk_without_choices(gateway):
    chunks, trace = sse_chunks(gateway, stream_options={"include_usage": True})
    *content, last = chunks
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 11 and last["usage"]["completion_tokens"] == 4
    assert content[-1]["choices"][0]["finish_reason"] == "stop"  # the stop chunk comes before the usage
    assert all("usage" not in c for c in content)
    assert [k for c in chunks for k in litellm_keys(c)] == []
    # the SDK's view: the last chunk has no choices, and the usage
    stream = client(gateway).chat.completions.create(model="claude", messages=MSG, max_tokens=50, stream=True,
                                                     stream_options={"include_usage": True})
    sdk = list(stream)
    assert sdk[-1].choices == [] and sdk[-1].usage.total_tokens == 15
    assert "".join(c.choices[0].delta.content or "" for c in sdk if c.choices).strip() == "Claude echo: hello there"
    a = gateway.recorder.call(trace).attributes
    assert (a[sc.INPUT_TOKENS], a[sc.OUTPUT_TOKENS]) == (11, 4) and sc.USAGE_ESTIMATED not in a


def test_a_translated_stream_without_include_usage_carries_no_usage(gateway):
    chunks, trace = sse_chunks(gateway)
    assert all("usage" not in c for c in chunks) and all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert [k for c in chunks for k in litellm_keys(c)] == []
    a = gateway.recorder.call(trace).attributes  # tagway still counted the provider's own numbers
    assert (a[sc.INPUT_TOKENS], a[sc.OUTPUT_TOKENS]) == (11, 4) and sc.USAGE_ESTIMATED not in a


def test_a_translated_whole_answer_carries_none_of_litellms_keys(gateway):
    r = httpx.post(gateway.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "claude", "messages": MSG, "max_tokens": 50})
    assert r.status_code == 200, r.text
    obj = r.json()
    assert obj["choices"][0]["message"]["content"] == "Claude echo: hello there"
    assert litellm_keys(obj) == [] and None not in obj["usage"].values()


def test_a_translated_responses_follow_up_turn_is_a_400_naming_what_to_send_instead(gateway, upstream):
    first = client(gateway).responses.create(model="claude", input="hello there", max_output_tokens=50)
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as e:  # a 400: the SDK does not retry it
        client(gateway).responses.create(model="claude", input="and again", previous_response_id=first.id,
                                         max_output_tokens=50)
    err = e.value
    assert (err.code, err.param) == ("unsupported_parameter", "previous_response_id")
    assert "`input`" in err.message and "whole conversation" in err.message
    assert "litellm" not in err.message.lower() and "pip install" not in err.message
    assert upstream.requests == []  # refused before litellm was asked
    a = gateway.recorder.call(err.response.headers["x-tagway-trace-id"]).attributes
    assert a[sc.ERROR_TYPE] == "unsupported_parameter" and a["tagway.attempts"] == 1
    # what the message says works: the whole conversation as input
    again = client(gateway).responses.create(model="claude", max_output_tokens=50, input=[
        {"role": "user", "content": "hello there"}, *[o.model_dump(exclude_none=True) for o in first.output],
        {"role": "user", "content": "and again"}])
    assert "and again" in again.output_text
    # a conversation is state a translated provider does not keep either (a platform key: a tenant key's
    # conversation id nobody owns is the 404 before this)
    platform = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS["platform"], max_retries=0)
    upstream.clear()
    with pytest.raises(openai.BadRequestError) as e:
        platform.responses.create(model="claude", input="and again", conversation="conv_abc", max_output_tokens=50)
    assert (e.value.code, e.value.param) == ("unsupported_parameter", "conversation") and upstream.requests == []


def test_a_translated_response_id_is_opaque_and_its_stored_routes_answer_501(gateway):
    resp = client(gateway).responses.create(model="claude", input="hello there", max_output_tokens=50)
    streamed = client(gateway).responses.create(model="claude", input="hello there", max_output_tokens=50,
                                                stream=True)
    ids = {e.response.id for e in streamed if hasattr(e, "response")}
    for rid in (resp.id, *ids):
        assert rid.startswith("resp_") and "=" not in rid
        decoded = base64.b64decode(rid[5:] + "===", validate=False)
        assert b"litellm" not in decoded and b"anthropic" not in decoded
    assert len(ids) == 1  # one id across the stream's events
    for method, path in (("GET", f"/v1/responses/{resp.id}"), ("GET", f"/v1/responses/{resp.id}/input_items"),
                         ("DELETE", f"/v1/responses/{resp.id}")):
        r = httpx.request(method, gateway.url + path, headers=AUTH)
        assert r.status_code == 501, (path, r.text)
        assert r.json()["error"]["code"] == "route_not_supported" and r.headers["x-should-retry"] == "false"
    with pytest.raises(openai.APIStatusError) as e:
        client(gateway).responses.retrieve(resp.id)
    assert e.value.status_code == 501
