"""ClickHouse schema: versioned migrations, the same code for a single node (embedded chDB or a server) and a
cluster (`ON CLUSTER`, Replicated*MergeTree local tables behind Distributed tables).

`otel_traces` and its `_trace_id_ts` helper and MV copy the OpenTelemetry Collector ClickHouse exporter's DDL
(exporter/clickhouseexporter/internal/sqltemplates/traces_table.sql), so a Collector, Grafana's ClickHouse trace
view and tagway can share the table. `llm_calls` is one typed row per LLM call, filled by a materialized view
from the `tagway.kind = 'call'` spans. Migrations are append-only: never edit an applied one, add the next.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from . import semconv as sc
from .rollups import CUSTOMER_MIGRATION, ROLLUPS_MIGRATION, customer_statements, rollup_statements, sync_tag_keys
from .retention import sync_retention
from .store import Store, StoreError, chdb_path, connect, dsn_database, is_embedded, quote_string, without_database

__all__ = ["SchemaSettings", "MIGRATIONS", "migrate", "applied_versions", "statements_for", "migration_script",
           "pending_versions", "may_run_ddl", "may_create_database", "connect_creating_database",
           "MigrationsPendingError", "NO_DDL_CODES", "pending_message", "no_database_message"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchemaSettings:
    database: str = ""  # "" = the client's current database
    cluster: str = ""  # "" = single node; a name = ON CLUSTER + Replicated*MergeTree + Distributed
    ttl_days: int = 0  # 0 = keep forever
    rollup_ttl_days: int = 0  # the rollups' own TTL (exporters.rollups); 0 = keep forever
    rollup_tag_keys: tuple[str, ...] | None = None  # tag keys to roll up (added when missing, never removed here)
    # which of the TTLs above the operator set (in the gateway's config, or its environment): an existing store's
    # tables are brought to those (exporters.retention); none for defaults, whoever migrates with them
    apply_retention: tuple[str, ...] = ()  # "ttl_days", "rollup_ttl_days"

    def on_cluster(self) -> str:
        return f" ON CLUSTER `{self.cluster}`" if self.cluster else ""

    def name(self, table: str) -> str:
        return f"`{self.database}`.`{table}`" if self.database else f"`{table}`"

    def local(self, table: str) -> str:
        """Where rows physically live: the table itself on one node, `<table>_local` on a cluster."""
        return self.name(f"{table}_local" if self.cluster else table)

    def engine(self, table: str, kind: str = "MergeTree", args: str = "") -> str:
        """`args`: the engine's own parameters, e.g. the version column of ReplacingMergeTree."""
        if not self.cluster:
            return f"{kind}({args})"
        db = self.database or "{database}"
        extra = f", {args}" if args else ""
        return f"Replicated{kind}('/clickhouse/tables/{{shard}}/{db}/{table}_local', '{{replica}}'{extra})"

    def ttl(self, column: str) -> str:
        return f"TTL toDateTime({column}) + toIntervalDay({self.ttl_days})" if self.ttl_days > 0 else ""


def _table(s: SchemaSettings, table: str, columns: str, tail: str, kind: str = "MergeTree",
           sharding_key: str = "rand()", engine_args: str = "") -> list[str]:
    """CREATE the (local) table and, on a cluster, the Distributed table in front of it."""
    stmts = [f"CREATE TABLE IF NOT EXISTS {s.local(table)}{s.on_cluster()} (\n{columns}\n) "
             f"ENGINE = {s.engine(table, kind, engine_args)}\n{tail}"]
    if s.cluster:
        db = s.database or "currentDatabase()"
        db_arg = f"'{s.database}'" if s.database else db
        stmts.append(
            f"CREATE TABLE IF NOT EXISTS {s.name(table)}{s.on_cluster()} AS {s.local(table)}\n"
            f"ENGINE = Distributed('{s.cluster}', {db_arg}, '{table}_local', {sharding_key})"
        )
    return stmts


OTEL_TRACES_COLUMNS = """    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1"""


def _m1_otel_traces(s: SchemaSettings) -> list[str]:
    stmts = _table(s, "otel_traces", OTEL_TRACES_COLUMNS,
                   "PARTITION BY toDate(Timestamp)\nORDER BY (ServiceName, SpanName, toDateTime(Timestamp))\n"
                   f"{s.ttl('Timestamp')}\nSETTINGS index_granularity=8192, ttl_only_drop_parts = 1")
    stmts += _table(s, "otel_traces_trace_id_ts", """    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1""",
                    "PARTITION BY toDate(Start)\nORDER BY (TraceId, Start)\n"
                    f"{s.ttl('Start')}\nSETTINGS index_granularity=8192, ttl_only_drop_parts = 1")
    stmts.append(
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local('otel_traces_trace_id_ts_mv')}{s.on_cluster()}\n"
        f"TO {s.local('otel_traces_trace_id_ts')}\n"
        "AS SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End\n"
        f"FROM {s.local('otel_traces')}\nWHERE TraceId != ''\nGROUP BY TraceId"
    )
    return stmts


