"""Bad input gets the right 4xx with an OpenAI-shaped error, is still recorded, and the gateway keeps serving."""
from __future__ import annotations

import socket
import time
import uuid

import httpx
import openai
import pytest

from exporters import semconv as sc
from tests.gateway_fixture import ADMIN_KEY, KEYS

MSG = [{"role": "user", "content": "hi"}]


def post(gw, body, key=KEYS["acme"], headers=None, path="/v1/chat/completions"):
    h = {"content-type": "application/json", **(headers or {})}
    if key:
        h["authorization"] = f"Bearer {key}"
    return httpx.post(gw.url + path, content=body if isinstance(body, bytes) else None,
                      json=None if isinstance(body, bytes) else body, headers=h, timeout=10)


def assert_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("body,status,code,param", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b"", 400, "invalid_json", None),
    (b'{"model": "gpt-test", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_encoding", None),
    ({"messages": MSG}, 400, "missing_model", "model"),
    ({"model": 42, "messages": MSG}, 400, "invalid_type", "model"),
    ({"model": "", "messages": MSG}, 400, "missing_model", "model"),
    ({"model": "gpt-test"}, 400, "invalid_messages", "messages"),
    ({"model": "gpt-test", "messages": "hi"}, 400, "invalid_messages", "messages"),
    ({"model": "gpt-test", "messages": [{"content": "no role"}]}, 400, "invalid_messages", "messages[0]"),
    ({"model": "gpt-test", "messages": MSG, "stream": "yes"}, 400, "invalid_type", "stream"),
    ({"model": "gpt-test", "messages": MSG, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"model": "gpt-test", "messages": MSG, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    ({"model": "gpt-test", "messages": MSG, "max_completion_tokens": 1.5}, 400, "invalid_type",
     "max_completion_tokens"),
    ({"model": "gpt-test", "messages": MSG, "metadata": "x"}, 400, "invalid_metadata", "metadata"),
    ({"model": "gpt-test", "messages": MSG, "metadata": {"a": {"deep": 1}}}, 400, "invalid_metadata", "metadata.a"),
    ({"model": "no-such-model", "messages": MSG}, 404, "model_not_found", "model"),
])
def test_bad_request_bodies(gateway, body, status, code, param):
    r = post(gateway, body)
    err = assert_openai_error(r, status, code)
    assert err["param"] == param
    span = gateway.recorder.call(r.headers["x-tagway-trace-id"])
    assert span.attributes[sc.ERROR_TYPE] == code and span.status.status_code.name == "ERROR"
    assert span.attributes[sc.CUSTOMER] == "acme"  # rejected calls are still attributed to who sent them


def test_oversized_body_is_413(gateway):
    big = {"model": "gpt-test", "messages": [{"role": "user", "content": "x" * 70_000}]}
    assert_openai_error(post(gateway, big), 413, "body_too_large")
    # also when the client streams it without a content-length
    def gen():
        yield b'{"model": "gpt-test", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"y" * 4096
        yield b'"}]}'
    r = httpx.post(gateway.url + "/v1/chat/completions", content=gen(),
                   headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert_openai_error(r, 413, "body_too_large")


@pytest.mark.parametrize("key,code", [(None, "missing_api_key"), ("tw-unknown", "invalid_api_key"),
                                      (KEYS["revoked"], "revoked_api_key")])
def test_auth_failures_are_401_and_recorded(gateway, key, code):
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, key=key)
    assert_openai_error(r, 401, code)
    assert gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.ERROR_TYPE] == code
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=key or "x", max_retries=0).chat.completions.create(
            model="gpt-test", messages=MSG)


def test_model_not_allowed_for_tenant(gateway):
    r = post(gateway, {"model": "claude", "messages": MSG}, key=KEYS["globex"])
    assert_openai_error(r, 403, "model_not_allowed")


def test_header_with_control_characters(gateway):
    # httpx refuses to send such a header, so speak HTTP/1.1 by hand
    body = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}'
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + KEYS["acme"].encode() + b"\r\nx-tagway-intent: ref\x01und\r\n"
           b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    # the HTTP parser may refuse the header itself (400) or let it through to us (our 400 with a JSON error)
    assert status == 400, data[:300]
    if b"application/json" in data:
        assert b"invalid_header" in data


