"""exporters.queries against the shared chDB store: exact counts, rates and Wilson intervals per segment, the
segment hidden by the mean, compare-mode deltas, top errors, one call, the error-rate series, and input validation.

The rows come from tests/calls_seed.py (shared with the CLI, API and page tests).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid

import orjson
import pytest

from exporters import queries as q
from exporters.store import Store
from tests.calls_seed import Replayed, Seeded, call_row, insert_calls, seed_calls, seed_replayed

@pytest.fixture(scope="module")
def seeded(chdb_store: Store) -> Seeded:
    return seed_calls(chdb_store)


def by_key(report: q.StatsReport) -> dict[tuple, q.SegmentStats]:
    return {tuple(s.key[k] for k in report.by): s for s in report.segments}


# -- pure functions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,low,high", [
    # reference values: scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
    (30, 100, 0.21894885294932764, 0.39584854633346667),
    (0, 10, 0.0, 0.27753279986288926),
    (10, 10, 0.7224672001371109, 1.0),
    (33, 1000, 0.0235929279584269, 0.04598126446708158),
    (1, 2, 0.09453120573423074, 0.9054687942657693),
    (3, 10, 0.10779126740630102, 0.6032218525388546),
])
def test_wilson_interval_known_values(k, n, low, high):
    got = q.wilson_interval(k, n)
    assert got[0] == pytest.approx(low, abs=1e-12)
    assert got[1] == pytest.approx(high, abs=1e-12)


def test_wilson_interval_edges():
    assert q.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        q.wilson_interval(5, 3)


def test_parse_window():
    now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.timezone.utc)
    minute = dt.timedelta(minutes=1)
    # a duration window is whole minutes, the current one (12:00:00-12:01:00) included, its length exact
    w = q.parse_window("15m", now=now + dt.timedelta(seconds=59.9))
    assert (w.start, w.end) == (now + minute - dt.timedelta(minutes=15), now + minute)
    assert q.parse_window("15m", now=now) == w
    assert q.parse_window("90s", now=now).seconds == 120  # rounded up to whole minutes
    assert q.parse_window(None, now=now).seconds == 86400
    end = now + minute
    assert q.parse_window("7d", now=now).previous() == q.Window(end - dt.timedelta(days=14), end - dt.timedelta(days=7))
    w = q.parse_window(from_="2026-11-20T00:00:00Z", to="2026-11-21T06:00:00+02:00", now=now)
    assert w.start == dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
    assert w.end == dt.datetime(2026, 11, 21, 4, tzinfo=dt.timezone.utc)
    assert q.parse_window(from_="2026-11-24T10:00", now=now).end == now  # naive = UTC; `to` defaults to now
    for bad in [dict(since="3x"), dict(since="0h"), dict(since="-1h"), dict(since="1h; DROP TABLE llm_calls"),
                dict(since="9999d"), dict(from_="yesterday"), dict(from_="2026-11-21", to="2026-11-20"),
                dict(to="2026-11-20"), dict(since="1h", from_="2026-11-20")]:
        with pytest.raises(q.QueryInputError) as e:
            q.parse_window(now=now, **bad)
        assert "\n" not in str(e.value)
    # a window in the future: nothing can be there, and an empty table read as "all quiet" (an on-call trial)
    with pytest.raises(q.QueryInputError) as e:
        q.parse_window(from_="2030-01-01T00:00:00", now=now)  # `to` is now: the from time is the mistake
    assert str(e.value) == ("the from time 2030-01-01T00:00:00Z is in the future (the to time defaults to now, "
                            "2026-11-24T12:00:00Z)")
    with pytest.raises(q.QueryInputError) as e:
        q.parse_window(from_="2030-01-01T00:00:00", to="2030-01-02T00:00:00", now=now)
    assert str(e.value).startswith("the window starts at 2030-01-01T00:00:00Z, in the future (now is 2026-11-24")
    assert q.parse_window(from_="2026-11-24T11:00", to="2026-12-01", now=now).end.day == 1  # ends later: fine


def test_parse_dimensions_and_filters():
    assert q.parse_by(None) == ("customer",)
    assert q.parse_by(["customer,intent", "tag.region"]) == ("customer", "intent", "tag.region")
    assert q.parse_by(["session_id"]) == ("session_id",)  # coverage and dataset targets take it as it is
    assert q.parse_where(["intent=refund", "tag.region!=eu", "stream=1"]) == (
        q.Filter("intent", "refund"), q.Filter("tag.region", "eu", "!="), q.Filter("stream", "true"))
    # values of the columns the gateway records normalised are read the same way ('=' is never recorded)
    assert q.parse_filter("tag.note=a=b").value == "a_b"
    assert [str(q.parse_filter(f)) for f in ("customer=ACME", "intent=Refund Flow", "source!=Batch Job",
                                              "tag.region=EU", "model=GPT-4o", "key_id=Jane")] == [
        "customer=acme", "intent=refund_flow", "source!=batch_job", "tag.region=eu", "model=GPT-4o", "key_id=Jane"]
    for bad in (["nope"], ["tag.a'b"], ["tag.x; DROP TABLE llm_calls"], ["tag.UPPER"], ["tag." + "a" * 65],
                ["customer", "customer"], ["customer) FROM system.tables --"]):
        with pytest.raises(q.QueryInputError) as e:
            q.parse_by(bad)
        assert e.value.param == "by"
    for bad in ("intent", "=x", "tag.a'b=1", "stream=maybe", "status=broken", "foo=bar"):
        with pytest.raises(q.QueryInputError) as e:
            q.parse_filter(bad)
        assert e.value.param == "where"
    with pytest.raises(q.QueryInputError):
        q.make_selection(status="failed")


def test_choose_step():
    now = dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc)
    assert q.choose_step(q.parse_window("15m", now=now)) == 60
    assert q.choose_step(q.parse_window("1h", now=now)) == 60
    assert q.choose_step(q.parse_window("24h", now=now)) == 1800
    assert q.choose_step(q.parse_window("7d", now=now)) == 3 * 3600
    assert q.choose_step(q.parse_window("30d", now=now)) == 12 * 3600


# -- segment stats ---------------------------------------------------------------------------------------------
def test_per_customer_rates_exact(chdb_store, seeded):
    sel = q.make_selection([seeded.where], since="24h")
    r = q.segment_stats(chdb_store, sel, ["customer"], min_calls=20)
    seg = by_key(r)
    acme, globex, initech, spans = (seg[(c,)] for c in (seeded.acme, seeded.globex, seeded.initech, seeded.spans))
    assert (acme.calls, acme.errors, acme.cancelled) == (500, 30, 0)
    assert acme.error_rate == pytest.approx(0.06)
    assert acme.error_rate_ci == q.wilson_interval(30, 500)
    assert (globex.calls, globex.errors, globex.cancelled) == (490, 0, 5)
    assert (initech.calls, initech.errors, initech.low_confidence) == (10, 3, True)
    assert (spans.calls, spans.errors, spans.low_confidence) == (4, 1, True)
    # worst first (error rate, then calls); small segments keep their place and carry the flag
    assert [s.key["customer"] for s in r.segments] == [seeded.initech, seeded.spans, seeded.acme, seeded.globex]
    assert (acme.input_tokens, acme.output_tokens) == (5000, 2500)
    assert acme.cost_usd == pytest.approx(0.5)
    assert acme.ttft_p50 == pytest.approx(40.0)
    t = r.total
    assert (t.calls, t.errors) == (1004, 34)
    assert not r.truncated


def test_hidden_segment_is_on_top(chdb_store, seeded):
    """Overall 3.3% errors, but acme on intent refund fails 30%: the by customer+intent view puts it first."""
    sel = q.make_selection([seeded.where, f"customer!={seeded.spans}"], since="24h")
    overall = q.segment_stats(chdb_store, sel, ["source"]).segments
    assert len(overall) == 1 and overall[0].calls == 1000 and overall[0].error_rate == pytest.approx(0.033)
    r = q.segment_stats(chdb_store, sel, ["customer", "intent"], min_calls=20)
    top = r.segments[0]
    assert top.key == {"customer": seeded.acme, "intent": "refund"}
    assert (top.calls, top.errors, top.error_rate) == (100, 30, 0.3)
    low, high = top.error_rate_ci
    assert low == pytest.approx(0.21894885294932764) and high == pytest.approx(0.39584854633346667)
    # initech/chat fails 30% too (3 of 10): same rate, fewer calls, so second, and flagged
    assert [tuple(s.key.values()) for s in r.segments] == [
        (seeded.acme, "refund"), (seeded.initech, "chat"), (seeded.acme, "chat"), (seeded.globex, "chat"),
        (seeded.globex, "refund")]
    assert [s.low_confidence for s in r.segments] == [False, True, False, False, False]
    # latency percentiles: globex/refund answered in exactly 100 ms every time
    g = by_key(r)[(seeded.globex, "refund")]
    assert (g.latency_p50, g.latency_p95, g.latency_p99) == (100.0, 100.0, 100.0)
    assert g.ttft_p50 is None  # no streaming, no time to first token


def test_group_and_filter_by_tag(chdb_store, seeded):
    sel = q.make_selection([seeded.where, f"customer={seeded.acme}", "intent=refund"], since="24h")
    r = q.segment_stats(chdb_store, sel, ["tag.region"])
    seg = by_key(r)
    assert (seg[("eu",)].calls, seg[("eu",)].errors) == (50, 30)
    assert (seg[("us",)].calls, seg[("us",)].errors) == (50, 0)
    only_eu = q.segment_stats(chdb_store, q.make_selection([seeded.where, "tag.region=eu"], since="24h"),
                              ["customer"])
    assert {s.key["customer"]: (s.calls, s.errors) for s in only_eu.segments} == {
        seeded.acme: (50, 30), seeded.spans: (4, 1)}
    assert q.segment_stats(chdb_store, q.make_selection([seeded.where, "tag.nosuchkey=x"], since="24h"),
                           ["customer"]).segments == []


def test_status_filter_and_other_columns(chdb_store, seeded):
    sel = q.make_selection([seeded.where], status="error", since="24h")
    r = q.segment_stats(chdb_store, sel, ["error_type"])
    assert {s.key["error_type"]: s.calls for s in r.segments} == {"upstream_5xx": 21, "timeout": 10, "rate_limited": 3}
    r = q.segment_stats(chdb_store, q.make_selection([seeded.where], since="24h"), ["stream", "model"])
    assert {tuple(s.key.values()): s.calls for s in r.segments} == {
        ("true", "gpt-4o-mini"): 800, ("false", "gpt-4o-mini"): 200, ("true", "gpt-4o"): 4}
    r = q.segment_stats(chdb_store, q.make_selection([seeded.where, "stream=false"], since="24h"), ["status"])
    assert {s.key["status"]: s.calls for s in r.segments} == {"ok": 200}


def test_compare_with_previous_window(chdb_store, seeded):
    sel = q.make_selection([seeded.where], since="24h")
    r = q.segment_stats(chdb_store, sel, ["customer", "intent"], compare=True)
    seg = by_key(r)
    top = seg[(seeded.acme, "refund")]
    assert (top.prev_calls, top.prev_errors) == (100, 5)
    assert top.prev_error_rate == pytest.approx(0.05)
    assert top.delta_error_rate == pytest.approx(0.25)
    gc = seg[(seeded.globex, "chat")]
    assert (gc.prev_calls, gc.prev_errors, gc.delta_error_rate) == (100, 0, 0.0)
    assert seg[(seeded.acme, "chat")].prev_calls == 0 and seg[(seeded.acme, "chat")].delta_error_rate is None
    assert (r.total.prev_calls, r.total.prev_errors) == (200, 5)
    d = r.to_dict()
    assert d["previous_window"]["seconds"] == 86400
    first = d["segments"][0]
    assert first["previous"] == {"calls": 100, "errors": 5, "error_rate": 0.05}
    assert first["delta_error_rate"] == pytest.approx(0.25)
    # the previous window alone gives the same numbers
    prev = q.segment_stats(chdb_store, dataclasses.replace(sel, window=sel.window.previous()), ["customer", "intent"])
    assert {tuple(s.key.values()): (s.calls, s.errors) for s in prev.segments} == {
        (seeded.acme, "refund"): (100, 5), (seeded.globex, "chat"): (100, 0)}


def test_compare_counts_segments_only_in_previous_window(chdb_store, seeded):
    sel = q.make_selection([seeded.where, "intent=refund", f"customer={seeded.acme}"], since="24h")
    r = q.segment_stats(chdb_store, sel, ["prompt_version"], compare=True)
    assert {s.key["prompt_version"]: s.calls for s in r.segments} == {"v1": 50, "v2": 50}
    assert r.total.prev_calls == 100
    # the previous window's segments with no call now are listed apart (they have no current rate): a version, or a
    # tenant, that went silent is news; the rows' and the gone ones' previous calls add up to the total's
    assert sum(s.prev_calls for s in r.segments) + sum(g["prev_calls"] for g in r.gone) == r.total.prev_calls


def test_compare_lists_the_segments_that_went_silent(chdb_store):
    """A tenant with calls in the previous window and none now was not listed at all: the total's previous count
    had its calls, the rows' did not add up to it."""
    run = "gone" + uuid.uuid4().hex[:8]
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=30)
    insert_calls(chdb_store, [call_row(run, f"{run}-a", i) for i in range(3)]
                 + [call_row(run, f"{run}-b", i, when=before, status="error" if i else "ok") for i in range(2)])
    r = q.segment_stats(chdb_store, q.make_selection([f"tag.run={run}"], since="24h"), ["customer"], compare=True)
    assert [s.key["customer"] for s in r.segments] == [f"{run}-a"]
    assert r.gone == [{"key": {"customer": f"{run}-b"}, "prev_calls": 2, "prev_errors": 1}]
    assert r.total.prev_calls == sum(g["prev_calls"] for g in r.gone) + sum(s.prev_calls for s in r.segments) == 2
    assert orjson.loads(orjson.dumps(r.to_dict()))["gone"] == r.gone
    assert "gone" not in q.segment_stats(chdb_store, q.make_selection([f"tag.run={run}"], since="24h"),
                                         ["customer"]).to_dict()


