"""A wildcard's match becomes the upstream model, which Azure puts in the URL's path: a tenant's model name must not
reach another path of the provider with the operator's key (an app-developer trial: `az/gpt-4o/../admin` was sent to
{base}/admin with the operator's api-key, past allowed_models `az/gpt-4o*`)."""
from __future__ import annotations

import os

import openai
import pytest
from aiohttp import web

from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from gateway.model_routes import ModelRoutes
from tests.gateway_fixture import GatewayServer, MemoryRecorder
from tests.http_server import ThreadedServer

KEY = "tw-wild-acme-0123456789abcdefghijklmnopq"
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class AnyPath(ThreadedServer):
    """Answers every path with a chat completion, and remembers which paths were asked (raw, as sent)."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.any)

    async def any(self, request: web.Request) -> web.Response:
        self.paths.append(request.raw_path)
        return web.json_response(ANSWER)


@pytest.fixture(scope="module")
def world():
    up = AnyPath().start()
    os.environ["WILD_UPSTREAM_KEY"] = "sk-wild-operator"
    cfg = GatewayConfig(models=[{"name": "az/*", "provider": "azure", "base_url": up.url, "api_version": "2024-10-21",
                                 "api_key_env": "WILD_UPSTREAM_KEY"},
                                {"name": "or/*", "provider": "openai", "base_url": up.url + "/v1",
                                 "api_key_env": "WILD_UPSTREAM_KEY"}],
                        tenants=[{"customer": "acme", "allowed_models": ["az/gpt-4o*", "or/*"],
                                  "keys": [{"id": "a", "hash": hash_key(KEY)}]}])
    recorder = MemoryRecorder()
    gw = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    yield gw, up, cfg
    gw.stop()
    recorder.shutdown()
    up.stop()


@pytest.mark.parametrize("model", ["az/gpt-4o/../secret-deployment", "az/gpt-4o/../../../admin",
                                   "az/gpt-4o-x?api-version=2099-01-01&", "az/gpt-4o#frag", "az/gpt-4o%2F..%2Fx",
                                   "az/gpt-4o/x", "az/gpt-4o x", "or/a/../../admin", "or/..", "or/x\\y"])
def test_a_name_that_would_leave_its_place_in_the_url_is_no_model(world, model):
    gw, up, _ = world
    up.paths.clear()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    assert up.paths == [], "nothing reached the provider"


def test_deployment_and_model_names_as_providers_spell_them_still_route(world):
    gw, up, cfg = world
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    for model, path in (("az/gpt-4o-mini.2024_07", "/openai/deployments/gpt-4o-mini.2024_07/chat/completions"),
                        ("or/meta-llama/Llama-3.1-8B-Instruct", "/v1/chat/completions"),
                        ("or/ft:gpt-4o:org::abc", "/v1/chat/completions"), ("or/llama3:8b", "/v1/chat/completions")):
        up.paths.clear()
        assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}]).id
        assert [p.split("?")[0] for p in up.paths] == [path], model
    assert ModelRoutes(cfg).entry_for("az/gpt-4o/../x") is None  # models.retrieve says the same as a call