LLM_CALLS_COLUMNS = """    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    span_id String CODEC(ZSTD(1)),
    service_name LowCardinality(String),
    customer LowCardinality(String),
    intent LowCardinality(String),
    prompt_version LowCardinality(String),
    tags Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    operation LowCardinality(String),
    model_requested LowCardinality(String),
    model_served LowCardinality(String),
    provider LowCardinality(String),
    deployment LowCardinality(String),
    stream Bool,
    status LowCardinality(String),
    error_type LowCardinality(String),
    http_status UInt16,
    attempts UInt8,
    latency_ms Float64,
    ttft_ms Nullable(Float64),
    input_tokens UInt32,
    output_tokens UInt32,
    cost_usd Float64,
    finish_reasons String,
    source LowCardinality(String),
    key_id LowCardinality(String),
    end_user String CODEC(ZSTD(1)),
    client_disconnected Bool,
    request_json String CODEC(ZSTD(3)),
    system_instructions String CODEC(ZSTD(3)),
    request_params String CODEC(ZSTD(3)),
    response_json String CODEC(ZSTD(3)),
    replay_run_id String,
    replay_candidate LowCardinality(String),
    replay_case_id String,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_tag_keys mapKeys(tags) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_run replay_run_id TYPE bloom_filter(0.01) GRANULARITY 1"""


def _a(name: str) -> str:
    return f"SpanAttributes['{name}']"


def _m2_llm_calls(s: SchemaSettings) -> list[str]:
    stmts = _table(s, "llm_calls", LLM_CALLS_COLUMNS,
                   "PARTITION BY toDate(Timestamp)\nORDER BY (customer, intent, Timestamp)\n"
                   f"{s.ttl('Timestamp')}\nSETTINGS index_granularity=8192, ttl_only_drop_parts = 1",
                   sharding_key="cityHash64(trace_id)")
    stmts.append(f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local('llm_calls_mv')}{s.on_cluster()}
TO {s.local('llm_calls')}
AS {_llm_calls_select(s)}""")
    return stmts


def _llm_calls_select(s: SchemaSettings, extra: str = "") -> str:
    """The view's SELECT over the call spans; `extra` adds columns of later migrations (before FROM)."""
    prefix_len = len(sc.TAG_PREFIX)
    return f"""SELECT
    Timestamp,
    TraceId AS trace_id,
    SpanId AS span_id,
    ServiceName AS service_name,
    {_a(sc.CUSTOMER)} AS customer,
    {_a(sc.INTENT)} AS intent,
    {_a(sc.PROMPT_VERSION)} AS prompt_version,
    mapApply((k, v) -> (substring(k, {prefix_len + 1}), v),
             mapFilter((k, v) -> startsWith(k, '{sc.TAG_PREFIX}'), SpanAttributes)) AS tags,
    {_a(sc.OPERATION)} AS operation,
    {_a(sc.REQUESTED_MODEL)} AS model_requested,
    if({_a(sc.RESPONSE_MODEL)} != '', {_a(sc.RESPONSE_MODEL)}, {_a(sc.REQUEST_MODEL)}) AS model_served,
    {_a(sc.PROVIDER)} AS provider,
    {_a(sc.DEPLOYMENT)} AS deployment,
    {_a(sc.REQUEST_STREAM)} = 'true' AS stream,
    multiIf({_a(sc.ERROR_TYPE)} = 'client_disconnected', 'cancelled', StatusCode = 'Error', 'error', 'ok') AS status,
    {_a(sc.ERROR_TYPE)} AS error_type,
    toUInt16OrZero({_a(sc.HTTP_STATUS)}) AS http_status,
    toUInt8OrZero({_a(sc.ATTEMPTS)}) AS attempts,
    Duration / 1e6 AS latency_ms,
    toFloat64OrNull({_a(sc.TIME_TO_FIRST_CHUNK)}) * 1000 AS ttft_ms,
    toUInt32OrZero({_a(sc.INPUT_TOKENS)}) AS input_tokens,
    toUInt32OrZero({_a(sc.OUTPUT_TOKENS)}) AS output_tokens,
    toFloat64OrZero({_a(sc.COST_USD)}) AS cost_usd,
    {_a(sc.FINISH_REASONS)} AS finish_reasons,
    {_a(sc.SOURCE)} AS source,
    {_a(sc.KEY_ID)} AS key_id,
    {_a(sc.END_USER)} AS end_user,
    {_a(sc.CLIENT_DISCONNECTED)} = 'true' AS client_disconnected,
    {_a(sc.INPUT_MESSAGES)} AS request_json,
    {_a(sc.SYSTEM_INSTRUCTIONS)} AS system_instructions,
    {_a(sc.REQUEST_PARAMS)} AS request_params,
    {_a(sc.OUTPUT_MESSAGES)} AS response_json,
    {_a(sc.REPLAY_RUN_ID)} AS replay_run_id,
    {_a(sc.REPLAY_CANDIDATE)} AS replay_candidate,
    {_a(sc.REPLAY_CASE_ID)} AS replay_case_id{extra}
FROM {s.local('otel_traces')}
WHERE {_a(sc.KIND)} = 'call'"""