def test_limit_truncates_and_totals_stay_exact(chdb_store, seeded):
    sel = q.make_selection([seeded.where], since="24h")
    r = q.segment_stats(chdb_store, sel, ["customer", "intent"], limit=2)
    assert r.truncated and len(r.segments) == 2
    assert (r.total.calls, r.total.errors) == (1004, 34)


def test_to_dict_is_json_for_programs(chdb_store, seeded):
    sel = q.make_selection([seeded.where], since="24h")
    d = orjson.loads(orjson.dumps(q.segment_stats(chdb_store, sel, ["customer"]).to_dict()))
    s = d["segments"][2]
    assert s["key"] == {"customer": seeded.acme}
    assert s["calls"] == 500 and s["errors"] == 30 and s["error_rate"] == 0.06
    assert set(s["error_rate_ci"]) == {"low", "high"} and isinstance(s["error_rate_ci"]["low"], float)
    assert set(s["latency_ms"]) == {"p50", "p95", "p99"}
    assert d["filters"] == [{"key": "tag.run", "op": "=", "value": seeded.run}]
    assert d["total"]["calls"] == 1004


def test_values_are_parameters_not_sql(chdb_store, seeded):
    """A hostile value is just a value: no rows, no error, the table is still there."""
    evil = "x' OR 1=1 --"
    r = q.segment_stats(chdb_store, q.make_selection([seeded.where, f"customer={evil}", f"tag.region={evil}"],
                                                      since="24h"), ["customer"])
    assert r.segments == [] and r.total.calls == 0
    assert q.segment_stats(chdb_store, q.make_selection([seeded.where], since="24h")).total.calls == 1004


