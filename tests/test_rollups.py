"""Rollups (issue 18): stats read from the rollups equal the raw answers exactly (counts, errors, cancelled, Wilson
intervals, tokens, cost) on calls recorded through otel_traces -> llm_calls -> the rollup views, with replay and
judge calls mixed in, late rows, a re-sent spool batch, windows whose edges fall inside buckets and tag filters;
quantiles are within the bfloat16 bound of the exact ones; questions the rollups cannot answer read raw."""
from __future__ import annotations

import datetime as dt
import math
import uuid

import pytest

from exporters import queries as q
from exporters import rollups
from exporters.rollup_plan import Route, plan_pieces
from exporters.rollups import ROLLUPS_MIGRATION
from exporters.schema import SchemaSettings, statements_for
from exporters.store import Store
from tests.rollup_seed import insert_spans, seed_spans, span

UTC = dt.timezone.utc


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture(scope="module")
def seeded(chdb_store: Store) -> dict:
    run = "u" + uuid.uuid4().hex[:8]
    customers = [f"{run}-{c}" for c in ("a", "b", "c", "d")]
    now = dt.datetime.now(UTC)
    spans = seed_spans(customers, now - dt.timedelta(hours=3), now - dt.timedelta(seconds=30), 3000)
    for i in range(0, len(spans), 500):  # batches, as the exporter sends them
        insert_spans(chdb_store, spans[i:i + 500])
    # late rows: a spool re-send of calls from 2 h ago, after newer calls were stored
    late = seed_spans(customers, now - dt.timedelta(hours=2, minutes=10), now - dt.timedelta(hours=2), 200, seed=11)
    insert_spans(chdb_store, late)
    # the same spool batch sent twice (crash between insert and unlink): stored once, rolled up once
    resent = seed_spans([f"{run}-dup"], now - dt.timedelta(minutes=50), now - dt.timedelta(minutes=40), 40, seed=3)
    for _ in range(2):
        insert_spans(chdb_store, resent, token=f"spool-{run}")
    return {"run": run, "customers": customers, "now": now, "dup": f"{run}-dup"}


def exact(report: q.StatsReport) -> list:
    """Everything that must be equal between the rollup and the raw answer, quantiles too (the raw query takes the
    rollups' bfloat16 histograms: one definition, whichever table answers)."""
    segs = [(tuple(s.key.items()), s.calls, s.errors, s.cancelled, s.error_rate_ci, s.input_tokens, s.output_tokens,
             s.cost_usd, s.prev_calls, s.prev_errors, s.low_confidence, s.latency_p50, s.latency_p95, s.latency_p99,
             s.ttft_p50) for s in report.segments]
    t = report.total
    return segs + [("total", t.calls, t.errors, t.cancelled, t.input_tokens, t.output_tokens, t.cost_usd, t.prev_calls,
                    t.prev_errors, report.truncated)]


def both(store, sel, by, **kw) -> tuple[q.StatsReport, q.StatsReport]:
    return q.segment_stats(store, sel, by, **kw), q.segment_stats(store, sel, by, rollups=False, **kw)


def windows(now: dt.datetime) -> list[dict]:
    hour = now.replace(minute=0, second=0, microsecond=0)
    return [
        {"since": "3h"},  # ends now: raw seconds, minutes, hours, minutes, raw seconds
        {"from_": _iso(now - dt.timedelta(hours=2, seconds=37.25)), "to": _iso(now - dt.timedelta(minutes=23, seconds=-11.5))},
        {"from_": _iso(hour - dt.timedelta(hours=2)), "to": _iso(hour)},  # on hour edges: hours only
        {"from_": _iso(now - dt.timedelta(hours=1, minutes=5, seconds=20.5)), "to": _iso(now - dt.timedelta(hours=1, minutes=4, seconds=3))},
    ]