def _m3_replay(s: SchemaSettings) -> list[str]:
    stmts = _table(s, "replay_runs", """    run_id String,
    created_at DateTime64(3),
    finished_at Nullable(DateTime64(3)),
    status LowCardinality(String),
    spec_json String CODEC(ZSTD(3)),
    dataset_id String,
    judge_version LowCardinality(String),
    candidates Array(String),
    segment_by Array(String),
    n_cases UInt32,
    verdict LowCardinality(String),
    report_json String CODEC(ZSTD(3)),
    cost_usd Float64,
    version UInt64""", "ORDER BY run_id", kind="ReplacingMergeTree", sharding_key="cityHash64(run_id)")
    # ReplacingMergeTree(version) would need the column in the engine args; keep the latest row by `version` at
    # read time (argMax) instead, which also works before merges happen.
    stmts += _table(s, "replay_results", """    run_id String,
    case_id String,
    candidate LowCardinality(String),
    Timestamp DateTime64(9),
    replay_trace_id String,
    customer LowCardinality(String),
    intent LowCardinality(String),
    prompt_version LowCardinality(String),
    model LowCardinality(String),
    segment String,
    tags Map(LowCardinality(String), String),
    dataset_id String,
    judge_version LowCardinality(String),
    status LowCardinality(String),
    passed Nullable(Bool),
    score Nullable(Float64),
    error String,
    evaluations String CODEC(ZSTD(3)),
    output String CODEC(ZSTD(3)),
    latency_ms Float64,
    cost_usd Float64,
    input_tokens UInt32,
    output_tokens UInt32,
    http_status UInt16,
    attempts UInt8""", "ORDER BY (run_id, candidate, case_id)", sharding_key="cityHash64(run_id)")
    # A pinned dataset: the trace ids of a slice (and the segment each was sampled in), immutable once saved.
    stmts += _table(s, "replay_datasets", """    dataset_id String,
    trace_id String,
    segment String,
    position UInt32,
    description String,
    added_at DateTime64(3)""", "ORDER BY (dataset_id, position)", sharding_key="cityHash64(dataset_id)")
    return stmts


def _m4_dedup_window(s: SchemaSettings) -> list[str]:
    # A spool batch re-sent after a crash between insert and unlink carries the same insert_deduplication_token;
    # non-replicated MergeTree only honours it with a deduplication window (Replicated tables always do), and the
    # view's target needs it too.
    if s.cluster:
        return []
    return [f"ALTER TABLE {s.local(t)} MODIFY SETTING non_replicated_deduplication_window = 1000"
            for t in ("otel_traces", "llm_calls")]


def _m6_datasets_feedback(s: SchemaSettings) -> list[str]:
    # Feedback on a call (issue 12): one row per rating, joined to llm_calls on trace_id. `customer` is the rated
    # call's own customer (copied at intake, so per-tenant questions need no join); `key_id` says who rated.
    stmts = _table(s, "llm_feedback", """    Timestamp DateTime64(3) CODEC(Delta, ZSTD(1)),
    feedback_id String,
    trace_id String,
    customer LowCardinality(String),
    score Nullable(Float64),
    thumbs LowCardinality(String),
    complaint Bool,
    comment String CODEC(ZSTD(3)),
    source LowCardinality(String),
    key_id LowCardinality(String),
    by_admin Bool,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1""",
                   "PARTITION BY toDate(Timestamp)\nORDER BY (customer, Timestamp)\n"
                   f"{s.ttl('Timestamp')}", sharding_key="cityHash64(trace_id)")
    # Versioned datasets: a version row is the commit (written last); its cases are a full snapshot keyed by the
    # version's random version_id, so a half-written version or the loser of a concurrent write is never read.
    # `inserted` is the server's clock: of two writers of the same version, the first insert wins.
    stmts += _table(s, "dataset_versions", """    name String,
    version UInt32,
    version_id String,
    inserted DateTime64(6) DEFAULT now64(6),
    created_at DateTime64(3),
    author String,
    message String,
    op LowCardinality(String),
    parent UInt32,
    n_cases UInt32,
    targets_json String""", "ORDER BY (name, version)", sharding_key="cityHash64(name)")
    stmts += _table(s, "dataset_cases", """    name String,
    version UInt32,
    version_id String,
    dataset_id String,
    trace_id String,
    position UInt32,
    segment String,
    customer LowCardinality(String),
    intent LowCardinality(String),
    prompt_version LowCardinality(String),
    model LowCardinality(String),
    source LowCardinality(String),
    columns Map(LowCardinality(String), String),
    tags Map(LowCardinality(String), String),
    captured_at DateTime64(3),
    added_at DateTime64(3),
    added_by String,
    origin LowCardinality(String),
    difficulty LowCardinality(String),
    difficulty_source LowCardinality(String),
    label LowCardinality(String),
    critique String,
    labeller String,
    adjudicated Bool,
    labelled_at Nullable(DateTime64(3)),
    locked Bool,
    expect LowCardinality(String),
    lock_note String""", "ORDER BY (name, version, version_id, position)", sharding_key="cityHash64(name)")
    # A case's content (request, production answer) captured when it joined a dataset, so versions outlive the TTL
    # of llm_calls; a trace's content never changes, so one row per trace serves every version.
    stmts += _table(s, "dataset_content", """    trace_id String,
    content String CODEC(ZSTD(3)),
    added_at DateTime64(3)""", "ORDER BY trace_id", kind="ReplacingMergeTree",
                    sharding_key="cityHash64(trace_id)")
    return stmts


