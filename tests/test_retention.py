"""Retention changed on an existing store (exporters/retention.py): storage.ttl_days and rollup_ttl_days reach the
tables' TTLs at the gateway's migration, and only there; the rollups' coverage follows their TTL."""
from __future__ import annotations

import datetime as dt
import logging
import uuid

import yaml

from exporters import rollups
from exporters.retention import RAW_TABLES, sync_retention, ttl_days_of
from exporters.schema import SchemaSettings, migrate
from gateway.config import GatewayConfig

UTC = dt.timezone.utc


def ttls(store, db: str) -> dict[str, int]:
    rows = store.query("SELECT name, create_table_query AS q FROM system.tables WHERE database = {db:String}",
                       parameters={"db": db})
    column = {t: c for t, c in RAW_TABLES}
    return {r["name"]: ttl_days_of(r["q"], column.get(r["name"], "bucket")) for r in rows}


def test_ttl_days_of():
    q = "CREATE TABLE t (x Int8) ENGINE = MergeTree ORDER BY x {} SETTINGS index_granularity = 8192"
    assert ttl_days_of(q.format("TTL toDateTime(Timestamp) + toIntervalDay(90)"), "Timestamp") == 90
    assert ttl_days_of(q.format(""), "Timestamp") == 0
    assert ttl_days_of(q.format("TTL bucket + toIntervalDay(400)"), "bucket") == 400
    # an operator's own TTL (a move to a volume, several rules, another unit): not tagway's to rewrite
    assert ttl_days_of(q.format("TTL toDateTime(Timestamp) + toIntervalDay(7) TO VOLUME 'cold', "
                                "toDateTime(Timestamp) + toIntervalDay(90)"), "Timestamp") is None
    assert ttl_days_of(q.format("TTL toDateTime(Timestamp) + toIntervalMonth(3)"), "Timestamp") is None


def test_a_changed_ttl_reaches_the_tables_and_the_rollup_state(chdb_store, caplog):
    db = "ret_" + uuid.uuid4().hex[:8]
    migrate(chdb_store, SchemaSettings(database=db, ttl_days=90, rollup_ttl_days=400, rollup_tag_keys=("zone",)))
    before = ttls(chdb_store, db)
    raw = [t for t, _ in RAW_TABLES]
    rolled = rollups.rollup_tables()
    assert {before[t] for t in raw} == {90} and {before[t] for t in rolled} == {400}
    st = rollups.read_state(chdb_store, db)
    assert st.ttl_days == 400 and st.tag_keys["zone"] < dt.datetime.now(UTC) - dt.timedelta(days=400)

    # migrating with the defaults (a replay or stats command; `db migrate` with no config) leaves the TTLs alone
    migrate(chdb_store, SchemaSettings(database=db))
    default = GatewayConfig(storage={"database": db}).schema_settings()
    assert default.apply_retention == ()
    migrate(chdb_store, default)
    assert ttls(chdb_store, db) == before

    # the operator keeps calls 30 days and the rollups forever: the gateway's migration applies it, and says so
    now = dt.datetime.now(UTC)
    wanted = GatewayConfig(storage={"database": db, "ttl_days": 30, "rollup_ttl_days": 0}).schema_settings()
    with caplog.at_level(logging.WARNING, logger="exporters.retention"):
        migrate(chdb_store, wanted)
    after = ttls(chdb_store, db)
    assert {after[t] for t in raw} == {30} and {after[t] for t in rolled} == {0}
    assert [r.getMessage() for r in caplog.records] == [
        f"retention changed: {t}: kept 90 days, now 30 days (storage.ttl_days)" for t in raw] + [
        "retention changed: rollups: kept 400 days, now forever (storage.rollup_ttl_days)"]
    st2 = rollups.read_state(chdb_store, db)
    # a longer TTL cannot bring back what the old one deleted: coverage starts at the old horizon's next midnight
    # (whole buckets), tag keys' too; what lay below it is gone, and nothing is pending
    horizon = (now - dt.timedelta(days=400)).replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
    assert st2.ttl_days == 0 and st2.covered_from == st2.pending_from == horizon
    assert st2.tag_keys["zone"] == horizon and not st2.split_at_live_from
    assert sync_retention(chdb_store, wanted) == []  # settled

    # an operator's own TTL on one table is left alone, said once
    chdb_store.command(f"ALTER TABLE `{db}`.`llm_feedback` MODIFY TTL toDateTime(Timestamp) + toIntervalMonth(2)")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporters.retention"):
        changed = sync_retention(chdb_store, GatewayConfig(storage={"database": db, "ttl_days": 10}).schema_settings())
    assert changed == [f"{t}: kept 30 days, now 10 days (storage.ttl_days)" for t in raw if t != "llm_feedback"]
    assert "retention: llm_feedback has a TTL tagway did not write; left as it is" in caplog.text


