"""Retention changed on an existing store (exporters/retention.py): storage.ttl_days and rollup_ttl_days reach the
tables' TTLs at the gateway's migration, and only there; the rollups' coverage follows their TTL."""
from __future__ import annotations

import datetime as dt
import logging
import uuid

from exporters import rollups
from exporters.retention import RAW_TABLES, sync_retention, ttl_days_of
from exporters.schema import SchemaSettings, migrate
from gateway.config import GatewayConfig

UTC = dt.timezone.utc


def ttls(store, db: str) -> dict[str, int]:
    rows = store.query("SELECT name, create_table_query AS q FROM system.tables WHERE database = {db:String}",
                       parameters={"db": db})
    return {r["name"]: ttl_days_of(r["q"]) for r in rows}


def test_ttl_days_of():
    assert ttl_days_of("CREATE TABLE t (x Int8) ENGINE = MergeTree ORDER BY x TTL toDateTime(Timestamp) + "
                       "toIntervalDay(90) SETTINGS index_granularity = 8192") == 90
    assert ttl_days_of("CREATE TABLE t (x Int8) ENGINE = MergeTree ORDER BY x SETTINGS index_granularity = 8192") == 0


def test_a_changed_ttl_reaches_the_tables_and_the_rollup_state(chdb_store, caplog):
    db = "ret_" + uuid.uuid4().hex[:8]
    migrate(chdb_store, SchemaSettings(database=db, ttl_days=90, rollup_ttl_days=400))  # created with these
    before = ttls(chdb_store, db)
    raw = [t for t, _ in RAW_TABLES]
    rolled = rollups.rollup_tables()
    assert {before[t] for t in raw} == {90} and {before[t] for t in rolled} == {400}
    st = rollups.read_state(chdb_store, db)
    assert st.ttl_days == 400

    # another command migrating with the defaults (replay, stats) leaves the operator's TTLs alone
    migrate(chdb_store, SchemaSettings(database=db))
    assert ttls(chdb_store, db) == before

    # the operator keeps calls 30 days and the rollups forever: the gateway's migration applies it, and says so
    now = dt.datetime.now(UTC)
    with caplog.at_level(logging.WARNING, logger="exporters.retention"):
        migrate(chdb_store, SchemaSettings(database=db, ttl_days=30, rollup_ttl_days=0, apply_retention=True))
    after = ttls(chdb_store, db)
    assert {after[t] for t in raw} == {30} and {after[t] for t in rolled} == {0}
    assert [r.getMessage() for r in caplog.records] == [
        "retention changed: calls and spans (otel_traces, otel_traces_trace_id_ts, llm_calls, llm_feedback): kept "
        "90 days, now 30 days (storage.ttl_days)",
        "retention changed: rollups: kept 400 days, now forever (storage.rollup_ttl_days)"]
    st2 = rollups.read_state(chdb_store, db)
    # a longer TTL cannot bring back what the old one deleted: coverage starts no earlier than its horizon
    assert st2.ttl_days == 0 and st2.covered_from >= now - dt.timedelta(days=400, seconds=5)
    assert st2.usable_from(now + dt.timedelta(days=1000)) == st2.covered_from
    assert sync_retention(chdb_store, SchemaSettings(database=db, ttl_days=30, rollup_ttl_days=0)) == []  # settled


def test_the_gateways_schema_settings_apply_retention():
    s = GatewayConfig(storage={"ttl_days": 7, "rollup_ttl_days": 60}).schema_settings()
    assert (s.ttl_days, s.rollup_ttl_days, s.apply_retention) == (7, 60, True)
    assert SchemaSettings().apply_retention is False