def _m7_session_id(s: SchemaSettings) -> list[str]:
    # The session a call belongs to (`x-tagway-session-id` or metadata.session_id, stamped as gen_ai.conversation.id):
    # a column, an index for fetching a session's calls, and the view's query replaced in place (MODIFY QUERY is one
    # statement, so no call is missed while it changes).
    tables = [s.local("llm_calls")] + ([s.name("llm_calls")] if s.cluster else [])
    stmts = [f"ALTER TABLE {t}{s.on_cluster()} ADD COLUMN IF NOT EXISTS session_id String CODEC(ZSTD(1))"
             for t in tables]
    stmts.append(f"ALTER TABLE {s.local('llm_calls')}{s.on_cluster()} ADD INDEX IF NOT EXISTS idx_session session_id "
                 "TYPE bloom_filter(0.01) GRANULARITY 1")
    stmts.append(f"ALTER TABLE {s.local('llm_calls_mv')}{s.on_cluster()} MODIFY QUERY "
                 f"{_llm_calls_select(s, f',{chr(10)}    {_a(sc.CONVERSATION_ID)} AS session_id')}")
    return stmts


def _m8_evals_and_tags(s: SchemaSettings) -> list[str]:
    # Tag state (exporters/tagstate.py): the audit log, the current state filled from it by a view, the locks.
    stmts = _table(s, "tag_events", """    event_time DateTime64(6),
    version UInt64,
    target_kind LowCardinality(String),
    target_id String,
    customer LowCardinality(String),
    tag LowCardinality(String),
    action LowCardinality(String),
    actor String,
    run_id String,
    mode LowCardinality(String),
    evaluator LowCardinality(String),
    evaluator_version UInt32,
    rule String,
    field String,
    field_value String,
    INDEX idx_run run_id TYPE bloom_filter(0.01) GRANULARITY 1""", "ORDER BY (target_kind, target_id, version)",
                   sharding_key="cityHash64(target_id)")
    stmts += _table(s, "tag_state", """    target_kind LowCardinality(String),
    target_id String,
    tag LowCardinality(String),
    customer LowCardinality(String),
    present UInt8,
    version UInt64,
    actor String,
    run_id String,
    updated_at DateTime64(6)""", "ORDER BY (target_kind, target_id, tag)", kind="ReplacingMergeTree",
                    sharding_key="cityHash64(target_id)", engine_args="version")
    stmts.append(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local('tag_state_mv')}{s.on_cluster()}\n"
                 f"TO {s.local('tag_state')}\nAS SELECT target_kind, target_id, tag, customer, "
                 "toUInt8(action = 'apply') AS present, version, actor, run_id, event_time AS updated_at\n"
                 f"FROM {s.local('tag_events')}")
    stmts += _table(s, "tag_locks", """    lock_key String,
    token String,
    run_id String,
    holder String,
    acquired_at DateTime64(6) DEFAULT now64(6),
    lease_seconds UInt32,
    released UInt8""", "ORDER BY (lock_key, acquired_at)\nTTL toDateTime(acquired_at) + toIntervalDay(7)",
                    sharding_key="cityHash64(lock_key)")
    # Evaluation runs (exporters/evals.py): versioned evaluator definitions, runs, per-row results.
    stmts += _table(s, "eval_evaluators", """    name String,
    version UInt32,
    content_hash String,
    definition_json String CODEC(ZSTD(3)),
    created_at DateTime64(3)""", "ORDER BY (name, version)", sharding_key="cityHash64(name)")
    stmts += _table(s, "eval_runs", """    run_id String,
    created_at DateTime64(3),
    finished_at Nullable(DateTime64(3)),
    status LowCardinality(String),
    mode LowCardinality(String),
    dataset String,
    dataset_version String,
    evaluators Array(String),
    summary_json String CODEC(ZSTD(3)),
    version UInt64""", "ORDER BY run_id", sharding_key="cityHash64(run_id)")
    stmts += _table(s, "eval_results", """    run_id String,
    Timestamp DateTime64(6),
    mode LowCardinality(String),
    dataset String,
    evaluator LowCardinality(String),
    evaluator_version UInt32,
    target_kind LowCardinality(String),
    target_id String,
    customer LowCardinality(String),
    dataset_rows Array(String),
    trace_ids Array(String),
    status LowCardinality(String),
    error String,
    passed Nullable(Bool),
    score Nullable(Float64),
    reason String,
    fields String CODEC(ZSTD(3)),
    matched_tags Array(String)""", "ORDER BY (run_id, evaluator, target_id)", sharding_key="cityHash64(run_id)")
    return stmts


