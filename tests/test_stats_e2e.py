"""Calls driven through the real gateway (uvicorn, the test upstream, recording into the shared chDB store) come
back out of the gateway's own stats API with exact counts, and the tenant view stays inside its customer."""
from __future__ import annotations

import uuid

import httpx
import pytest

from exporters import queries as q
from tests.gateway_fixture import ADMIN_KEY, KEYS, recorded_gateway

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def gw(upstream, chdb_store, tmp_path_factory):
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("stats-spool"))) as server:
        yield server


def test_calls_through_the_gateway_show_up_in_its_stats(gw):
    run = uuid.uuid4().hex[:10]
    x, y = f"e2e-{run}-x", f"e2e-{run}-y"
    plan = [(x, "refund", "broken", 3), (x, "refund", "gpt-test", 7), (x, "chat", "gpt-test", 10),
            (y, "refund", "gpt-test", 10)]
    with httpx.Client(base_url=gw.url, timeout=20) as h:
        for customer, intent, model, n in plan:
            for _ in range(n):
                r = h.post("/v1/chat/completions", json={"model": model, "messages": MSG},
                           headers={"authorization": f"Bearer {KEYS['platform']}", "x-tagway-customer": customer,
                                    "x-tagway-intent": intent, "x-tagway-tags": f"region=eu,feature={run}"})
                assert r.status_code == (500 if model == "broken" else 200), r.text
        assert gw.recorder.force_flush()
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        res = h.get("/admin/stats", params={"by": ["customer", "intent"], "where": f"tag.feature={run}",
                                            "since": "15m", "min_calls": "5"}, headers=admin)
        assert res.status_code == 200, res.text
        d = res.json()
        got = {(s["key"]["customer"], s["key"]["intent"]): (s["calls"], s["errors"]) for s in d["segments"]}
        assert got == {(x, "refund"): (10, 3), (x, "chat"): (10, 0), (y, "refund"): (10, 0)}
        top = d["segments"][0]
        assert top["key"] == {"customer": x, "intent": "refund"} and top["error_rate"] == pytest.approx(0.3)
        low, high = q.wilson_interval(3, 10)
        assert top["error_rate_ci"] == {"low": pytest.approx(low), "high": pytest.approx(high)}
        assert (d["total"]["calls"], d["total"]["errors"]) == (30, 3)

        errs = h.get("/admin/errors", params={"where": f"tag.feature={run}", "since": "15m"}, headers=admin).json()
        (group,) = errs["errors"]
        assert group["count"] == 3 and group["http_statuses"] == [500]
        call = h.get(f"/admin/calls/{group['example_trace_ids'][0]}", headers=admin).json()
        assert (call["customer"], call["intent"], call["status"]) == (x, "refund", "error")

        ts = h.get("/admin/timeseries", params={"where": f"tag.feature={run}", "since": "15m"}, headers=admin).json()
        assert {s["key"]: (s["calls"], s["errors"]) for s in ts["series"]} == {x: (20, 3), y: (10, 0)}

        assert h.get("/ui").status_code == 200

        # a tenant key sees its own customer only, and asking for another one is refused
        acme = {"authorization": f"Bearer {KEYS['acme']}"}
        mine = h.get("/v1/tagway/stats", params={"by": "customer", "since": "15m"}, headers=acme)
        assert mine.status_code == 200
        assert {s["key"]["customer"] for s in mine.json()["segments"]} <= {"acme"}
        other = h.get("/v1/tagway/stats", params={"where": f"customer={x}"}, headers=acme)
        assert other.status_code == 403 and other.json()["error"]["code"] == "customer_not_allowed"
        assert h.get("/admin/stats", headers=acme).status_code == 403