def test_unknown_method_and_routes_are_openai_shaped(gateway):
    r = httpx.put(gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert "/v1/chat/completions takes GET, POST" in assert_openai_error(r, 405, "method_not_allowed")["message"]
    r = httpx.get(gateway.url + "/v1/embeddings")
    assert "takes POST" in assert_openai_error(r, 405, "method_not_allowed")["message"]
    r = httpx.get(gateway.url + "/v1/nope")
    assert "GET /v1/nope" in assert_openai_error(r, 404, "not_found")["message"]
    for method, path, takes in (("GET", "/admin/store/query", "takes POST"), ("DELETE", "/admin/stats", "takes GET")):
        r = httpx.request(method, gateway.url + path)  # the app's own routes: their methods, not "not carried"
        message = assert_openai_error(r, 405, "method_not_allowed")["message"]
        assert f"{path} {takes}" in message and "does not carry" not in message, message


def test_gateway_keeps_serving_after_bad_input(gateway):
    for _ in range(3):
        post(gateway, b"{bad")
    r = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS["acme"], max_retries=0).chat.completions.create(
        model="gpt-test", messages=MSG)
    assert r.choices[0].message.content == "Echo: hi"


# -- tenant isolation and tag authority ---------------------------------------------------------------------------
def test_bound_key_cannot_record_as_another_customer(gateway):
    for how in ({"headers": {"x-tagway-customer": "globex"}},
                {"body_extra": {"metadata": {"customer": "globex"}}}):
        body = {"model": "gpt-test", "messages": MSG, **how.get("body_extra", {})}
        r = post(gateway, body, headers=how.get("headers"))
        assert_openai_error(r, 403, "customer_not_allowed")
        span = gateway.recorder.call(r.headers["x-tagway-trace-id"])
        assert span.attributes[sc.CUSTOMER] == "acme"
    # naming its own customer is fine
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers={"x-tagway-customer": "ACME"})
    assert r.status_code == 200
    # `user` is the end user, not a way to change the customer
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "user": "globex"})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert a[sc.CUSTOMER] == "acme" and a[sc.END_USER] == "globex"


def test_platform_key_and_admin_may_set_customer(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, key=KEYS["platform"],
             headers={"x-tagway-customer": "initech"})
    assert gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.CUSTOMER] == "initech"
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "metadata": {"customer": "Hooli"}}, key=KEYS["platform"])
    assert gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.CUSTOMER] == "hooli"
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "user": "umbrella"}, key=KEYS["platform"])
    assert gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.CUSTOMER] == "umbrella"
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, key=ADMIN_KEY,
             headers={"x-tagway-customer": "acme", "x-tagway-source": "replay",
                      "x-tagway-replay-run-id": "run1", "x-tagway-replay-case-id": "abc"})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert a[sc.CUSTOMER] == "acme" and a[sc.SOURCE] == "replay" and a[sc.KEY_ID] == "admin"
    assert a[sc.REPLAY_RUN_ID] == "run1" and a[sc.REPLAY_CASE_ID] == "abc"


def test_key_bound_tags_win_over_headers_and_metadata(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "metadata": {"intent": "billing", "team": "x"}},
             key=KEYS["support"], headers={"x-tagway-intent": "refund", "x-tagway-tags": "team=y,region=us"})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert a[sc.CUSTOMER] == "support-bot"
    assert a[sc.INTENT] == "support"  # tenant-bound
    assert a[sc.TAG_PREFIX + "team"] == "cx"  # key-bound beats header beats metadata
    assert a[sc.TAG_PREFIX + "region"] == "us"


def test_headers_beat_metadata(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "metadata": {"intent": "billing", "prompt_version": "p1"}},
             headers={"x-tagway-intent": "refund"})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert a[sc.INTENT] == "refund" and a[sc.PROMPT_VERSION] == "p1"


def test_tenant_without_capture_records_no_content(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, key=KEYS["globex"])
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert sc.INPUT_MESSAGES not in a and sc.OUTPUT_MESSAGES not in a
    assert a[sc.INPUT_TOKENS] == 11  # metrics are still recorded


def test_capture_is_redacted(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": [
        {"role": "user", "content": "mail me at jane.doe@example.com, card 4111 1111 1111 1111"}]})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert "jane.doe@example.com" not in a[sc.INPUT_MESSAGES] and "4111" not in a[sc.INPUT_MESSAGES]
    assert "[REDACTED:email]" in a[sc.INPUT_MESSAGES] and "[REDACTED:card]" in a[sc.OUTPUT_MESSAGES]
    # the client still gets the real answer: redaction is for the record only
    assert "jane.doe@example.com" in r.json()["choices"][0]["message"]["content"]


def test_tenant_keys_cannot_mark_calls_as_replay(gateway):
    for headers in ({"x-tagway-source": "replay"}, {"x-tagway-replay-run-id": "r1"},
                    {"x-tagway-replay-case-id": "abc"}):
        r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers=headers)
        assert_openai_error(r, 403, "replay_marks_not_allowed")
        # recorded, as the replay attempt it was: the tenant's production error rate does not move
        a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
        assert a[sc.CUSTOMER] == "acme" and a[sc.ERROR_TYPE] == "replay_marks_not_allowed"
        assert a[sc.SOURCE] == "replay"
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers={"x-tagway-source": "Batch Job"})
    assert r.status_code == 200  # any other source is the tenant's own business
    assert gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.SOURCE] == "batch_job"