def _m9_autopopulate(s: SchemaSettings) -> list[str]:
    # Auto-population (exporters/autopopulate.py): a dataset's declaration (newest row per name wins; `enabled` 0
    # switches it off) and the log of its populations, whose newest row is the watermark the next one starts from.
    stmts = _table(s, "dataset_autopopulate", """    name String,
    version UInt64,
    declared_at DateTime64(3),
    author String,
    enabled UInt8,
    declaration_json String""", "ORDER BY (name, version)", sharding_key="cityHash64(name)")
    stmts += _table(s, "dataset_populations", """    name String,
    populated_at DateTime64(6),
    version UInt64,
    window_from DateTime64(3),
    watermark DateTime64(3),
    matched UInt32,
    sampled UInt32,
    added UInt32,
    dataset_version String,
    notes Array(String)""", "ORDER BY (name, version)", sharding_key="cityHash64(name)")
    return stmts


def _m12_resource_owners(s: SchemaSettings) -> list[str]:
    # Whose a provider resource is (gateway/resources.py): the customer of the call whose answer created it, read by
    # id (the primary key: a lookup of thousands of ids reads a few granules, where the span attributes' bloom filter
    # let most through). Kept past the calls' retention: a file lives as long as its owner keeps it.
    stmts = _table(s, "resource_owners", """    rid String,
    customer String,
    created DateTime64(3)""", "ORDER BY rid\nTTL toDateTime(created) + toIntervalDay(400)",
                   kind="ReplacingMergeTree", sharding_key="cityHash64(rid)")
    stmts.append(f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local('resource_owners_mv')}{s.on_cluster()}
TO {s.local('resource_owners')}
AS SELECT {_a(sc.RESPONSE_ID)} AS rid, {_a(sc.CUSTOMER)} AS customer, Timestamp AS created
FROM {s.local('otel_traces')}
WHERE {_a(sc.KIND)} = 'call' AND {_a(sc.CREATES_RESOURCE)} = 'true' AND {_a(sc.RESPONSE_ID)} != ''""")
    return stmts


def _m10_rollups(s: SchemaSettings) -> list[str]:
    return rollup_statements(s, _table)


def _m11_customer_rollups(s: SchemaSettings) -> list[str]:
    return customer_statements(s, _table)


def _m13_replay_run_key(s: SchemaSettings) -> list[str]:
    # The key that started a replay run (as the gateway names it): a resume with another key is refused, and only
    # the calls made with it are the run's recorded answers (replay/pipeline.py)
    tables = [s.local("replay_runs")] + ([s.name("replay_runs")] if s.cluster else [])
    return [f"ALTER TABLE {t}{s.on_cluster()} ADD COLUMN IF NOT EXISTS key_id String" for t in tables]


def _m14_owned_by_answer(s: SchemaSettings) -> list[str]:
    # Ids a call's answer made known as its customer's beside the one it created (a batch's output and error files,
    # named in the batch objects relayed to the batch's owner: gateway/passthrough.py), into the same table
    ids = f"arrayFilter(x -> x != '', JSONExtract({_a(sc.OWNS_RESOURCES)}, 'Array(String)'))"
    return [f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local('resource_owners_known_mv')}{s.on_cluster()}
TO {s.local('resource_owners')}
AS SELECT arrayJoin({ids}) AS rid, {_a(sc.CUSTOMER)} AS customer, Timestamp AS created
FROM {s.local('otel_traces')}
WHERE {_a(sc.KIND)} = 'call' AND {_a(sc.OWNS_RESOURCES)} != ''"""]