# -- errors, one call, time series -----------------------------------------------------------------------------
def test_top_errors_counts_no_customer_as_none(chdb_store):
    """A refused key's calls carry no customer: they make no customer of their own in `customers`."""
    from tests.rollup_seed import insert_spans, span
    now = dt.datetime.now(dt.timezone.utc)
    tag = {"errors-no-customer": "1"}
    insert_spans(chdb_store, [span(now, "", status="error", error_type="invalid_api_key", tags=tag),
                              span(now, "", status="error", error_type="invalid_api_key", tags=tag),
                              span(now, "acme-nc", status="error", error_type="upstream_5xx", tags=tag),
                              span(now, "globex-nc", status="error", error_type="upstream_5xx", tags=tag)])
    rep = q.top_errors(chdb_store, q.make_selection(["tag.errors-no-customer=1"], since="1h"))
    assert {g.error_type: (g.count, g.customers) for g in rep.groups} == {"invalid_api_key": (2, 0),
                                                                          "upstream_5xx": (2, 2)}


def test_a_trace_id_too_long_says_so():
    with pytest.raises(q.QueryInputError, match="at most 128 characters"):
        q.parse_trace_id("a" * 129)
    assert q.parse_trace_id("a" * 128) == "a" * 128


def test_top_errors(chdb_store, seeded):
    rep = q.top_errors(chdb_store, q.make_selection([seeded.where], since="24h"))
    assert [(g.error_type, g.count) for g in rep.groups] == [("upstream_5xx", 21), ("timeout", 10), ("rate_limited", 3)]
    assert rep.total_errors == 34
    g = rep.groups[0]
    assert g.http_statuses == [502] and g.customers == 2 and g.share == pytest.approx(21 / 34)
    newest = chdb_store.query("SELECT trace_id FROM llm_calls WHERE tags['run'] = {r:String} AND error_type = "
                              "'upstream_5xx' ORDER BY Timestamp DESC, trace_id LIMIT 3", parameters={"r": seeded.run})
    assert g.example_trace_ids == [r["trace_id"] for r in newest]  # the newest three: the same on every read
    for tid in g.example_trace_ids:
        call = q.get_call(chdb_store, tid)
        assert call["status"] == "error" and call["error_type"] == "upstream_5xx"
    only_acme = q.top_errors(chdb_store, q.make_selection([seeded.where, f"customer={seeded.acme}"], since="24h"),
                             limit=1)
    assert [(g.error_type, g.count) for g in only_acme.groups] == [("upstream_5xx", 20)]
    for sel in (q.make_selection([seeded.where], status="ok", since="24h"),
                q.make_selection([seeded.where, "status=ok"], since="24h")):  # a filter said the same: an empty list
        with pytest.raises(q.QueryInputError, match="status=ok: the errors view lists failed calls"):
            q.top_errors(chdb_store, sel)
    cancelled = q.top_errors(chdb_store, q.make_selection([seeded.where], status="cancelled", since="24h"))
    assert [(g.error_type, g.count, g.http_statuses) for g in cancelled.groups] == [("client_disconnected", 5, [499])]


