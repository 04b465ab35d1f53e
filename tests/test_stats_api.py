"""The stats API (gateway/stats_api.py) on a small FastAPI app over the shared chDB store: admin and tenant views,
OpenAI-shaped 400/401/403/404/503 errors, and the same numbers as the query layer."""
from __future__ import annotations

import inspect

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from exporters.store import StoreError
from gateway.auth import KeyRing, hash_key
from gateway.config import GatewayConfig, KeyConfig, TenantConfig
from gateway.stats_api import build_stats_router
from tests.calls_seed import Seeded, seed_calls, seed_replayed

ADMIN = "tw-admin-stats-api-test"
ACME_KEY = "tw-acme-stats-api-test"


@pytest.fixture(scope="module")
def seeded(chdb_store) -> Seeded:
    return seed_calls(chdb_store)


def make_keyring(seeded: Seeded, monkeypatch_env: str = "TAGWAY_STATS_TEST_ADMIN") -> KeyRing:
    cfg = GatewayConfig(admin_key_env=monkeypatch_env, tenants=[
        TenantConfig(customer=seeded.acme, keys=[KeyConfig(id="acme-1", hash=hash_key(ACME_KEY))]),
        TenantConfig(customer=seeded.globex)])
    return KeyRing(cfg)


@pytest.fixture(scope="module")
def client(chdb_store, seeded):
    mp = pytest.MonkeyPatch()
    mp.setenv("TAGWAY_STATS_TEST_ADMIN", ADMIN)
    keyring = make_keyring(seeded)
    mp.undo()
    app = FastAPI()
    app.include_router(build_stats_router(keyring, lambda: chdb_store))
    with TestClient(app) as c:
        yield c


def admin(c, path, **params):
    return c.get(path, params=params, headers={"Authorization": f"Bearer {ADMIN}"})


def tenant(c, path, **params):
    return c.get(path, params=params, headers={"Authorization": f"Bearer {ACME_KEY}"})


def assert_openai_error(res, status, code=None, param=None):
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    for leak in ("Traceback", "SELECT", "llm_calls", "DB::Exception"):
        assert leak not in res.text
    if code:
        assert body["error"]["code"] == code
    if param:
        assert body["error"]["param"] == param
    return body["error"]


def test_admin_stats_exact(client, seeded):
    res = admin(client, "/admin/stats", by=["customer", "intent"],
                where=[seeded.where, f"customer!={seeded.spans}"], since="24h", min_calls="20")
    assert res.status_code == 200, res.text
    d = res.json()
    top = d["segments"][0]
    assert top["key"] == {"customer": seeded.acme, "intent": "refund"}
    assert (top["calls"], top["errors"], top["error_rate"]) == (100, 30, 0.3)
    assert top["error_rate_ci"]["low"] == pytest.approx(0.21894885294932764)
    assert top["error_rate_ci"]["high"] == pytest.approx(0.39584854633346667)
    assert (d["total"]["calls"], d["total"]["errors"]) == (1000, 33)
    assert [s["low_confidence"] for s in d["segments"]] == [False, True, False, False, False]
    assert isinstance(top["latency_ms"]["p95"], float)


def test_admin_stats_compare_and_comma_by(client, seeded):
    d = admin(client, "/admin/stats", by="customer,intent", where=seeded.where, compare="true").json()
    top = d["segments"][0]
    assert top["previous"] == {"calls": 100, "errors": 5, "error_rate": 0.05}
    assert top["delta_error_rate"] == pytest.approx(0.25)
    assert d["previous_window"]["seconds"] == 86400


def test_tenant_sees_only_its_customer(client, seeded):
    res = tenant(client, "/v1/tagway/stats", by="customer", where=seeded.where)
    assert res.status_code == 200, res.text
    d = res.json()
    assert [s["key"]["customer"] for s in d["segments"]] == [seeded.acme]
    assert (d["total"]["calls"], d["total"]["errors"]) == (500, 30)
    assert {"key": "customer", "op": "=", "value": seeded.acme} in d["filters"]
    by_intent = tenant(client, "/v1/tagway/stats", by="intent", where=[seeded.where, f"customer={seeded.acme}"]).json()
    assert {s["key"]["intent"]: s["calls"] for s in by_intent["segments"]} == {"refund": 100, "chat": 400}
    # no filter at all: still only its own rows
    everything = tenant(client, "/v1/tagway/stats", by="customer", since="7d").json()
    assert {s["key"]["customer"] for s in everything["segments"]} == {seeded.acme}