def _m15_backfill_owners(s: SchemaSettings) -> list[str]:
    # Tenant keys are refused ids nobody owns (gateway/resources.py): the resources made through the gateway before
    # its calls said whose they were (tagway.creates_resource) are read from the record once, so they stay their
    # creator's. The creating calls by their API: an upload, a batch, a response unless its captured parameters say
    # `store: false`, a chat completion whose captured parameters say `store: true` or that were not captured (a
    # tenant with capture_content false: whether the provider kept it is unknown, and owning an id the provider never
    # kept harms no one; every chat call of the others would only fill the table). Within resource_owners' own 400
    # days; rows already there are harmless twins (the first creator is read).
    params = _a(sc.REQUEST_PARAMS)
    return [f"""INSERT INTO {s.name('resource_owners')} (rid, customer, created)
SELECT {_a(sc.RESPONSE_ID)}, {_a(sc.CUSTOMER)}, Timestamp
FROM {s.name('otel_traces')}
WHERE {_a(sc.KIND)} = 'call' AND {_a(sc.RESPONSE_ID)} != '' AND Timestamp > now() - toIntervalDay(400)
  AND ({_a(sc.CREATES_RESOURCE)} = 'true' OR {_a(sc.API)} IN ('files.create', 'batches.create')
       OR ({_a(sc.API)} = 'responses' AND JSONExtractRaw({params}, 'store') != 'false')
       OR ({_a(sc.API)} = 'chat.completions' AND ({params} = '' OR JSONExtractRaw({params}, 'store') = 'true')))"""]


Migration = tuple[int, str, Callable[[SchemaSettings], list[str]]]

MIGRATIONS: list[Migration] = [
    (1, "otel_traces (OpenTelemetry Collector layout) and trace-id helper", _m1_otel_traces),
    (2, "llm_calls and its materialized view", _m2_llm_calls),
    (3, "replay_runs, replay_results and replay_datasets", _m3_replay),
    (4, "deduplication window for re-sent spool batches", _m4_dedup_window),
    (6, "llm_feedback, dataset_versions, dataset_cases and dataset_content", _m6_datasets_feedback),
    (7, "llm_calls.session_id", _m7_session_id),
    (8, "evaluators, evaluation runs and results; tag events, state and locks", _m8_evals_and_tags),
    (9, "dataset_autopopulate and dataset_populations", _m9_autopopulate),
    (ROLLUPS_MIGRATION, "rollups of llm_calls (minute/hour/day, and by tag) with their views and coverage state",
     _m10_rollups),
    (CUSTOMER_MIGRATION, "per-customer rollups (hour/day), fed from the minute rollup", _m11_customer_rollups),
    (12, "resource_owners: whose each file, batch and stored response is", _m12_resource_owners),
    (13, "replay_runs.key_id: the key that started a run", _m13_replay_run_key),
    (14, "resource_owners from the ids an answer makes its customer's (a batch's output and error files)",
     _m14_owned_by_answer),
    (15, "resource_owners backfilled from the creating calls recorded before owners were", _m15_backfill_owners),
]


def _reload_views(store: Store, s: SchemaSettings) -> None:
    """Detach and re-attach every materialized view created or changed in this process. chDB (26.9) derives a
    view's insert-deduplication ids from the view's identity as held in memory, and that differs between the
    process that created the view and one that loaded it from disk: a spool batch re-sent after a restart was then
    dropped by otel_traces (its token) but stored again by every view below it (llm_calls and the rollups counted
    it twice). Reloaded, the views carry the identity every later process will see. Only for the embedded store:
    it has no other writer, and nothing is inserted while migrate runs."""
    db = "{db:String}" if s.database else "currentDatabase()"
    rows, _ = store.query_rows(f"SELECT name FROM system.tables WHERE database = {db} AND engine = 'MaterializedView'"
                               " ORDER BY name", parameters={"db": s.database} if s.database else None)
    for (name,) in rows:
        table = s.name(name)
        store.command(f"DETACH TABLE {table}")
        store.command(f"ATTACH TABLE {table}")


def statements_for(settings: SchemaSettings, upto: int | None = None) -> list[tuple[int, str]]:
    """Every statement of every migration (version, sql), for review or `tagway db migrate --print`."""
    return [(v, sql) for v, _, fn in MIGRATIONS if upto is None or v <= upto for sql in fn(settings)]