def test_get_call(chdb_store, seeded):
    call = q.get_call(chdb_store, seeded.error_trace)
    assert call["customer"] == seeded.acme and call["intent"] == "refund"
    assert call["status"] == "error" and call["http_status"] == 502
    assert call["tags"] == {"run": seeded.run, "region": "eu"}
    assert call["Timestamp"].endswith("Z")
    assert dt.datetime.fromisoformat(call["Timestamp"].replace("Z", "+00:00")) <= \
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    orjson.dumps(call)  # JSON-ready
    assert q.get_call(chdb_store, "0" * 32) is None
    with pytest.raises(q.QueryInputError):
        q.get_call(chdb_store, "abc' OR '1'='1")


def test_spans_flow_through_the_materialized_view(chdb_store, seeded):
    call = q.get_call(chdb_store, seeded.span_trace_err)
    assert call is not None, "the span did not reach llm_calls through llm_calls_mv"
    assert (call["customer"], call["intent"], call["prompt_version"]) == (seeded.spans, "refund", "v3")
    assert (call["status"], call["error_type"], call["http_status"]) == ("error", "upstream_5xx", 502)
    assert call["tags"] == {"run": seeded.run, "region": "eu"}
    assert (call["model_requested"], call["model_served"]) == ("gpt-4o", "gpt-4o-2024-08-06")
    assert call["latency_ms"] == pytest.approx(150.0) and call["ttft_ms"] == pytest.approx(250.0)
    ok = q.get_call(chdb_store, seeded.span_trace_ok)
    assert ok["status"] == "ok" and "done" in ok["response_json"] and ok["input_tokens"] == 12
    r = q.segment_stats(chdb_store, q.make_selection([seeded.where, f"customer={seeded.spans}"], since="24h"),
                        ["intent", "tag.region"], min_calls=1)
    (seg,) = r.segments
    assert (seg.key, seg.calls, seg.errors, seg.low_confidence) == ({"intent": "refund", "tag.region": "eu"}, 4, 1,
                                                                    False)
    assert seg.cost_usd == pytest.approx(0.002) and seg.ttft_p50 == pytest.approx(250.0)


