"""helm/tagway/dashboards/tagway-grafana.json: a valid dashboard for the grafana-clickhouse-datasource plugin whose
every query runs on llm_calls once the plugin's macros are expanded, and whose per-tenant table gives the same
numbers as the query layer (error rate and its 95% Wilson interval)."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from exporters import queries as q
from tests.calls_seed import Seeded, seed_calls

DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helm", "tagway",
                         "dashboards", "tagway-grafana.json")


@pytest.fixture(scope="module")
def seeded(chdb_store) -> Seeded:
    return seed_calls(chdb_store)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    with open(DASHBOARD, encoding="utf-8") as f:
        return json.load(f)


def expand(sql: str, database: str, variables: dict[str, list[str]], min_calls: str = "20") -> str:
    """What the plugin sends for a 1 h time range and 60 s interval, with the given variable values
    (an empty list = All)."""
    now = int(time.time()) + 1  # the plugin's `to` (whole seconds) is after rows written this very second

    def cond_all(m: re.Match) -> str:
        return "1=1" if not variables.get(m.group(2)) else m.group(1)

    sql = re.sub(r"\$__conditionalAll\((.*?), \$(\w+)\)", cond_all, sql)
    for name, values in variables.items():
        sql = sql.replace("${%s:singlequote}" % name, ",".join("'" + v.replace("'", "\\'") + "'" for v in values))
    sql = sql.replace("${database}", database).replace("$min_calls", min_calls)
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m.group(1)} >= toDateTime({now - 3600}) AND {m.group(1)} <= toDateTime({now})", sql)
    sql = re.sub(r"\$__timeInterval\((\w+)\)", lambda m: f"toStartOfInterval(toDateTime({m.group(1)}), INTERVAL 60 second)",
                 sql)
    assert "$" not in sql, sql
    return sql


def test_dashboard_shape(dashboard):
    assert dashboard["uid"] and dashboard["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"datasource", "database", "customer"} <= set(names)
    customer = next(v for v in dashboard["templating"]["list"] if v["name"] == "customer")
    assert customer["multi"] and customer["includeAll"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for needle in ("Error rate per tenant", "Latency p95 per tenant", "Cost per tenant", "Failure rate per tenant"):
        assert needle in titles
    for p in dashboard["panels"]:
        assert p["datasource"]["type"] == "grafana-clickhouse-datasource"
        for t in p["targets"]:
            assert "llm_calls" in t["rawSql"] and "$customer" in t["rawSql"]
            assert t["format"] == (0 if p["type"] == "timeseries" else 1)


def test_every_query_runs(chdb_store, seeded, dashboard):
    db = chdb_store.query_rows("SELECT currentDatabase()")[0][0][0]
    variables = {"customer": [seeded.acme, seeded.globex], "intent": [], "source": []}
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            chdb_store.query(expand(v["query"]["rawSql"], db, variables))
    for p in dashboard["panels"]:
        for t in p["targets"]:
            rows = chdb_store.query(expand(t["rawSql"], db, variables))
            assert rows, p["title"]


def test_per_tenant_table_matches_the_query_layer(chdb_store, seeded, dashboard):
    db = chdb_store.query_rows("SELECT currentDatabase()")[0][0][0]
    panel = next(p for p in dashboard["panels"] if p["title"].startswith("Failure rate per tenant and intent"))
    customers = [seeded.acme, seeded.globex, seeded.initech]
    rows = chdb_store.query(expand(panel["targets"][0]["rawSql"], db,
                                   {"customer": customers, "intent": [], "source": []}))
    ours = q.segment_stats(chdb_store, q.make_selection([seeded.where, f"customer!={seeded.spans}"], since="1h"),
                           ["customer", "intent"])
    assert [(r["customer"], r["intent"]) for r in rows] == [(s.key["customer"], s.key["intent"]) for s in ours.segments]
    for r, s in zip(rows, ours.segments):
        assert (r["calls"], r["errors"]) == (s.calls, s.errors)
        assert r["error rate"] == pytest.approx(s.error_rate)
        low, high = s.error_rate_ci
        assert r["ci low"] == pytest.approx(low, abs=1e-4) and r["ci high"] == pytest.approx(high, abs=1e-4)
        assert r["note"] == ("low n" if s.low_confidence else "")
    top = rows[0]
    assert (top["customer"], top["intent"], top["calls"], top["errors"]) == (seeded.acme, "refund", 100, 30)


def test_the_dashboards_defaults_count_what_tagway_stats_counts(chdb_store, dashboard):
    """The source variable defaulted to All: replay and judge calls (re-sent or graded customer traffic, failing
    here) were counted beside production, so a tenant's error rate differed from `tagway stats`'s. Its default is
    production now; the interval's ends stay within [0, 1] when a segment has no error."""
    from tests.calls_seed import seed_replayed  # noqa: PLC0415

    r = seed_replayed(chdb_store)
    db = chdb_store.query_rows("SELECT currentDatabase()")[0][0][0]
    source = next(v for v in dashboard["templating"]["list"] if v["name"] == "source")
    assert source["includeAll"] and source["current"]["value"] == ["production"]
    panel = next(p for p in dashboard["panels"] if p["title"].startswith("Failure rate per tenant (worst"))
    (row,) = chdb_store.query(expand(panel["targets"][0]["rawSql"], db, {"customer": [r.customer], "intent": [],
                                                                         "source": source["current"]["value"]}))
    ours = q.segment_stats(chdb_store, q.make_selection([f"customer={r.customer}"], since="1h"), ["customer"])
    (seg,) = ours.segments
    assert (row["calls"], row["errors"]) == (seg.calls, seg.errors) == (50, 0)
    assert row["ci low"] == 0 and row["ci high"] == pytest.approx(seg.error_rate_ci[1], abs=1e-4)
    (every,) = chdb_store.query(expand(panel["targets"][0]["rawSql"], db, {"customer": [r.customer], "intent": [],
                                                                           "source": []}))
    assert (every["calls"], every["errors"]) == (100, 50)  # All: production, replay and judge calls