def migration_script(settings: SchemaSettings, versions: Iterable[int] | None = None) -> list[str]:
    """What `migrate` runs for `versions` (default: every migration), as statements a DBA can run by hand
    (`tagway db migrate --print`): the database and the versions table, each migration's statements, and the row
    that marks it applied. Without those rows a store migrated by hand would look unmigrated, and a gateway whose
    user may not run DDL would wait on it for ever."""
    wanted = None if versions is None else set(versions)
    out = [f"CREATE DATABASE IF NOT EXISTS `{settings.database}`{settings.on_cluster()}"] if settings.database else []
    todo = [(v, name, fn) for v, name, fn in MIGRATIONS if wanted is None or v in wanted]
    if todo:
        out.append(_versions_table_sql(settings))
    for version, name, fn in todo:
        out += fn(settings)
        out.append(f"INSERT INTO {_versions_table(settings)} (version, name) VALUES ({version}, {quote_string(name)})")
    return out


def _versions_table(s: SchemaSettings) -> str:
    return s.name("tagway_schema_migrations")


# ClickHouse's refusals of a statement to this user (ACCESS_DENIED, READONLY), checked before IF NOT EXISTS
NO_DDL_CODES = frozenset({497, 164})


class MigrationsPendingError(StoreError):
    """Migrations are pending and this ClickHouse user may not run DDL: the store takes no spans until a privileged
    user migrates it (a deployment's migrations Job may be about to), so the gateway spools and asks again."""


def _exists(store: Store, s: SchemaSettings, table: str) -> bool:
    db = "{db:String}" if s.database else "currentDatabase()"
    rows, _ = store.query_rows(f"SELECT count() FROM system.tables WHERE database = {db} AND name = {{t:String}}",
                               parameters={"t": table, **({"db": s.database} if s.database else {})})
    return bool(rows and rows[0][0])


def applied_versions(store: Store, settings: SchemaSettings = SchemaSettings()) -> set[int]:
    """The migrations the store has applied. Reads only (system.tables, then the versions table), so a user without
    DDL rights can ask: ClickHouse checks the CREATE grant before `IF NOT EXISTS`, and refuses even a no-op."""
    if settings.database and not _database_exists(store, settings.database):
        return set()
    if not _exists(store, settings, "tagway_schema_migrations"):
        return set()
    rows, _ = store.query_rows(f"SELECT DISTINCT version FROM {_versions_table(settings)}")
    done = {int(r[0]) for r in rows}
    if settings.cluster and any(v not in done for v, _, _ in MIGRATIONS):
        done |= _applied_on_cluster(store, settings)
    return done


def _cluster_versions_sql(s: SchemaSettings) -> str:
    """The versions any node of the cluster holds. The versions table is Replicated with `{shard}` in its path and
    its rows are INSERTed on one node, so only that node's shard holds them: read alone, the other shards' nodes saw
    no migration applied (and a gateway there without DDL rights waited for ever). Read across the cluster rather
    than moving the table to a shard-independent path: that would need DDL on existing clusters (the very thing such
    a gateway may not run) and a second table. A version held anywhere counts, every migration running ON CLUSTER;
    a node that does not answer is skipped (one that holds them answers, or the store is pending for a while)."""
    db = quote_string(s.database) if s.database else "currentDatabase()"
    return (f"SELECT DISTINCT version FROM clusterAllReplicas({quote_string(s.cluster)}, {db}, "
            "'tagway_schema_migrations') SETTINGS skip_unavailable_shards = 1")


def _applied_on_cluster(store: Store, s: SchemaSettings) -> set[int]:
    """Asked only when this node's shard lacks some version (a store migrated in full answers locally, no fan-out).
    A user refused table functions (they need CREATE TEMPORARY TABLE / REMOTE on some servers) gets this node's
    answer, as before, with the grant named."""
    try:
        rows, _ = store.query_rows(_cluster_versions_sql(s))
    except StoreError as e:
        if e.code not in NO_DDL_CODES:
            raise
        log.warning("cannot read the applied migrations across cluster %s (%s): only this node's shard is read; "
                    "GRANT CREATE TEMPORARY TABLE, REMOTE ON *.* to this ClickHouse user", s.cluster, e)
        return set()
    return {int(r[0]) for r in rows}


def pending_versions(store: Store, settings: SchemaSettings = SchemaSettings()) -> list[int]:
    done = applied_versions(store, settings)
    return [v for v, _, _ in MIGRATIONS if v not in done]


def may_run_ddl(store: Store, settings: SchemaSettings = SchemaSettings()) -> bool:
    """Whether this user may create tagway's tables, asked without creating anything: a CREATE of the versions table
    with an engine no server has. ClickHouse checks the grant first (InterpreterCreateQuery::execute) and refuses
    with ACCESS_DENIED or READONLY; a user who may gets the unknown engine instead (or nothing, the table being
    there), and no table is made."""
    return _may(store, f"CREATE TABLE IF NOT EXISTS {_versions_table(settings)} (version UInt32) "
                       "ENGINE = TagwayGrantProbeNoSuchEngine")