def test_error_timeseries(chdb_store, seeded):
    sel = q.make_selection([seeded.where], since="1h")
    ts = q.error_timeseries(chdb_store, sel)
    assert ts.step_seconds == 60 and 60 <= len(ts.buckets) <= 61
    keys = [s.key for s in ts.series]
    # the stats table's order: enough calls first, worst rate first; low-confidence series after them
    assert keys == [seeded.acme, seeded.globex, seeded.initech, seeded.spans]
    assert set(keys) == {seeded.acme, seeded.globex, seeded.initech, seeded.spans}
    per = {s.key: s for s in ts.series}
    assert (per[seeded.acme].calls, per[seeded.acme].errors) == (500, 30)
    assert sum(p["calls"] for p in per[seeded.globex].points) == 490
    assert all(p["error_rate"] is None for p in per[seeded.globex].points if p["calls"] == 0)
    assert all(len(s.points) == len(ts.buckets) for s in ts.series)
    rate = [p for p in per[seeded.initech].points if p["calls"]]
    assert sum(p["errors"] for p in rate) == 3
    assert all(math.isclose(p["error_rate"], p["errors"] / p["calls"]) for p in rate)
    top1 = q.error_timeseries(chdb_store, sel, series_limit=1)
    assert [s.key for s in top1.series] == [seeded.acme] and top1.omitted == 3
    by_intent = q.error_timeseries(chdb_store, sel, by="intent")
    assert {s.key: s.errors for s in by_intent.series} == {"refund": 31, "chat": 3}
    assert [s.key for s in q.error_timeseries(chdb_store, sel, min_calls=1).series] == [
        seeded.initech, seeded.spans, seeded.acme, seeded.globex]
    with pytest.raises(q.QueryInputError):
        q.error_timeseries(chdb_store, sel, by="tag.a'b")