CASES = [
    (["customer"], []),
    (["customer", "intent"], []),
    (["model", "prompt_version", "provider"], []),
    (["status", "error_type"], []),
    (["intent"], ["customer!={c0}", "intent!=chat"]),
    (["customer"], ["status=error"]),
    (["customer", "source"], ["source!=production"]),
    (["tag.zone"], ["customer={c0}"]),
    (["customer"], ["tag.zone=eu"]),
    (["customer", "status"], ["tag.zone!=eu"]),
]


@pytest.mark.parametrize("by,where", CASES, ids=[f"{'+'.join(b)}|{','.join(w)}" for b, w in CASES])
def test_rollup_answers_equal_raw_answers(chdb_store, seeded, by, where):
    where = [w.format(c0=seeded["customers"][0]) for w in where]
    used = set()
    for win in windows(seeded["now"]):
        sel = q.make_selection(where=where, **win)
        fast, raw = both(chdb_store, sel, by, min_calls=5)
        assert raw.total.calls > 0 or "from_" in win
        assert exact(fast) == exact(raw), (by, where, win)
        assert raw.read["source"] == "raw"
        used.add(fast.read["source"])
    assert "rollup" in used  # the rollups answered (whole buckets inside the windows)


def test_compare_mode_and_truncated_totals_equal_raw(chdb_store, seeded):
    sel = q.make_selection(since="1h")
    fast, raw = both(chdb_store, sel, ["customer", "intent"], compare=True)
    assert fast.read["source"] == "rollup" and exact(fast) == exact(raw)
    assert fast.total.prev_calls and fast.total.prev_calls > 0
    fast, raw = both(chdb_store, q.make_selection(since="3h"), ["customer"], limit=2)
    assert fast.truncated and exact(fast) == exact(raw)


def test_replays_and_judge_calls_stay_out(chdb_store, seeded):
    c0 = seeded["customers"][0]
    sel = q.make_selection(where=[f"customer={c0}"], since="4h")
    fast = q.segment_stats(chdb_store, sel, ["source"])
    assert fast.read["source"] == "rollup"
    assert [s.key["source"] for s in fast.segments] == ["production"]
    replay = q.segment_stats(chdb_store, q.make_selection(where=[f"customer={c0}", "source=replay"], since="4h"),
                             ["source"])
    n = chdb_store.query("SELECT count() AS n FROM llm_calls WHERE customer = {c:String} AND source = 'replay'",
                         parameters={"c": c0})[0]["n"]
    assert replay.read["source"] == "rollup" and replay.total.calls == n > 0


def test_late_rows_and_a_resent_batch_land_once_in_their_buckets(chdb_store, seeded):
    when = seeded["now"] - dt.timedelta(hours=2, minutes=30)
    c = seeded["run"] + "-late"
    insert_spans(chdb_store, [span(when, c, status="error", error_type="timeout"), span(when, c)])
    fast = q.segment_stats(chdb_store, q.make_selection(where=[f"customer={c}"], since="3h"), ["customer"])
    assert fast.read["source"] == "rollup" and (fast.total.calls, fast.total.errors) == (2, 1)
    minute = when.replace(second=0, microsecond=0)
    rows = chdb_store.query("SELECT toUnixTimestamp(bucket) AS b, sum(calls) AS n FROM llm_calls_1m "
                            "WHERE customer = {c:String} GROUP BY b", parameters={"c": c})
    assert rows == [{"b": int(minute.timestamp()), "n": 2}]
    dup = q.segment_stats(chdb_store, q.make_selection(where=[f"customer={seeded['dup']}", "source!=x"], since="2h"),
                          ["customer"])
    assert dup.read["source"] == "rollup" and dup.total.calls == 40


@pytest.mark.parametrize("step", [60, 300, 3600, 10800, 90])
def test_time_series_equal_raw(chdb_store, seeded, step):
    sel = q.make_selection(since="3h")
    fast = q.error_timeseries(chdb_store, sel, step=step, series_limit=100, min_calls=1)
    raw = q.error_timeseries(chdb_store, sel, step=step, series_limit=100, min_calls=1, rollups=False)
    assert fast.to_dict()["series"] == raw.to_dict()["series"] and fast.buckets == raw.buckets
    assert fast.read["source"] == ("raw" if step == 90 else "rollup")  # 90 s buckets do not hold whole minutes
    tagged = q.make_selection(where=[f"customer={seeded['customers'][1]}"], since="3h")
    fast = q.error_timeseries(chdb_store, tagged, by="tag.zone", step=step, min_calls=1)
    raw = q.error_timeseries(chdb_store, tagged, by="tag.zone", step=step, min_calls=1, rollups=False)
    assert fast.to_dict()["series"] == raw.to_dict()["series"]


