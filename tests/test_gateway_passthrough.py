"""The OpenAI routes beyond the hot ones, passed through: stored chat completions, responses by id, moderations,
images, audio, files, batches, deleting a model. Through the real openai SDK, to the fixture upstream; each call
authorised and recorded with its operation; anything not carried is an OpenAI-shaped 404 naming the route."""
from __future__ import annotations

import os

import httpx
import openai
import pytest

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from tests.gateway_fixture import KEYS, UPSTREAM_KEY, GatewayServer, MemoryRecorder

ACME, GLOBEX = "tw-pt-acme-0123456789abcdefghijklmnopqrs", "tw-pt-globex-0123456789abcdefghijklmnopq"


@pytest.fixture(scope="module")
def gw(upstream):
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    cfg = GatewayConfig(
        # these tests relay made-up ids: tenant isolation of resources has its own (tests/test_tenant_resources.py)
        api={"tenant_resources": "shared"},
        models=[{"name": "gpt-test", "model": "ok-model", **up}, {"name": "*", **up},
                {"name": "claude", "provider": "anthropic", "model": "claude-test", "base_url": upstream.url}],
        tenants=[{"customer": "acme", "keys": [{"id": "a", "hash": hash_key(ACME)}]},
                 {"customer": "globex", "allowed_models": ["gpt-test"], "capture_content": False,
                  "keys": [{"id": "g", "hash": hash_key(GLOBEX)}]}])
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()


def sdk(gw, key: str = ACME) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def span(gw, raw):
    return gw.recorder.call(raw.headers["x-tagway-trace-id"])


def test_stored_chat_completions(gw, upstream):
    c = sdk(gw).chat.completions
    raw = c.with_raw_response.retrieve("chatcmpl-abc")
    assert raw.parse().id == "chatcmpl-abc" and upstream.last("/v1/chat/completions/chatcmpl-abc")["method"] == "GET"
    a = span(gw, raw).attributes
    assert a[sc.OPERATION] == "chat.completions.retrieve" and a[sc.API] == "chat.completions.retrieve"
    assert a[sc.CUSTOMER] == "acme" and a[sc.HTTP_STATUS] == 200 and a[sc.DEPLOYMENT] == "*"
    assert [x.id for x in c.list(model="gpt-4o", limit=2)] == ["listed-1", "listed-2"]
    assert "model=gpt-4o" in upstream.last("/v1/chat/completions")["query"]  # the query goes along
    c.update("chatcmpl-abc", metadata={"k": "v"})
    assert upstream.last("/v1/chat/completions/chatcmpl-abc")["body"] == {"metadata": {"k": "v"}}
    c.delete("chatcmpl-abc")
    assert upstream.last("/v1/chat/completions/chatcmpl-abc")["method"] == "DELETE"
    assert [m.id for m in c.messages.list("chatcmpl-abc")] == ["listed-1", "listed-2"]


def test_responses_by_id(gw, upstream):
    r = sdk(gw).responses
    raw = r.with_raw_response.retrieve("resp_1")
    assert span(gw, raw).attributes[sc.OPERATION] == "responses.retrieve"
    # a stored object read back, cancelled or updated carries the usage of the call that made it, counted then: not
    # again for this call (16 retrieves added 3,558 tokens to a tenant's stats: app-developer trial)
    for raw in (raw, r.with_raw_response.cancel("resp_1"),
                sdk(gw).chat.completions.with_raw_response.retrieve("chatcmpl-abc"),
                sdk(gw).chat.completions.with_raw_response.update("chatcmpl-abc", metadata={"k": "v"})):
        assert raw.http_response.json()["usage"]["input_tokens"] == 40  # the upstream's answer carries it
        a = span(gw, raw).attributes
        assert sc.INPUT_TOKENS not in a and sc.OUTPUT_TOKENS not in a, a[sc.API]
    r.cancel("resp_1")
    assert upstream.last("/v1/responses/resp_1/cancel")["method"] == "POST"
    assert [i.id for i in r.input_items.list("resp_1")] == ["listed-1", "listed-2"]
    r.delete("resp_1")
    assert upstream.last("/v1/responses/resp_1")["method"] == "DELETE"


def test_model_routes_use_the_model_and_the_tenants_allow_list(gw, upstream):
    raw = sdk(gw).moderations.with_raw_response.create(model="gpt-test", input="is this fine?")
    assert upstream.last("/v1/moderations")["body"]["model"] == "ok-model"  # routed like the hot path
    a = span(gw, raw).attributes
    assert a[sc.OPERATION] == "moderations" and a[sc.REQUESTED_MODEL] == "gpt-test" and a[sc.REQUEST_MODEL] == "ok-model"
    raw = sdk(gw).images.with_raw_response.generate(model="gpt-image-1", prompt="a cat")
    a = span(gw, raw).attributes
    assert a[sc.OPERATION] == "generate_content" and a[sc.OUTPUT_TYPE] == "image" and a[sc.API] == "images.generate"
    assert a[sc.INPUT_TOKENS] == 9 and a[sc.OUTPUT_TOKENS] == 100
    with pytest.raises(openai.PermissionDeniedError):
        sdk(gw, GLOBEX).images.generate(model="gpt-image-1", prompt="a cat")