# -- replay and judge traffic ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replayed(chdb_store: Store) -> Replayed:
    return seed_replayed(chdb_store)


def test_replay_and_judge_calls_are_not_production_failures(chdb_store, replayed):
    """A replay re-sends a customer's calls (same customer, same tags) to a candidate: its 40 failures and the
    judge's 10 are the candidate's, not the customer's. Left out of every query unless `source` is filtered."""
    sel = q.make_selection([replayed.where], since="24h")
    assert sel.sources_excluded == q.EXCLUDED_SOURCES == ("replay", "replay-judge", "shadow")
    r = q.segment_stats(chdb_store, sel, ["customer"])
    (seg,) = r.segments
    assert (seg.key["customer"], seg.calls, seg.errors) == (replayed.customer, 50, 0)
    assert (r.total.calls, r.total.errors) == (50, 0)
    d = r.to_dict()
    assert d["sources_excluded"] == ["replay", "replay-judge", "shadow"]
    # compare mode: the previous window leaves them out too (20 production calls, 2 errors)
    c = q.segment_stats(chdb_store, sel, ["customer"], compare=True)
    assert (c.segments[0].prev_calls, c.segments[0].prev_errors) == (20, 2)
    assert (c.total.prev_calls, c.total.prev_errors) == (20, 2)
    # the separate totals query, used when --limit cuts the segment list (ok; error only in the previous window)
    t = q.segment_stats(chdb_store, sel, ["status"], limit=1, compare=True)
    assert t.truncated and [s.key["status"] for s in t.segments] == ["ok"]
    assert (t.total.calls, t.total.errors, t.total.prev_calls, t.total.prev_errors) == (50, 0, 20, 2)
    assert q.top_errors(chdb_store, sel).groups == []
    ts = q.error_timeseries(chdb_store, sel)
    assert [(s.key, s.calls, s.errors) for s in ts.series] == [(replayed.customer, 50, 0)]
    assert ts.to_dict()["sources_excluded"] == ["replay", "replay-judge", "shadow"]