def _rank_bounds(values: list[float], level: float) -> tuple[float, float]:
    v = sorted(values)
    r = level * (len(v) - 1)
    return v[max(0, math.floor(r))], v[min(len(v) - 1, math.ceil(r))]


def test_quantiles_within_the_sketch_bound_of_exact_quantiles(chdb_store, seeded):
    a = rollups.QUANTILE_ACCURACY
    for c in seeded["customers"]:
        sel = q.make_selection(where=[f"customer={c}"], since="3h")
        fast = q.segment_stats(chdb_store, sel, ["intent"], min_calls=1)
        assert fast.read["source"] == "rollup"
        for seg in fast.segments:
            lat = [r["l"] for r in chdb_store.query(
                "SELECT latency_ms AS l FROM llm_calls WHERE customer = {c:String} AND intent = {i:String} "
                "AND source NOT IN ('replay', 'replay-judge') AND Timestamp >= fromUnixTimestamp64Micro({t:Int64})",
                parameters={"c": c, "i": seg.key["intent"], "t": int(sel.window.start.timestamp() * 1e6)})]
            assert len(lat) == seg.calls
            for level, got in ((0.5, seg.latency_p50), (0.95, seg.latency_p95), (0.99, seg.latency_p99)):
                lo, hi = _rank_bounds(lat, level)
                assert lo * (1 - a) - 1e-9 <= got <= hi + 1e-9, (c, seg.key, level, got, lo, hi)  # cut, never up


def test_questions_the_rollups_cannot_answer_read_raw(chdb_store, seeded):
    c0 = seeded["customers"][0]
    cases = [(["model_served"], [], "model_served"), (["customer"], ["stream=true"], "stream"),
             (["tag.zone"], ["tag.tier=pro"], "one tag key"), (["tag.tier"], [], "not rolled up"),
             (["tag.zone"], ["intent=chat"], "intent"), (["applied_tag"], [f"customer={c0}"], "applied_tag")]
    for by, where, why in cases:
        fast, raw = both(chdb_store, q.make_selection(where=where, since="3h"), by)
        assert fast.read["source"] == "raw" and why in fast.read["reason"]
        assert exact(fast) == exact(raw)
    now = seeded["now"]
    tiny = q.make_selection(from_=_iso(now - dt.timedelta(minutes=7, seconds=20)),
                            to=_iso(now - dt.timedelta(minutes=7)))  # 20 s: maybe a minute edge, no whole minute
    assert q.segment_stats(chdb_store, tiny, ["customer"]).read["source"] == "raw"


def test_to_dict_says_which_tables_answered(chdb_store, seeded):
    now = seeded["now"]
    sel = q.make_selection(from_=_iso(now - dt.timedelta(hours=3, seconds=7.5)), to=_iso(now - dt.timedelta(seconds=3)))
    d = q.segment_stats(chdb_store, sel, ["customer", "intent"]).to_dict()
    tables = [p["table"] for p in d["read"]["pieces"]]
    assert d["read"]["source"] == "rollup" and tables[0] == tables[-1] == "llm_calls"
    assert "llm_calls_1h" in tables
    # minute pieces, unless both raw edges meet the hour (a run in the first seconds of an hour)
    assert "llm_calls_1m" in tables or (now.minute == 0 and now.second < 10), tables