def test_binary_and_multipart_bodies(gw, upstream):
    audio = sdk(gw).audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="hello")
    assert audio.content == b"ID3" + bytes(range(256)) * 4 and audio.headers["content-type"] == "audio/mpeg"
    t = sdk(gw).audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF....WAVE", "audio/wav"))
    assert t.text == "heard whisper-1"
    f = sdk(gw).files.create(file=("data.jsonl", b'{"a": 1}\n', "application/jsonl"), purpose="batch")
    assert f.id.startswith("file-up-") and f.purpose == "batch"
    assert b"data.jsonl" in upstream.last("/v1/files")["raw"]  # the client's multipart bytes, as sent
    content = sdk(gw).files.with_raw_response.content(f.id)
    assert content.content == b'{"line": 0}\n{"line": 1}\n{"line": 2}\n{"line": 3}\n'
    a = span(gw, content).attributes
    assert a[sc.OPERATION] == "files.content" and a[sc.HTTP_STATUS] == 200


def test_batches_and_model_delete(gw, upstream):
    b = sdk(gw).batches.create(input_file_id="file-up-1", endpoint="/v1/chat/completions", completion_window="24h")
    assert upstream.last("/v1/batches")["body"]["input_file_id"] == "file-up-1" and b.id
    sdk(gw).batches.retrieve("batch_9")
    sdk(gw).batches.cancel("batch_9")
    assert upstream.last("/v1/batches/batch_9/cancel")["method"] == "POST"
    raw = sdk(gw).models.with_raw_response.delete("ft:gpt-4o:acme::x1")
    assert upstream.last("/v1/models/ft:gpt-4o:acme::x1")["method"] == "DELETE"
    assert span(gw, raw).attributes[sc.OPERATION] == "models.delete"


def test_upstream_errors_are_relayed_scrubbed_and_recorded(gw):
    r = httpx.post(gw.url + "/v1/moderations", json={"model": "fail503-x", "input": "x"},
                   headers={"authorization": f"Bearer {ACME}"})
    assert r.status_code == 503 and UPSTREAM_KEY not in r.text and r.json()["error"]["message"]
    s = gw.recorder.call(r.headers["x-tagway-trace-id"])
    assert s.attributes[sc.ERROR_TYPE] == "http_503" and s.status.status_code.name == "ERROR"
    # the provider refusing the gateway's own key: a 502 saying so, as on the chat routes, not the client's 401
    r = httpx.post(gw.url + "/v1/moderations", json={"model": "fail401-x", "input": "x"},
                   headers={"authorization": f"Bearer {ACME}"})
    err = r.json()["error"]
    assert (r.status_code, err["code"], r.headers["x-should-retry"]) == (502, "upstream_auth_error", "false")
    assert err["message"].startswith("The provider refused the gateway's credentials") and UPSTREAM_KEY not in r.text
    assert gw.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.ERROR_TYPE] == "http_401"
    r = httpx.post(gw.url + "/v1/moderations", json={"model": "fail401-x", "input": "x"},
                   headers={"authorization": f"Bearer {ACME}", "openai-project": "proj_app"})
    # a tenant key's OpenAI-Project stays behind (gateway/headers.py KeyScope): the refusal is the key's alone
    assert r.status_code == 502 and "openai-project" not in r.json()["error"]["message"], r.text


def test_translated_upstreams_do_not_serve_these_routes(gw):
    r = httpx.post(gw.url + "/v1/moderations", json={"model": "claude", "input": "x"},
                   headers={"authorization": f"Bearer {ACME}"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "route_not_supported"
    assert r.headers["x-should-retry"] == "false"  # SDKs retry 5xx; this one would not change
    assert "anthropic" in r.json()["error"]["message"]


def test_auth_and_unknown_routes(gw):
    r = httpx.get(gw.url + "/v1/files")
    assert r.status_code == 401 and gw.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.ERROR_TYPE] \
        == "missing_api_key"
    r = httpx.post(gw.url + "/v1/assistants", json={}, headers={"authorization": f"Bearer {ACME}"})
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Invalid URL (POST /v1/assistants)")
    r = httpx.put(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {ACME}"})
    assert r.status_code == 405 and "GET, POST" in r.json()["error"]["message"]


def test_model_less_route_with_several_upstreams_needs_a_hint(gateway, upstream):
    """The shared test gateway has two upstreams and no `*` route: which one holds `file-1` is not guessable. (A
    platform key: it reaches any resource; a tenant key only its tenant's, tests/test_tenant_resources.py.)"""
    h = {"authorization": f"Bearer {KEYS['platform']}"}
    r = httpx.get(gateway.url + "/v1/files/file-1", headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "upstream_ambiguous"
    r = httpx.get(gateway.url + "/v1/files/file-1", headers={**h, "x-tagway-model": "gpt-test"})
    assert r.status_code == 200 and r.json()["path"] == "/v1/files/file-1"


@pytest.mark.parametrize("raw_path", ["/v1/files/%2e%2e/content", "/v1/batches/%2E%2E/cancel",
                                      "/v1/files/file-a%3Fpurpose=x", "/v1/responses/%2e%2e"])
def test_a_resource_id_that_would_reach_another_upstream_path_is_refused(gw, upstream, raw_path):
    """The ASGI path is percent-decoded: `%2e%2e` became `..`, which the upstream client resolved to another path
    (`POST {base}/cancel`, `GET {base}/content`), and `%3F` a query, all with the gateway's provider key."""
    upstream.clear()
    method = "POST" if raw_path.endswith("/cancel") else "GET"
    with httpx.Client() as h:
        r = h.send(h.build_request(method, gw.url + raw_path, headers={"authorization": f"Bearer {ACME}"}))
    err = r.json()["error"]
    assert (r.status_code, err["code"], err["param"]) == (400, "invalid_resource_id", "id"), r.text
    assert upstream.requests == []