def may_create_database(store: Store, database: str) -> bool:
    """Whether this user may create `database`, asked as may_run_ddl asks (an engine no server has: nothing is
    made)."""
    return _may(store, f"CREATE DATABASE IF NOT EXISTS `{database}` ENGINE = TagwayGrantProbeNoSuchEngine")


def _may(store: Store, probe: str) -> bool:
    """Whether the grant a `probe` statement (one that can make nothing) needs is this user's."""
    try:
        store.command(probe)
    except StoreError as e:
        return e.code not in NO_DDL_CODES
    return True


def _database_exists(store: Store, database: str) -> bool:
    rows, _ = store.query_rows("SELECT count() FROM system.databases WHERE name = {db:String}",
                               parameters={"db": database})
    return bool(rows and rows[0][0])


def pending_message(n: int) -> str:
    return (f"{n} migration{'s' if n != 1 else ''} pending; this user may not run DDL: run `tagway db migrate` with a "
            "privileged user / the chart's migrations Job")


def _versions_table_sql(s: SchemaSettings) -> str:
    return (f"CREATE TABLE IF NOT EXISTS {_versions_table(s)}{s.on_cluster()} "
            "(version UInt32, name String, applied_at DateTime DEFAULT now()) "
            f"ENGINE = {s.engine('tagway_schema_migrations')} ORDER BY version")


def _create_versions_table(store: Store, s: SchemaSettings) -> None:
    store.command(_versions_table_sql(s))


def connect_creating_database(dsn: str, settings: SchemaSettings, open_store: Callable[[str], Any] = connect) -> Any:
    """`open_store(dsn)`, and when the server says the DSN's database does not exist (the driver asks for it as it
    connects), create it first through the user's default database, as migrating needs. For the migrations only
    (`tagway db migrate`, the gateway's own at start): a command that reads must not make a database. A user who may
    not create it gets one line naming the database and the grant."""
    try:
        return open_store(dsn)
    except StoreError as e:
        database = dsn_database(dsn)
        if e.code != 81 or not database:  # 81: UNKNOWN_DATABASE
            raise
    bare = connect(without_database(dsn))
    try:
        _create_database(bare, database, settings)
    finally:
        bare.close()
    return open_store(dsn)


def no_database_message(database: str, dsn: str) -> str:
    user = urlsplit(dsn).username or "default"
    return (f"database `{database}` does not exist and ClickHouse user {user} may not create it: create it with a "
            f"privileged user, or GRANT CREATE DATABASE ON `{database}`.* TO {user}")


def _create_database(store: Store, database: str, s: SchemaSettings) -> None:
    try:
        store.command(f"CREATE DATABASE IF NOT EXISTS `{database}`{s.on_cluster()}")
    except StoreError as e:
        if e.code not in NO_DDL_CODES:
            raise
        raise StoreError(no_database_message(database, store.dsn)) from None
    log.info("created the ClickHouse database `%s` (it did not exist)", database)


def migrate(store: Store, settings: SchemaSettings = SchemaSettings(), upto: int | None = None) -> list[int]:
    """Apply the migrations not yet applied, in order. Returns the versions applied now. Every statement is
    `IF NOT EXISTS`, so two gateways migrating at the same time at start-up do no harm. A store with nothing to
    apply gets no DDL at all (its user may have none: `helm/README.md`, migrations.enabled); one with migrations
    pending and a user who may not run DDL raises MigrationsPendingError."""
    if settings.database and not _database_exists(store, settings.database):
        _create_database(store, settings.database, settings)
    done = applied_versions(store, settings)
    todo = [(v, name, fn) for v, name, fn in MIGRATIONS if v not in done and (upto is None or v <= upto)]
    applied: list[int] = []
    try:
        if todo:
            _create_versions_table(store, settings)
        for version, name, fn in todo:
            for sql in fn(settings):
                store.command(sql)
            store.command(f"INSERT INTO {_versions_table(settings)} (version, name) VALUES ({version}, "
                          "{name:String})", parameters={"name": name})
            applied.append(version)
    except StoreError as e:
        if e.code not in NO_DDL_CODES:
            raise
        raise MigrationsPendingError(f"{pending_message(len(todo) - len(applied))} ({e})") from e
    if applied and is_embedded(store.dsn) and chdb_path(store.dsn) != ":memory:":
        _reload_views(store, settings)
    if settings.rollup_tag_keys is not None and ROLLUPS_MIGRATION in done | set(applied):
        sync_tag_keys(store, settings, settings.rollup_tag_keys)
    if settings.apply_retention:
        try:
            sync_retention(store, settings)
        except StoreError as e:  # e.g. a user without ALTER rights: the schema is fine, the TTLs stay as they are
            log.error("retention could not be applied (%s): the tables keep their TTLs; apply it with a user that "
                      "may ALTER them (`tagway db migrate`)", e)
    return applied