def test_a_source_filter_shows_replay_traffic(chdb_store, replayed):
    only = q.make_selection([replayed.where, "source=replay"], since="24h")
    assert only.sources_excluded == () and only.to_dict()["sources_excluded"] == []
    r = q.segment_stats(chdb_store, only, ["customer"], compare=True)
    assert (r.total.calls, r.total.errors, r.total.prev_calls, r.total.prev_errors) == (40, 40, 20, 20)
    assert r.to_dict()["sources_excluded"] == []
    not_prod = q.make_selection([replayed.where, "source!=production"], since="24h")
    r = q.segment_stats(chdb_store, not_prod, ["source"])
    assert {s.key["source"]: (s.calls, s.errors) for s in r.segments} == {"replay": (40, 40),
                                                                          "replay-judge": (10, 10)}
    assert [(g.error_type, g.count) for g in q.top_errors(chdb_store, not_prod).groups] == [("upstream_5xx", 50)]
    ts = q.error_timeseries(chdb_store, q.make_selection([replayed.where, "source=replay-judge"], since="1h"))
    assert [(s.calls, s.errors) for s in ts.series] == [(10, 10)]


def test_replay_slices_leave_out_the_same_sources(chdb_store, replayed):
    """A replay slice over the same rows sees what stats sees: production only, unless a filter names source."""
    from replay.slice import build_pool_query  # noqa: PLC0415
    from replay.spec import SliceSpec  # noqa: PLC0415

    def pool(**slice_spec) -> int:
        sql, params = build_pool_query(SliceSpec(status="any", since="24h", tags={"run": replayed.run}, **slice_spec))
        return len(chdb_store.query(sql, params))

    stats_calls = q.segment_stats(chdb_store, q.make_selection([replayed.where]), ["customer"]).total.calls
    assert pool() == stats_calls == 50
    assert pool(where=["source!=production"]) == 50  # replay 40 + judge 10, as test_a_source_filter_... counts
    assert pool(where=["source=replay-judge", "status=error"]) == 10


def test_two_customers_sessions_of_one_name_are_two_rows(chdb_store):
    run = "sess" + uuid.uuid4().hex[:8]
    insert_calls(chdb_store, [call_row(run, f"{run}-a", i, session_id="sess-1") for i in range(2)]
                 + [call_row(run, f"{run}-b", i, session_id="sess-1") for i in range(3)])
    got = q.segment_stats(chdb_store, q.make_selection([f"tag.run={run}"], since="2h"), q.parse_by(["session_id"]))
    assert got.by == ("customer", "session_id")
    assert sorted((s.key["customer"], s.key["session_id"], s.calls) for s in got.segments) == [
        (f"{run}-a", "sess-1", 2), (f"{run}-b", "sess-1", 3)]
    by = q.segment_stats(chdb_store, q.make_selection([f"tag.run={run}"], since="2h"), ["intent", "session_id"]).by
    assert by == ("intent", "customer", "session_id")