@pytest.mark.parametrize("params", [
    {"where": "customer=GLOBEX"}, {"customer": "GLOBEX"}, {"where": ["intent=refund", "customer=GLOBEX"]}])
def test_tenant_asking_for_another_customer_is_403(client, seeded, params):
    params = {k: ([x.replace("GLOBEX", seeded.globex) for x in v] if isinstance(v, list)
                  else v.replace("GLOBEX", seeded.globex)) for k, v in params.items()}
    res = tenant(client, "/v1/tagway/stats", **params)
    err = assert_openai_error(res, 403, code="customer_not_allowed")
    assert err["type"] == "permission_error"
    assert seeded.globex not in res.text


def test_auth(client, seeded):
    assert_openai_error(client.get("/admin/stats"), 401, code="missing_api_key")
    assert_openai_error(client.get("/admin/stats", headers={"Authorization": "Bearer tw-wrong"}), 401,
                        code="invalid_api_key")
    assert_openai_error(client.get("/v1/tagway/stats"), 401)
    for path in ("/admin/stats", "/admin/errors", "/admin/timeseries", f"/admin/calls/{seeded.error_trace}"):
        assert_openai_error(tenant(client, path), 403, code="admin_key_required")
    # the admin key may use the tenant route for any customer
    d = admin(client, "/v1/tagway/stats", where=seeded.where).json()
    assert {s["key"]["customer"] for s in d["segments"]} >= {seeded.acme, seeded.globex}


@pytest.mark.parametrize("params,param,needle", [
    ({"by": "nope"}, "by", "unknown group-by column 'nope'"),
    ({"by": "tag.a'b"}, "by", "invalid tag key"),
    ({"by": "tag.x; DROP TABLE t"}, "by", "invalid tag key"),
    ({"where": "tag.x'=1"}, "where", "invalid tag key"),
    ({"where": "nokey"}, "where", "key=value"),
    ({"since": "3x"}, "since", "invalid window"),
    ({"since": "1h); DROP TABLE t; --"}, "since", "invalid window"),
    ({"from": "not-a-time"}, "from", "invalid from time"),
    ({"from": "0001-01-01T00:00:00", "to": "0001-01-02T00:00:00"}, "from", "from time '0001-01-01T00:00:00' is out of "
     "range: use a time from 1970 to 2105"),
    ({"to": "2026-01-01T00:00:00Z"}, "from", "a window with a `to` time needs a `from` time (or use since)"),
    ({"status": "failed"}, "status", "invalid status"),
    ({"min_calls": "abc"}, "min_calls", "whole number"),
    ({"compare": "maybe"}, "compare", "true or false"),
    ({"group": "customer"}, "group", "unknown query parameter 'group'"),
    ({"since": ["1h", "2h"]}, "since", "more than once"),
    ({"customer": ["acme", "globex"]}, "customer", "'customer' is given more than once: filters are ANDed"),
])
def test_bad_input_is_400(client, params, param, needle):
    err = assert_openai_error(admin(client, "/admin/stats", **params), 400, code="invalid_query", param=param)
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_errors_calls_timeseries(client, seeded):
    d = admin(client, "/admin/errors", where=seeded.where, limit="5").json()
    assert [(e["error_type"], e["count"]) for e in d["errors"]] == [("upstream_5xx", 21), ("timeout", 10),
                                                                    ("rate_limited", 3)]
    tid = d["errors"][0]["example_trace_ids"][0]
    call = admin(client, f"/admin/calls/{tid}")
    assert call.status_code == 200 and call.json()["error_type"] == "upstream_5xx"
    full = admin(client, f"/admin/calls/{seeded.error_trace}").json()
    assert full["customer"] == seeded.acme and full["tags"]["region"] == "eu" and "request_json" in full
    assert_openai_error(admin(client, "/admin/calls/" + "f" * 32), 404, code="call_not_found")
    assert_openai_error(admin(client, "/admin/calls/abc'--"), 400, param="trace_id")
    ts = admin(client, "/admin/timeseries", where=seeded.where, since="1h").json()
    assert ts["step_seconds"] == 60 and ts["by"] == "customer"
    assert ts["series"][0]["key"] == seeded.acme and ts["series"][0]["errors"] == 30
    assert ts["series"][0]["error_rate"] == pytest.approx(0.06)
    assert_openai_error(admin(client, "/admin/timeseries", by="tag.a'b"), 400, param="by")
    # step: seconds or a duration as `since` takes (step=1m was a 400 "step must be a whole number")
    for step, seconds in (("120", 120), ("2m", 120), ("0", 60)):
        got = admin(client, "/admin/timeseries", where=seeded.where, since="1h", step=step).json()
        assert got["step_seconds"] == seconds and got["series"][0]["errors"] == 30, (step, got["step_seconds"])
    for bad in ("1.5s", "soon", "-5", "²"):  # '²' was a 500: a digit to str.isdigit, not to int()
        assert_openai_error(admin(client, "/admin/timeseries", since="1h", step=bad), 400, param="step")


