"""What crosses the gateway besides the body: the client's OpenAI headers go upstream (allow-listed), the upstream's
request id, rate-limit state and retry advice come back to the SDK, `metadata` goes upstream only when stored, and an
upstream that breaks the protocol gets a clear 502 that is recorded."""
from __future__ import annotations

import httpx
import openai
import pytest

from exporters import semconv as sc
from gateway.headers import HeaderFilter
from tests.gateway_fixture import KEYS

MSG = [{"role": "user", "content": "hi"}]


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["acme"], **{"max_retries": 0, **kw})


def test_header_filter_rules():
    f = HeaderFilter(["OpenAI-Beta", "x-ratelimit-*", "x-*", "authorization"])
    assert f.allows(b"openai-beta") and f.allows(b"x-ratelimit-limit-tokens") and f.allows(b"x-anything")
    assert not f.allows(b"authorization")  # credentials never cross, whatever the list says
    assert not f.allows(b"x-tagway-customer") and not f.allows(b"content-length")
    assert f.pick([(b"OpenAI-Beta", b"assistants=v2"), (b"Cookie", b"c")]) == [(b"openai-beta", b"assistants=v2")]
    assert not HeaderFilter([])


def test_client_openai_headers_reach_the_upstream(gateway, upstream):
    client(gateway).chat.completions.create(
        model="gpt-test", messages=MSG,
        extra_headers={"OpenAI-Beta": "assistants=v2", "Idempotency-Key": "idem-1", "OpenAI-Organization": "org-9",
                       "OpenAI-Project": "proj-3", "X-Not-Listed": "stays", "x-tagway-intent": "refund"})
    h = {k.lower(): v for k, v in upstream.last()["headers"].items()}
    # the idempotency key in the tenant's own namespace; a tenant key's organisation and project stay behind
    # (tests/test_tenant_isolation_trial.py), a platform key's go up
    assert h["openai-beta"] == "assistants=v2" and h["idempotency-key"].endswith("-idem-1")
    assert "openai-organization" not in h and "openai-project" not in h
    assert "x-not-listed" not in h and not any(k.startswith("x-tagway") for k in h)
    assert h["authorization"].startswith("Bearer sk-upstream")  # the deployment's key, not the client's
    openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS["platform"], max_retries=0).chat.completions.create(
        model="gpt-test", messages=MSG, extra_headers={"OpenAI-Organization": "org-9", "OpenAI-Project": "proj-3"})
    h = {k.lower(): v for k, v in upstream.last()["headers"].items()}
    assert h["openai-organization"] == "org-9" and h["openai-project"] == "proj-3"


def test_request_id_and_rate_limits_reach_the_sdk(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=MSG)
    assert raw.headers["x-request-id"].startswith("req-")
    assert raw.parse()._request_id == raw.headers["x-request-id"]  # the SDK's request_id is filled
    assert raw.headers["x-ratelimit-remaining-requests"] == "99" and raw.headers["openai-processing-ms"] == "7"
    assert "x-upstream-internal" not in raw.headers  # not on the list: stays behind
    assert len(raw.headers["x-tagway-trace-id"]) == 32  # tagway's own beside them
    with client(gateway).chat.completions.with_streaming_response.create(model="gpt-test", messages=MSG,
                                                                         stream=True) as s:
        assert s.headers["x-request-id"].startswith("req-") and s.headers["content-type"].startswith("text/event")
        assert "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices) == "Echo: hi"


def test_retry_advice_reaches_the_sdk_which_follows_it(gateway, upstream):
    """A 429 with `x-should-retry: false`: the SDK (max_retries=3) must not retry, because tagway passed the
    upstream's advice on; and `retry-after` is there for clients that schedule their own retries."""
    upstream.clear()
    with pytest.raises(openai.RateLimitError) as e:
        client(gateway, max_retries=3).chat.completions.create(model="rate-limited-alone", messages=MSG)
    assert e.value.response.headers["x-should-retry"] == "false" and e.value.response.headers["retry-after"] == "0"
    assert e.value.request_id.startswith("req-")
    assert len([r for r in upstream.requests if r["body"]["model"] == "fail429-b"]) == 1


def test_metadata_goes_upstream_only_when_stored(gateway, upstream):
    meta = {"experiment": "b", "intent": "refund", "customer": "acme", "prompt-version": "v2"}
    client(gateway).chat.completions.create(model="gpt-test", messages=MSG, metadata=meta)
    assert "metadata" not in upstream.last()["body"]  # not stored: it only fed tagway's tags
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, metadata=meta,
                                                                   store=True)
    assert upstream.last()["body"]["metadata"] == {"experiment": "b"}  # tagway's own keys removed
    a = gateway.recorder.call(raw.headers["x-tagway-trace-id"]).attributes
    assert a[sc.INTENT] == "refund" and a[sc.TAG_PREFIX + "experiment"] == "b"  # and the tags are still read


@pytest.mark.parametrize("model,stream,message", [
    ("json-stream", True, "answered a stream request with application/json"),
    ("sse-whole", False, "answered a non-stream request with an event stream"),
    ("bad-json", False, "not a JSON object"),
])
def test_upstream_protocol_errors_are_a_clear_502(gateway, model, stream, message):
    r = httpx.post(gateway.url + "/v1/chat/completions", json={"model": model, "messages": MSG, "stream": stream},
                   headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == "upstream_protocol_error" and message in err["message"]
    span = gateway.recorder.call(r.headers["x-tagway-trace-id"])
    assert span.attributes[sc.ERROR_TYPE] == "protocol_error" and span.status.status_code.name == "ERROR"


def test_protocol_error_falls_back_like_an_outage(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(model="bad-json-fb", messages=MSG)
    assert raw.parse().choices[0].message.content == "Echo: hi"
    a = gateway.recorder.call(raw.headers["x-tagway-trace-id"]).attributes
    assert a[sc.ATTEMPTS] == 2 and a[sc.DEPLOYMENT] == "gpt-test"