def test_per_customer_questions_read_the_smallest_family_and_relative_windows_read_no_raw(chdb_store, seeded):
    """By customer (with status/source filters) the per-customer family answers, its minute edges from the main
    minutes; a relative window is whole minutes, so nothing is read raw; answers equal raw."""
    c0 = seeded["customers"][0]
    for where in ([], ["status=error"], [f"customer!={c0}", "source!=production"]):
        sel = q.make_selection(where=where, since="3h")
        fast, raw = both(chdb_store, sel, ["customer"], min_calls=5)
        assert exact(fast) == exact(raw) and raw.total.calls > 0, where
        tables = {p["table"] for p in fast.read["pieces"]}
        # minute edges unless the window happens to start and end on the hour (a run at hh:59)
        edges = {"llm_calls_1m"} if sel.window.start.minute or sel.window.end.minute else set()
        assert tables == {"llm_calls_customer_1h"} | edges, (where, tables)
    assert sel.window.start.second == sel.window.start.microsecond == 0
    assert sel.window.end.second == 0 and sel.window.end > dt.datetime.now(UTC)  # through the current minute
    intent = q.segment_stats(chdb_store, q.make_selection(since="3h"), ["customer", "intent"])
    assert "llm_calls_customer_1h" not in {p["table"] for p in intent.read["pieces"]}  # not held there


def test_plan_never_reads_a_rollup_before_its_coverage_or_across_live_from():
    t = lambda h, m=0, s=0: dt.datetime(2026, 12, 1, h, m, s, tzinfo=UTC)  # noqa: E731
    route = Route("llm_calls", covered_from=t(3, 20, 30))
    pieces = plan_pieces(route, t(1, 5), t(9, 0, 10), splits=[t(5, 7, 12)])
    assert pieces[0].table == "llm_calls" and pieces[0].start == t(1, 5) and pieces[0].end == t(3, 21)
    assert all(p.start >= t(3, 20, 30) for p in pieces[1:])
    around = [p for p in pieces if p.start < t(5, 7, 12) < p.end]
    assert [(p.table, p.start, p.end) for p in around] == [("llm_calls", t(5, 7), t(5, 8))]  # raw around live_from
    assert {p.table for p in pieces} == {"llm_calls", "llm_calls_1m", "llm_calls_1h"}
    assert all(p.end == q_.start for p, q_ in zip(pieces, pieces[1:])) and pieces[-1].end == t(9, 0, 10)
    assert plan_pieces(route, t(1), t(9), step=90) == [type(pieces[0])("llm_calls", 0, t(1), t(9))]


def test_cluster_ddl_replicated_distributed_on_cluster():
    stmts = [sql for v, sql in statements_for(SchemaSettings(cluster="prod", database="tw", rollup_ttl_days=90))
             if v == ROLLUPS_MIGRATION]
    ddl = [s for s in stmts if not s.startswith("INSERT")]
    assert ddl and all(" ON CLUSTER `prod`" in s for s in ddl)
    for fam, levels in (("llm_calls", ("1m", "1h", "1d")), ("llm_calls_tags", ("1h", "1d"))):
        for lv in levels:
            local = next(s for s in ddl if s.startswith(f"CREATE TABLE IF NOT EXISTS `tw`.`{fam}_{lv}_local`"))
            assert "ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/tw/" in local
            assert "TTL bucket + toIntervalDay(90)" in local
            assert any(f"ENGINE = Distributed('prod', 'tw', '{fam}_{lv}_local'" in s for s in ddl)
    mv = next(s for s in ddl if "`llm_calls_1m_mv_local`" in s)
    assert "TO `tw`.`llm_calls_1m_local`" in mv and "FROM `tw`.`llm_calls_local`" in mv
    day_mv = next(s for s in ddl if "`llm_calls_tags_1d_mv_local`" in s)
    assert "FROM `tw`.`llm_calls_tags_1h_local`" in day_mv
    state = next(s for s in ddl if "`llm_rollup_state`" in s.split("(")[0])
    assert "ReplicatedReplacingMergeTree('/clickhouse/tables/all/tw/llm_rollup_state'" in state
    cust = [sql for v, sql in statements_for(SchemaSettings(cluster="prod", database="tw", rollup_ttl_days=90))
            if v == rollups.CUSTOMER_MIGRATION and not sql.startswith("INSERT")]
    assert cust and all(" ON CLUSTER `prod`" in s for s in cust)
    for lv in ("1h", "1d"):
        local = next(s for s in cust if s.startswith(f"CREATE TABLE IF NOT EXISTS `tw`.`llm_calls_customer_{lv}_local`"))
        assert "ReplicatedAggregatingMergeTree(" in local and "TTL bucket + toIntervalDay(90)" in local
        assert any(f"ENGINE = Distributed('prod', 'tw', 'llm_calls_customer_{lv}_local'" in s for s in cust)
    mv = next(s for s in cust if "`llm_calls_customer_1h_mv_local`" in s)
    assert "TO `tw`.`llm_calls_customer_1h_local`" in mv and "FROM `tw`.`llm_calls_1m_local`\n" in mv
    assert "WHERE" not in mv  # every minute written after the view exists (rollups.customer_statements)
    single = [sql for v, sql in statements_for(SchemaSettings()) if v in (ROLLUPS_MIGRATION, rollups.CUSTOMER_MIGRATION)]
    assert not any("ON CLUSTER" in s or "Replicated" in s or "Distributed" in s for s in single)
    assert all("TTL" not in s for s in single)