def test_store_unavailable_and_store_errors(seeded):
    class Broken:
        def query(self, *a, **k):
            raise StoreError("Code: 60. DB::Exception: Unknown table llm_calls (SELECT secret FROM llm_calls)")

    for get_store, code in ((lambda: None, "store_unavailable"), (lambda: Broken(), "query_failed")):
        app = FastAPI()
        app.include_router(build_stats_router(make_keyring(seeded), get_store))
        with TestClient(app) as c:
            res = c.get("/v1/tagway/stats", headers={"Authorization": f"Bearer {ACME_KEY}"})
            assert_openai_error(res, 503, code=code)
            assert "secret" not in res.text


SVG_NS = "http://www.w3.org/2000/svg"  # a namespace name, not a URL anything is loaded from


def test_ui_page_and_assets(client):
    res = client.get("/ui")  # the page itself needs no key; its data calls do
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in res.headers["content-security-policy"]
    assert 'src="ui/ui.js"' in res.text and "http://" not in res.text and "https://" not in res.text
    for name in ("ui.js", "common.js", "board.js"):
        js = client.get(f"/ui/{name}")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "https://" not in js.text and "http://" not in js.text.replace(SVG_NS, "")  # loads nothing
    assert "sessionStorage" in client.get("/ui/common.js").text  # the key lives in the tab, never in a URL
    assert client.get("/ui/ui.css").status_code == 200
    assert client.get("/ui/..%2Fstats_api.py").status_code == 404  # only the listed assets are served
    assert client.get("/ui/secret.py").status_code == 404
    assert client.get("/ui/", follow_redirects=False).status_code == 308


def test_handlers_run_on_the_thread_pool(client):
    """Sync handlers: FastAPI runs them in its thread pool, so a query never blocks the event loop."""
    for route in client.app.routes:
        if getattr(route, "path", "").startswith(("/admin", "/v1/tagway", "/ui")):
            assert not inspect.iscoroutinefunction(route.endpoint), route.path


def test_numbers_are_numbers(client, seeded):
    raw = admin(client, "/admin/stats", where=seeded.where).content
    d = orjson.loads(raw)
    s = d["segments"][0]
    assert all(isinstance(s[k], int) for k in ("calls", "errors", "cancelled", "input_tokens", "output_tokens"))
    assert isinstance(s["error_rate"], float) and isinstance(s["cost_usd"], float)


def test_replay_traffic_is_left_out_unless_asked_for(client, chdb_store, seeded):
    """Replayed and judge calls carry the replayed customer: the admin and tenant views leave them out unless
    `source` is filtered, and say so (`sources_excluded`)."""
    r = seed_replayed(chdb_store, customer=seeded.acme)  # production 50/0, replay 40/40, replay-judge 10/10
    for call in (admin, tenant):
        d = call(client, "/admin/stats" if call is admin else "/v1/tagway/stats", where=r.where, since="24h").json()
        assert [(s["key"]["customer"], s["calls"], s["errors"]) for s in d["segments"]] == [(seeded.acme, 50, 0)]
        assert d["sources_excluded"] == ["replay", "replay-judge", "shadow"]
    d = tenant(client, "/v1/tagway/stats", where=[r.where, "source=replay"], since="24h").json()
    assert (d["total"]["calls"], d["total"]["errors"], d["sources_excluded"]) == (40, 40, [])
    errs = admin(client, "/admin/errors", where=r.where).json()
    assert errs["errors"] == [] and errs["sources_excluded"] == ["replay", "replay-judge", "shadow"]
    ts = admin(client, "/admin/timeseries", where=r.where, since="1h").json()
    assert [(s["key"], s["calls"], s["errors"]) for s in ts["series"]] == [(seeded.acme, 50, 0)]
    judge = admin(client, "/admin/timeseries", where=[r.where, "source=replay-judge"], since="1h").json()
    assert [(s["calls"], s["errors"]) for s in judge["series"]] == [(10, 10)]
