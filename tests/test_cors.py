"""Browser apps calling /v1 across origins (openai-node's `dangerouslyAllowBrowser`), in real headless Chromium:
with `server.cors_allow_origins` the browser's preflight passes and the app reads the answer and tagway's headers;
an origin not listed is refused by the browser; without the setting nothing changes (a preflight is a 405)."""
from __future__ import annotations

import os

import httpx
import pytest
from aiohttp import web

from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from tests.gateway_fixture import KEYS, UPSTREAM_KEY, GatewayServer, MemoryRecorder, gateway_config
from tests.http_server import ThreadedServer

FETCH = """async ([url, key]) => {
  try {
    const r = await fetch(url + "/v1/chat/completions", {method: "POST",
      headers: {"Authorization": "Bearer " + key, "Content-Type": "application/json"},
      body: JSON.stringify({model: "gpt-test", messages: [{role: "user", content: "hi from a browser"}]})});
    const body = await r.json();
    return {status: r.status, trace: r.headers.get("x-tagway-trace-id"), text: body.choices[0].message.content};
  } catch (e) { return {error: String(e)}; }
}"""


class AppPage(ThreadedServer):
    """A browser app's page on its own loopback port (another port is another origin). A real server: Chromium
    lets only a loopback page reach a loopback gateway (Local Network Access)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", lambda _: web.Response(text="<p>app</p>", content_type="text/html"))


@pytest.fixture(scope="module")
def origins():
    pages = [AppPage().start(), AppPage().start()]
    yield [p.url for p in pages]  # the first is listed, the second is not
    for p in pages:
        p.stop()


@pytest.fixture(scope="module")
def cors_gateway(upstream, origins):
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    cfg = gateway_config(upstream.base_url)
    cfg["server"] = {**cfg["server"], "cors_allow_origins": [origins[0] + "/"]}
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=recorder)).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()


def fetch_from(browser, origin: str, gateway_url: str) -> dict:
    """FETCH run by a page of `origin` against the gateway, as a browser app would."""
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.goto(origin + "/")
        return pg.evaluate(FETCH, [gateway_url, KEYS["acme"]])
    finally:
        context.close()


def test_a_listed_origin_calls_the_gateway_from_a_browser(cors_gateway, browser, origins):
    got = fetch_from(browser, origins[0], cors_gateway.url)
    assert got.get("status") == 200 and got["text"].startswith("Echo: hi from a browser"), got
    assert len(got["trace"] or "") == 32  # an exposed header: the app can link its call
    call = cors_gateway.recorder.call(got["trace"])
    assert call.attributes["tagway.customer"] == "acme"


def test_an_origin_not_listed_is_refused_by_the_browser(cors_gateway, browser, origins):
    got = fetch_from(browser, origins[1], cors_gateway.url)
    assert "error" in got and "Failed to fetch" in got["error"], got
    pre = httpx.options(cors_gateway.url + "/v1/chat/completions",
                        headers={"origin": origins[1], "access-control-request-method": "POST"})
    assert pre.status_code == 400 and "access-control-allow-origin" not in pre.headers


def test_preflight_answers_and_nothing_changes_without_the_setting(cors_gateway, gateway, origins):
    ask = {"origin": origins[0], "access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type, x-stainless-os"}
    pre = httpx.options(cors_gateway.url + "/v1/chat/completions", headers=ask)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origins[0]
    assert "x-stainless-os" in pre.headers["access-control-allow-headers"]  # the SDK's own headers pass
    # the admin API, the dashboard and tagway's own /v1/tagway routes (a tenant's recorded calls) stay same-origin
    for path in ("/admin/stats", "/v1/tagway/calls"):
        assert "access-control-allow-origin" not in httpx.options(cors_gateway.url + path, headers=ask).headers
    # no origins configured: a preflight is refused as before, and answers carry no CORS header
    assert httpx.options(gateway.url + "/v1/chat/completions", headers=ask).status_code == 405
    r = httpx.post(gateway.url + "/v1/chat/completions", headers={"origin": origins[0],
                                                                  "authorization": f"Bearer {KEYS['acme']}"},
                   json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origin", ["https://app.example/path", "https://*.example.com", "https://u@app.example"])
def test_an_origin_that_could_never_match_is_a_config_error(origin):
    """Browsers send `scheme://host[:port]`, lower-case, compared as a string: a path, a wildcard in the host or a
    user would pass the config and silently never match."""
    with pytest.raises(ValueError, match="is not an origin"):
        GatewayConfig(models=[], server={"cors_allow_origins": [origin]})
    upper = GatewayConfig(models=[], server={"cors_allow_origins": ["https://App.Example.com:8443/"]})
    assert upper.server.cors_allow_origins == ["https://app.example.com:8443"]
