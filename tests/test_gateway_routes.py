"""Wildcard model routes (`openai/*`, a `*` default upstream), tenants' allowed_models patterns, and /v1/models
merging what the upstreams behind wildcards serve (cached)."""
from __future__ import annotations

import os

import httpx
import openai
import pytest

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import ConfigError, GatewayConfig, load_config
from tests.gateway_fixture import UPSTREAM_KEY, GatewayServer, MemoryRecorder

ACME, INITECH = "tw-routes-acme-0123456789abcdefghijklmnop", "tw-routes-initech-0123456789abcdefghijklm"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(upstream):
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    cfg = GatewayConfig(
        models=[{"name": "gpt-test", "model": "ok-model", **up},
                {"name": "up/*", **up},
                {"name": "up/tmpl/*", "model": "ok-tmpl-*", **up},
                {"name": "*", **up}],
        tenants=[{"customer": "acme", "keys": [{"id": "a", "hash": hash_key(ACME)}]},
                 {"customer": "initech", "allowed_models": ["up/ok-*"], "keys": [{"id": "i", "hash": hash_key(INITECH)}]}],
        api={"list_upstream_models": True, "upstream_models_ttl": 60})
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()


def chat(gw, model: str, key: str = ACME):
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0).chat.completions.with_raw_response.create(
        model=model, messages=MSG)


@pytest.mark.parametrize("model,upstream_model,deployment", [
    ("up/ok-foo", "ok-foo", "up/*"),
    ("up/tmpl/bar", "ok-tmpl-bar", "up/tmpl/*"),  # the longest prefix wins; `model:` is a template
    ("ok-anything", "ok-anything", "*"),  # the default upstream
    ("gpt-test", "ok-model", "gpt-test"),  # exact names first
])
def test_wildcards_route_the_rest_of_the_name(gw, upstream, model, upstream_model, deployment):
    raw = chat(gw, model)
    assert upstream.last()["body"]["model"] == upstream_model
    a = gw.recorder.call(raw.headers["x-tagway-trace-id"]).attributes
    assert a[sc.REQUESTED_MODEL] == model and a[sc.REQUEST_MODEL] == upstream_model and a[sc.DEPLOYMENT] == deployment


def test_allowed_models_patterns(gw):
    assert chat(gw, "up/ok-x", INITECH).parse().choices[0].message.content == "Echo: hi"
    for model in ("gpt-test", "up/tmpl/ok-x", "ok-x"):
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw, model, INITECH)


def test_models_list_merges_the_upstreams_and_caches(gw, upstream):
    def ids(key: str) -> list[str]:
        return [m.id for m in openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0).models.list()]

    upstream.clear()
    assert ids(ACME) == ["gpt-test", "up/ok-a", "up/ok-tmpl-b", "up/other", "up/tmpl/b", "ok-a", "ok-tmpl-b", "other"]
    assert ids(INITECH) == ["up/ok-a", "up/ok-tmpl-b"]  # only what the key may use
    fetched = [r for r in upstream.requests if r["path"] == "/v1/models"]
    assert len(fetched) == 3  # one per wildcard entry, then cached (upstream_models_ttl)
    card = httpx.get(gw.url + "/v1/models/up/ok-zzz", headers={"authorization": f"Bearer {ACME}"}).json()
    assert card == {"id": "up/ok-zzz", "object": "model", "created": 0, "owned_by": "tagway"}
    r = httpx.get(gw.url + "/v1/models/gpt-test", headers={"authorization": f"Bearer {INITECH}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unrouted_name_is_a_404_naming_it(upstream):
    cfg = GatewayConfig(models=[{"name": "up/*", "provider": "openai", "base_url": upstream.base_url}],
                        tenants=[{"customer": "acme", "keys": [{"id": "a", "hash": hash_key(ACME)}]}])
    server = GatewayServer(TagwayApp(cfg, recorder=MemoryRecorder())).start()
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "nope/x", "messages": MSG},
                       headers={"authorization": f"Bearer {ACME}"})
        assert r.status_code == 404 and "`nope/x`" in r.json()["error"]["message"]
    finally:
        server.stop()


@pytest.mark.parametrize("models,tenants,problem", [
    ([{"name": "open*ai/*"}], [], "a wildcard ends in one *"),
    ([{"name": "a/*", "model": "fixed"}], [], "a wildcard's model has one *"),
    ([{"name": "a"}, {"name": "b/*"}, {"name": "c", "fallbacks": ["b/*"]}], [], "is a wildcard, name a model"),
    ([{"name": "b/*"}], [{"customer": "x", "allowed_models": ["c/y"]}], "unknown model 'c/y'"),
])
def test_bad_wildcard_config_is_one_clear_line(tmp_path, models, tenants, problem):
    path = tmp_path / "tagway.yaml"
    import yaml
    path.write_text(yaml.safe_dump({"models": models, "tenants": tenants}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert any(problem in p for p in e.value.problems), e.value.problems
    # a name a wildcard serves is a valid allowed_models entry
    GatewayConfig(models=[{"name": "b/*"}], tenants=[{"customer": "x", "allowed_models": ["b/y", "b/z*"]}])


def test_a_responses_call_without_model_goes_to_the_default_route(gw, upstream):
    """The Responses API lets a stored `prompt` name the model: such a call goes to the `*` route untouched."""
    r = httpx.post(gw.url + "/v1/responses", json={"prompt": {"id": "pmpt_1"}, "input": "hi"},
                   headers={"authorization": f"Bearer {ACME}"})
    assert r.status_code == 200, r.text
    assert "model" not in upstream.last("/v1/responses")["body"]  # no model invented for it
    assert gw.recorder.call(r.headers["x-tagway-trace-id"]).attributes[sc.DEPLOYMENT] == "*"
    r = httpx.post(gw.url + "/v1/responses", json={"input": "hi"}, headers={"authorization": f"Bearer {INITECH}"})
    assert r.status_code == 403  # a key limited to named models must name one