def test_the_gateways_schema_settings_apply_the_retention_it_sets():
    assert GatewayConfig(storage={"ttl_days": 7, "rollup_ttl_days": 60}).schema_settings().apply_retention == (
        "ttl_days", "rollup_ttl_days")
    assert GatewayConfig(storage={"ttl_days": 7}).schema_settings().apply_retention == ("ttl_days",)
    assert SchemaSettings().apply_retention == ()


def test_a_ttl_removed_from_the_config_file_is_removed_from_the_tables(chdb_store, tmp_path, monkeypatch):
    """Deleting `ttl_days: 7` from the file left the 7-day TTL in place ("schema is up to date"), though the README
    gives 0 (kept for ever) as the default: a config file now states the retention whole. A command run without a
    config file still never removes one."""
    from gateway.config import load_config  # noqa: PLC0415

    monkeypatch.delenv("TAGWAY_STORAGE__TTL_DAYS", raising=False)
    db = "ret_" + uuid.uuid4().hex[:8]
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({"storage": {"database": db, "ttl_days": 7}}))
    migrate(chdb_store, load_config(str(path)).states_retention().schema_settings())
    assert {ttls(chdb_store, db)[t] for t, _ in RAW_TABLES} == {7}
    migrate(chdb_store, GatewayConfig(storage={"database": db}).schema_settings())  # no file: left alone
    assert {ttls(chdb_store, db)[t] for t, _ in RAW_TABLES} == {7}
    path.write_text(yaml.safe_dump({"storage": {"database": db}}))  # the line deleted
    # another process loading the same file (an in-process gateway of a replay or a pytest gate) leaves it alone
    assert load_config(str(path)).schema_settings().apply_retention == ()
    settings = load_config(str(path)).states_retention().schema_settings()  # `serve`, `db migrate`
    assert settings.apply_retention == ("ttl_days", "rollup_ttl_days")
    migrate(chdb_store, settings)
    assert {ttls(chdb_store, db)[t] for t, _ in RAW_TABLES} == {0}


def test_a_store_that_refuses_the_alter_still_migrates(chdb_store, caplog):
    """A ClickHouse user without ALTER rights (the chart's migration Job does the schema): the gateway starts, says
    the retention was not applied, and records."""
    from exporters.store import StoreError  # noqa: PLC0415

    class NoAlter:
        def __init__(self, store):
            self._store, self.dsn = store, store.dsn

        def command(self, sql, *a, **k):
            if sql.startswith("ALTER TABLE") and "TTL" in sql:
                raise StoreError("Not enough privileges")
            return self._store.command(sql, *a, **k)

        def __getattr__(self, name):
            return getattr(self._store, name)

    db = "ret_" + uuid.uuid4().hex[:8]
    migrate(chdb_store, SchemaSettings(database=db, ttl_days=90))
    with caplog.at_level(logging.ERROR, logger="exporters.schema"):
        migrate(NoAlter(chdb_store), GatewayConfig(storage={"database": db, "ttl_days": 30}).schema_settings())
    assert "retention could not be applied (Not enough privileges)" in caplog.text
    assert {ttls(chdb_store, db)[t] for t, _ in RAW_TABLES} == {90}
