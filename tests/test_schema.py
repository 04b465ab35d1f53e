"""Schema migrations: versioned, idempotent, one code path for a single node and a cluster."""
from __future__ import annotations

import time
import uuid

import orjson

from exporters.schema import MIGRATIONS, SchemaSettings, applied_versions, migrate, statements_for
from exporters.store import StoreError


def test_migrations_are_recorded_and_idempotent(chdb_store):
    assert applied_versions(chdb_store) == {v for v, _, _ in MIGRATIONS}
    assert migrate(chdb_store) == []  # nothing left to do, and running again harms nothing


def test_cluster_option_uses_on_cluster_replicated_and_distributed():
    stmts = [sql for _, sql in statements_for(SchemaSettings(cluster="prod", database="tw", ttl_days=30))]
    creates = [s for s in stmts if s.startswith("CREATE TABLE")]
    assert all(" ON CLUSTER `prod`" in s for s in stmts if not s.startswith("INSERT"))  # DDL; 9 writes a state row
    local = [s for s in creates if "_local`" in s.split("(")[0] and "ENGINE = Distributed" not in s]
    assert local and all("ENGINE = Replicated" in s for s in local)
    dist = [s for s in creates if "ENGINE = Distributed('prod', 'tw'" in s]
    assert {s.split("`")[3] for s in dist} >= {"otel_traces", "llm_calls", "replay_results"}
    mv = next(s for s in stmts if "llm_calls_mv" in s)
    assert "TO `tw`.`llm_calls_local`" in mv and "FROM `tw`.`otel_traces_local`" in mv
    assert all("TTL toDateTime" in s for s in local if "otel_traces_local`" in s.split("(")[0])
    single = [sql for _, sql in statements_for(SchemaSettings())]
    assert not any("ON CLUSTER" in s or "Distributed" in s or "Replicated" in s for s in single)


class ShardStore:
    """A node of a two-shard cluster whose versions table holds none of the rows (they were INSERTed on a node of
    the other shard, the table being Replicated per `{shard}`), for a user without DDL rights (every command
    refused, ACCESS_DENIED). `cluster_refused`: the user may not use table functions either."""

    dsn = "http://gw@ch-shard-2:8123/tw"

    def __init__(self, cluster_refused: bool = False) -> None:
        self.cluster_refused, self.queries, self.commands = cluster_refused, [], []

    def query_rows(self, sql, parameters=None):
        self.queries.append(sql)
        if "system.databases" in sql or "system.tables" in sql:
            return [(1,)], ["count()"]
        if "clusterAllReplicas(" in sql:
            if self.cluster_refused:
                raise StoreError("Code: 497. DB::Exception: gw: Not enough privileges. (ACCESS_DENIED)")
            return [(v,) for v, _, _ in MIGRATIONS], ["version"]
        return [], ["version"]  # this node's shard: empty

    def command(self, sql, parameters=None):
        self.commands.append(sql)
        raise StoreError("Code: 497. DB::Exception: gw: Not enough privileges. (ACCESS_DENIED)")


def test_on_a_cluster_the_applied_versions_are_read_across_every_shard():
    settings = SchemaSettings(cluster="prod", database="tw")
    store = ShardStore()
    assert applied_versions(store, settings) == {v for v, _, _ in MIGRATIONS}
    assert ("SELECT DISTINCT version FROM clusterAllReplicas('prod', 'tw', 'tagway_schema_migrations') "
            "SETTINGS skip_unavailable_shards = 1") in store.queries
    assert migrate(store, settings) == [] and store.commands == []  # no MigrationsPendingError, no DDL tried
    # the current database when none is named; a single node never fans out
    store = ShardStore()
    applied_versions(store, SchemaSettings(cluster="prod"))
    assert any("clusterAllReplicas('prod', currentDatabase(), 'tagway_schema_migrations')" in q for q in store.queries)
    store = ShardStore()
    assert applied_versions(store, SchemaSettings(database="tw")) == set()
    assert not any("cluster" in q.lower() for q in store.queries)
    # a user refused table functions gets this node's answer, as before (and the warning names the grant)
    assert applied_versions(ShardStore(cluster_refused=True), settings) == set()


def test_a_resent_batch_is_stored_once(chdb_store):
    now = time.time_ns()
    trace = uuid.uuid4().hex
    row = {"Timestamp": f"{now // 10**9}.{now % 10**9:09d}", "TraceId": trace, "SpanId": "cd" * 8, "SpanName": "x",
           "SpanKind": "Client", "ServiceName": "tagway", "Duration": 1, "StatusCode": "Unset",
           "SpanAttributes": {"tagway.kind": "call", "tagway.customer": "dedup"}}
    body = orjson.dumps(row)
    for _ in range(2):  # the same spool file sent twice (crash between insert and unlink)
        chdb_store.insert_json_rows("otel_traces", body, {"insert_deduplication_token": f"t-{trace}"})
    for table, col in (("otel_traces", "TraceId"), ("llm_calls", "trace_id")):
        n = chdb_store.query(f"SELECT count() AS n FROM {table} WHERE {col} = {{t:String}}", parameters={"t": trace})
        assert n == [{"n": 1}], table