def test_rollup_tag_keys_default_to_taxonomy_keys_with_values_and_ttl_bounds_coverage():
    from gateway.config import GatewayConfig

    cfg = GatewayConfig(taxonomy={"keys": {"region": {"values": ["eu", "us"]}, "ticket": {}, "intent": {"values": ["a"]}}})
    assert cfg.schema_settings().rollup_tag_keys == ("region",)  # free-valued keys and columns are not rolled up
    cfg = GatewayConfig(storage={"rollup_tag_keys": ["tier", "region"], "rollup_ttl_days": 30, "ttl_days": 7})
    s = cfg.schema_settings()
    assert (s.rollup_tag_keys, s.rollup_ttl_days, s.ttl_days) == (("region", "tier"), 30, 7)
    now = dt.datetime(2026, 12, 1, tzinfo=UTC)
    st = rollups.RollupState(dt.datetime(2026, 1, 1, tzinfo=UTC), dt.datetime(2026, 1, 1, tzinfo=UTC),
                             dt.datetime(2026, 1, 1, tzinfo=UTC), 30, {"zone": dt.datetime(2026, 11, 30, tzinfo=UTC)})
    from exporters.rollup_plan import choose_route
    assert choose_route({"customer"}, st, now).covered_from == now - dt.timedelta(days=30)  # TTL-dropped: raw
    assert choose_route({"tag.zone", "customer"}, st, now).covered_from == dt.datetime(2026, 11, 30, tzinfo=UTC)
    assert choose_route({"tag.zone", "intent"}, st, now).family is None


def test_cli_json_says_which_tables_answered(chdb_store, chdb_dsn, seeded, monkeypatch):
    import orjson
    import typer
    from typer.testing import CliRunner

    from gateway import stats_cli

    monkeypatch.delenv("TAGWAY_DSN", raising=False)
    monkeypatch.delenv("TAGWAY_CONFIG", raising=False)
    app = typer.Typer()
    stats_cli.register(app)
    c0 = seeded["customers"][0]
    out = {}
    for by in ("intent", "model_served"):
        res = CliRunner().invoke(app, ["stats", "--by", by, "--where", f"customer={c0}", "--since", "3h", "--json",
                                       "--dsn", chdb_dsn], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[by] = orjson.loads(res.stdout)
    assert out["intent"]["read"]["source"] == "rollup"
    assert out["model_served"]["read"] == {**out["model_served"]["read"], "source": "raw",
                                           "reason": "the rollups do not hold model_served"}
    raw = q.segment_stats(chdb_store, q.make_selection(where=[f"customer={c0}"], since="3h"), ["intent"],
                          rollups=False)
    assert (out["intent"]["total"]["calls"], out["intent"]["total"]["errors"]) == (raw.total.calls, raw.total.errors)