def test_a_replay_call_with_a_bad_body_is_recorded_as_the_replay_it_was(gateway):
    """Its tags come from its headers even though the body could not be read: not a production call of nobody."""
    for key in (ADMIN_KEY, KEYS["platform"]):
        r = post(gateway, b"{bad", key=key, headers={"x-tagway-source": "replay", "x-tagway-customer": "globex",
                                                       "x-tagway-intent": "refund", "x-tagway-tags": "run=r9"})
        assert_openai_error(r, 400, "invalid_json")
        a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
        assert (a[sc.SOURCE], a[sc.CUSTOMER], a[sc.INTENT], a[sc.TAG_PREFIX + "run"]) == ("replay", "globex", "refund",
                                                                                           "r9")
    # bad metadata in a body that was read: the headers still count
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "metadata": "x"}, key=ADMIN_KEY,
             headers={"x-tagway-source": "replay", "x-tagway-customer": "globex"})
    assert_openai_error(r, 400, "invalid_metadata")
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert (a[sc.SOURCE], a[sc.CUSTOMER]) == ("replay", "globex")


def test_a_client_that_leaves_before_its_body_is_recorded_as_its_headers_say(gateway):
    intent = "gone-" + uuid.uuid4().hex[:8]
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer " + ADMIN_KEY.encode() + b"\r\nx-tagway-source: replay\r\n"
           b"x-tagway-customer: globex\r\nx-tagway-intent: " + intent.encode() + b"\r\n"
           b"Content-Length: 500\r\n\r\n" + b'{"model": "gpt-test", "mess')
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(req)
        time.sleep(0.2)  # the gateway is reading the body when the client goes
    deadline = time.monotonic() + 5
    while not (calls := [sp for sp in gateway.recorder.exporter.get_finished_spans()
                         if sp.attributes.get(sc.INTENT) == intent]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(calls) == 1
    a = calls[0].attributes
    assert (a[sc.SOURCE], a[sc.CUSTOMER], a[sc.ERROR_TYPE]) == ("replay", "globex", "client_disconnected")


def test_too_many_tags_is_a_400_not_a_lost_record(gateway):
    tags = ",".join(f"t{i}=v" for i in range(65))
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers={"x-tagway-tags": tags})
    assert_openai_error(r, 400, "too_many_tags")
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert a[sc.KIND] == "call" and a[sc.CUSTOMER] == "acme"
    many = {f"m{i}": "v" for i in range(64)}
    r = post(gateway, {"model": "gpt-test", "messages": MSG, "metadata": many})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert r.status_code == 200 and a[sc.KIND] == "call" and a[sc.CUSTOMER] == "acme"
    assert sum(k.startswith(sc.TAG_PREFIX) for k in a) == 64


def test_unusable_tag_keys_and_empty_values(gateway):
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers={"x-tagway-tags": "!!!=x"})
    assert_openai_error(r, 400, "invalid_tag")
    r = post(gateway, {"model": "gpt-test", "messages": MSG}, headers={"x-tagway-tags": "team=,Feature-Flag=On"})
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert sc.TAG_PREFIX + "team" not in a and a[sc.TAG_PREFIX + "feature_flag"] == "on"


def test_malformed_tool_calls_in_history_do_not_change_the_outcome(gateway):
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"function": "x"}, {"function": [1]}, 5]},
            {"role": "user", "content": "hi"}]
    r = post(gateway, {"model": "gpt-test", "messages": msgs})
    assert r.status_code == 200
    a = gateway.recorder.call(r.headers["x-tagway-trace-id"]).attributes
    assert sc.ERROR_TYPE not in a and sc.INPUT_MESSAGES in a
    assert "tagway_capture_failures_total 0" in httpx.get(gateway.url + "/metrics").text


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-test", "messages": MSG, "max_tokens": 0}),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": MSG, "max_completion_tokens": 0}),
    ("/v1/completions", {"model": "gpt-test", "prompt": "score me", "max_tokens": 0, "echo": True, "logprobs": 0}),
    ("/v1/chat/completions", {"model": "gpt-test", "messages": MSG, "temperature": 7}),
])
def test_ranges_are_the_upstreams_business(gateway, upstream, path, body):
    """Types are checked, ranges are not: `max_tokens: 0, echo: true` is how prompts are scored, and the upstream
    knows its own limits (a real one answers its own 400 if it disagrees)."""
    r = httpx.post(gateway.url + path, json=body, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 200, r.text
    sent = upstream.last(path)["body"]
    assert {k: sent[k] for k in body if k != "model"} == {k: v for k, v in body.items() if k != "model"}
