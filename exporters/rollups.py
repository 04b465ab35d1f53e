"""Rollups of `llm_calls` (issue 18): per-bucket aggregates that answer per-tenant questions without reading every
call, with the same counts as the raw table.

Two families of AggregatingMergeTree tables:
- `llm_calls_1m|1h|1d` (minute, hour, day): bucket x customer x intent x prompt_version x model_requested x
  provider x status x error_type x source -> calls, token sums, cost (Decimal128(12), so sums are exact and
  order-free), and bfloat16 histogram states of latency (p50/p95/p99) and TTFT (p50): every estimate is the exact
  value of its rank, less at most QUANTILE_ACCURACY (2^-7, 0.78%) of it.
- `llm_calls_tags_1h|1d` (hour, day): bucket x tag_key x tag_value x customer x status x source -> calls, tokens, cost and
  the same sketches; one row per call and rolled-up key (value '' when the call has no such tag), so `tag.k != v`
  and grouping by a tag are exact too. Only the keys in `llm_rollup_tag_keys` are rolled up: by default the
  taxonomy keys that list their values (a bounded vocabulary), or `storage.rollup_tag_keys`.

Insert cost: ONE view per family reads `llm_calls` (into its finest level); the coarser levels are filled by views on
the finest tables. A live batch spans a second or two, so its blocks hardly shrink on the way up and each view costs
about the same, ~4-8 µs of CPU per call (bench/rollup_insert_bench.py: all five add ~28-33 µs per call to ~40-50,
in the exporter's thread, off the request path). Fewer levels would cost less to insert and more to read: hours
alone were measured at 0.67 s for 7 days at 10M calls (days and hour edges: 0.2 s).

Coverage (`llm_rollup_state`): the views roll up calls with Timestamp >= `live_from`, fixed when the migration ran
(the epoch on an empty store, a few seconds ahead of the clock otherwise); `tagway db backfill-rollups` fills
[oldest call, live_from) one UTC day at a time, newest first, moving `covered_from` down after each day. A day cut
short is marked `pending_from` and is deleted and redone on resume. Queries read a rollup only for [covered_from,
now) (and for a tag key, from its own `covered_from`). The buckets that straddle `live_from` hold the backfilled
calls before it and the views' calls after it. Calls older than live_from that arrive (spool re-sends) after their
day was backfilled are not in the rollup: `tagway db backfill-rollups --redo` rolls the whole days before
live_from's day up again (that day's straddling buckets cannot be redone without counting its calls twice).

The per-customer family (migration 11) is fed from the main minutes; before its own start (`customer_from`, see
customer_statements) the main family answers for it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Callable, Iterable, Sequence

ROLLUPS_MIGRATION = 10  # the schema migration that creates the rollups (exporters/schema.py)
CUSTOMER_MIGRATION = 11  # the one that adds the per-customer family

__all__ = [
    "LEVELS", "QUANTILE_ACCURACY", "MAIN", "TAGS", "CUSTOMER", "MAIN_KEYS", "TAG_OTHER_KEYS", "CUSTOMER_KEYS",
    "Family", "RollupState", "rollup_statements", "customer_statements", "CUSTOMER_MIGRATION", "read_state",
    "sync_tag_keys", "remove_tag_keys", "backfill", "BackfillStep", "RollupError", "rollup_tables", "set_ttl",
]

LEVELS = (("1m", 60), ("1h", 3600), ("1d", 86400))  # table suffix, bucket seconds; finest first
# Latency/TTFT quantiles: bfloat16 histograms. Each value is cut to 8 significant bits (monotonic, so ranks are
# kept) and the quantile of the cut values is exact: an estimate is the exact value of its rank less at most
# 2^-7 (0.78%) of it. Measured here against DDSketch (1%), t-digest and reservoir states on 250k states of 4
# values: building 0.40 s (DDSketch 1.13), merging 0.032 s (DDSketch 0.201), 4.1 MB (DDSketch 4.7).
QUANTILE_ACCURACY = 2 ** -7
LAT_Q = "quantilesBFloat16(0.5, 0.95, 0.99)"
TTFT_Q = "quantileBFloat16(0.5)"
COST = "toDecimal128(cost_usd, 12)"  # exact, order-independent sums (Float64 sums depend on the order)
STATE_TABLE = "llm_rollup_state"
CUSTOMER_STATE = "customer"  # its row in STATE_TABLE: covered_from = from when the family is complete
SPLIT_STATE = "split"  # its row, when present: the buckets straddling live_from over-count, never read them
# (Rows other than 'calls' keep live_from at the epoch: the main view of a store migrated before they existed reads
# max(live_from) over every row.)
KEYS_TABLE = "llm_rollup_tag_keys"
# Group-by / filter names (exporters.vocabulary.COLUMNS keys) each family holds.
MAIN_KEYS = frozenset({"customer", "intent", "prompt_version", "model", "provider", "status", "error_type", "source"})
TAG_OTHER_KEYS = frozenset({"customer", "status", "source"})  # besides the one tag.<key>
CUSTOMER_KEYS = frozenset({"customer", "status", "source"})


class RollupError(RuntimeError):
    """The rollups cannot do what was asked (one line for the CLI)."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # base table name; levels add _1m, _1h, _1d
    dims: tuple[str, ...]  # llm_calls columns (tag_key/tag_value for the tag family)
    dim_types: tuple[str, ...]
    levels: tuple[tuple[str, int], ...] = LEVELS  # finest first; the view from llm_calls fills the finest
    finer: "Family | None" = None  # a family whose finer levels this one reads (and is fed from)

    def table(self, suffix: str) -> str:
        return f"{self.name}_{suffix}"

    def read_levels(self) -> list[tuple[str, int]]:
        """(table, bucket seconds) of every level a query may read for this family, finest first."""
        own = [(self.table(sfx), sec) for sfx, sec in self.levels]
        if self.finer is None:
            return own
        return [(self.finer.table(sfx), sec) for sfx, sec in self.finer.levels if sec < self.levels[0][1]] + own

    @property
    def finest(self) -> str:
        return self.table(self.levels[0][0])


MAIN = Family("llm_calls", ("customer", "intent", "prompt_version", "model_requested", "provider", "status",
                            "error_type", "source"), ("LowCardinality(String)",) * 8)
# Hours and days only: a row per call and key makes a minute level about as big as llm_calls itself, and the
# minutes at the ends of a window are read raw instead (by tag, a time series finer than an hour reads raw).
TAGS = Family("llm_calls_tags", ("tag_key", "tag_value", "customer", "status", "source"),
              ("LowCardinality(String)", "String", "LowCardinality(String)", "LowCardinality(String)",
               "LowCardinality(String)"), LEVELS[1:])
# The per-customer family: "which tenant is failing" is the question asked most, and the main family answers it by
# merging a latency state per bucket x intent x prompt version x model x status: ~4,000 an hour at 15M calls a day,
# and a bigger state each as traffic grows (0.19 s of the hour edges' 0.20 s at 100M calls were the merges). Three
# columns cut the states 10-30x. Fed from the main minute table (not from llm_calls: no second read of each call),
# so its hours and days are the main minutes regrouped, and the minute edges of a window read the main minutes.
CUSTOMER = Family("llm_calls_customer", ("customer", "status", "source"), ("LowCardinality(String)",) * 3,
                  LEVELS[1:], finer=MAIN)
FAMILIES = (MAIN, TAGS, CUSTOMER)

_MEASURES = f"""    calls SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Decimal128(12)),
    latency_state AggregateFunction({LAT_Q}, Float64),
    ttft_state AggregateFunction({TTFT_Q}, Nullable(Float64))"""


MEASURES = ("calls", "input_tokens", "output_tokens", "cost_usd", "latency_state", "ttft_state")  # rollup columns
RAW_MEASURES = ("count()", "sum(input_tokens)", "sum(output_tokens)", f"sum({COST})",
                f"{LAT_Q.replace('(', 'State(', 1)}(latency_ms)", f"{TTFT_Q.replace('(', 'State(', 1)}(ttft_ms)")


def raw_measures(aliases: Sequence[str] = MEASURES) -> str:
    """The measures over llm_calls rows, as the rollup columns hold them (also the raw edges of a split query)."""
    return ", ".join(f"{e} AS {a}" for e, a in zip(RAW_MEASURES, aliases))


def _merged_measures() -> str:
    return ("sum(calls) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
            f"sum(cost_usd) AS cost_usd, {LAT_Q.replace('(', 'MergeState(', 1)}(latency_state) AS latency_state, "
            f"{TTFT_Q.replace('(', 'MergeState(', 1)}(ttft_state) AS ttft_state")


_BUCKET = {60: "toStartOfMinute", 3600: "toStartOfHour", 86400: "toStartOfDay"}


def finest_select(s: Any, family: Family, where: str, keys_expr: str | None = None, src: str = "") -> str:
    """The finest rollup of the llm_calls rows matching `where` (the view's query over the local table, and the
    backfill's over `src`). `keys_expr`: the array of tag keys to roll up (tag family only)."""
    bucket = f"{_BUCKET[family.levels[0][1]]}(toDateTime(Timestamp, 'UTC'), 'UTC') AS bucket"
    src = src or s.local("llm_calls")
    if family is TAGS:
        return (f"SELECT {bucket}, tag_key, tags[tag_key] AS tag_value, customer, status, source, {raw_measures()}\n"
                f"FROM {src}\nARRAY JOIN {keys_expr} AS tag_key\nWHERE {where}\n"
                f"GROUP BY bucket, {', '.join(family.dims)}")
    return (f"SELECT {bucket}, {', '.join(family.dims)}, {raw_measures()}\nFROM {src}\nWHERE {where}\n"
            f"GROUP BY bucket, {', '.join(family.dims)}")


def _live_from(s: Any) -> str:
    return f"(SELECT max(live_from) FROM {s.name(STATE_TABLE)} WHERE name = 'calls')"


def _view_keys(s: Any) -> str:
    return (f"(SELECT groupArrayIf(key, NOT removed) FROM (SELECT key, argMax(removed, version) AS removed "
            f"FROM {s.name(KEYS_TABLE)} GROUP BY key))")


def _everywhere(s: Any, table: str, columns: str, order: str) -> str:
    """A small state table every node holds whole (on a cluster one replication path for all shards), so the views
    read it locally on each insert."""
    if s.cluster:
        db = s.database or "{database}"
        engine = f"ReplicatedReplacingMergeTree('/clickhouse/tables/all/{db}/{table}', '{{replica}}', version)"
    else:
        engine = "ReplacingMergeTree(version)"
    return (f"CREATE TABLE IF NOT EXISTS {s.name(table)}{s.on_cluster()} (\n{columns}\n) ENGINE = {engine}\n"
            f"ORDER BY {order}")


def rollup_statements(s: Any, table_fn: Callable[..., list[str]]) -> list[str]:
    """Migration ROLLUPS_MIGRATION: the state tables, the six rollup tables and their views. `table_fn` is
    schema._table (the local table plus, on a cluster, the Distributed one). The state row is written before the views exist, so a
    call is rolled up either by a view (Timestamp >= live_from) or by the backfill (older), never both."""
    stmts = [_everywhere(s, STATE_TABLE, """    name String,
    live_from DateTime64(3),
    covered_from DateTime64(3),
    pending_from DateTime64(3),
    ttl_days UInt32,
    version UInt64""", "name"), _everywhere(s, KEYS_TABLE, """    key String,
    covered_from DateTime64(3),
    removed UInt8,
    version UInt64""", "key")]
    # An empty store has nothing to backfill: the views cover everything. Otherwise they start 5 s from now.
    stmts.append(f"INSERT INTO {s.name(STATE_TABLE)} (name, live_from, covered_from, pending_from, ttl_days, version)"
                 f"\nSELECT 'calls', lf, lf, lf, {int(s.rollup_ttl_days)}, toUnixTimestamp64Micro(now64(6)) FROM "
                 f"(SELECT if((SELECT count() FROM {s.name('llm_calls')}) = 0, toDateTime64(0, 3), "
                 f"toDateTime64(now64(3) + toIntervalSecond(5), 3)) AS lf)\n"
                 f"WHERE (SELECT count() FROM {s.name(STATE_TABLE)} WHERE name = 'calls') = 0")  # keeps the first
    for family in (MAIN, TAGS):
        keys = _view_keys(s) if family is TAGS else None
        stmts += _family_statements(s, table_fn, family,
                                    finest_select(s, family, f'Timestamp >= {_live_from(s)}', keys))
    return stmts


def _family_statements(s: Any, table_fn: Callable[..., list[str]], family: Family, finest_view: str) -> list[str]:
    """A family's level tables, the view that fills its finest level (`finest_view`, a SELECT) and the views that
    fill each coarser level from the one below."""
    stmts: list[str] = []
    ttl = (f"TTL bucket + toIntervalDay({int(s.rollup_ttl_days)})" if s.rollup_ttl_days > 0 else "")
    cols = ",\n".join(f"    {d} {t}" for d, t in zip(family.dims, family.dim_types))
    for suffix, seconds in family.levels:
        part = "toDate(bucket)" if seconds == 60 else "toYYYYMM(bucket)"
        settings = "" if s.cluster else "\nSETTINGS non_replicated_deduplication_window = 1000"
        stmts += table_fn(s, family.table(suffix),
                          f"    bucket DateTime('UTC') CODEC(Delta, ZSTD(1)),\n{cols},\n{_MEASURES}",
                          f"PARTITION BY {part}\nORDER BY (bucket, {', '.join(family.dims)})\n{ttl}{settings}",
                          kind="AggregatingMergeTree", sharding_key="rand()")
    stmts.append(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local(family.finest + '_mv')}{s.on_cluster()}\n"
                 f"TO {s.local(family.finest)}\nAS {finest_view}")
    for (fine, _), (coarse, seconds) in zip(family.levels, family.levels[1:]):
        stmts.append(
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {s.local(family.table(coarse) + '_mv')}{s.on_cluster()}\n"
            f"TO {s.local(family.table(coarse))}\nAS {_regroup(s, family, s.local(family.table(fine)), seconds)}")
    return stmts


def _regroup(s: Any, family: Family, src: str, seconds: int) -> str:
    """Rows of a finer rollup table `src` (of this family or the one it reads) as rows of `family`'s level."""
    return (f"SELECT {_BUCKET[seconds]}(bucket, 'UTC') AS bucket, {', '.join(family.dims)}, {_merged_measures()}\n"
            f"FROM {src}\nGROUP BY bucket, {', '.join(family.dims)}")


def customer_statements(s: Any, table_fn: Callable[..., list[str]]) -> list[str]:
    """Migration CUSTOMER_MIGRATION: the per-customer family, its state row and views. Its hours are fed from every
    main minute written after the view exists, with no filter. Its state row says from when it is complete: the
    epoch when the main minutes are still empty (a new store, or one migrating from before the rollups: the
    backfill's minutes flow in too), else 5 s from now, a few seconds after the view exists. Before that instant
    questions read the main family (rollup_plan), so nothing is copied, no bucket is filled twice and no copy can
    race the view."""
    minutes = s.name(MAIN.finest)
    stmts = [f"INSERT INTO {s.name(STATE_TABLE)} (name, live_from, covered_from, pending_from, ttl_days, version)\n"
             f"SELECT '{CUSTOMER_STATE}', toDateTime64(0, 3), cf, cf, {int(s.rollup_ttl_days)}, "
             f"toUnixTimestamp64Micro(now64(6)) FROM "
             f"(SELECT if((SELECT count() FROM {minutes}) = 0, toDateTime64(0, 3), "
             f"toDateTime64(now64(3) + toIntervalSecond(5), 3)) AS cf)\n"
             f"WHERE (SELECT count() FROM {s.name(STATE_TABLE)} WHERE name = '{CUSTOMER_STATE}') = 0"]
    view = _regroup(s, CUSTOMER, s.local(MAIN.finest), CUSTOMER.levels[0][1])
    return stmts + _family_statements(s, table_fn, CUSTOMER, view)


# -- state -----------------------------------------------------------------------------------------------------
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _utc(v: Any) -> dt.datetime:
    if isinstance(v, dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
    return _EPOCH + dt.timedelta(microseconds=int(v))


@dataclasses.dataclass(frozen=True)
class RollupState:
    live_from: dt.datetime
    covered_from: dt.datetime
    pending_from: dt.datetime
    ttl_days: int
    tag_keys: dict[str, dt.datetime]  # rolled-up tag key -> covered from
    customer_from: dt.datetime | None = None  # the per-customer family is complete from here (None: absent)
    split_at_live_from: bool = False  # a resumed first day over-counted the buckets that straddle live_from

    def splits(self) -> tuple[dt.datetime, ...]:
        """Instants no rollup piece may cross."""
        return (self.live_from,) if self.split_at_live_from else ()

    def usable_from(self, now: dt.datetime) -> dt.datetime:
        """Where the main rollup's coverage starts: the backfilled range, inside the rollups' TTL."""
        if self.ttl_days > 0:
            return max(self.covered_from, now - dt.timedelta(days=self.ttl_days))
        return self.covered_from

    def tag_usable_from(self, key: str, now: dt.datetime) -> dt.datetime | None:
        since = self.tag_keys.get(key)
        return None if since is None else max(since, self.usable_from(now))


def _name(s: Any, table: str) -> str:
    return s.name(table) if hasattr(s, "name") else (f"`{s}`.`{table}`" if s else f"`{table}`")


def read_state(store: Any, database: Any = "") -> RollupState | None:
    """The rollups' coverage, or None when the store has no rollups (not migrated to 9)."""
    rows = {r["name"]: r for r in store.query(
        f"SELECT name, toUnixTimestamp64Micro(max(live_from)) AS lf, "
        f"toUnixTimestamp64Micro(argMax(covered_from, version)) AS cf, "
        f"toUnixTimestamp64Micro(argMax(pending_from, version)) AS pf, argMax(ttl_days, version) AS ttl "
        f"FROM {_name(database, STATE_TABLE)} GROUP BY name")}
    r = rows.get("calls")
    if r is None:
        return None
    keys = store.query(f"SELECT key, toUnixTimestamp64Micro(argMax(covered_from, version)) AS cf, "
                       f"argMax(removed, version) AS removed FROM {_name(database, KEYS_TABLE)} GROUP BY key")
    cust = rows.get(CUSTOMER_STATE)
    return RollupState(_utc(r["lf"]), _utc(r["cf"]), _utc(r["pf"]), int(r["ttl"]),
                       {k["key"]: _utc(k["cf"]) for k in keys if not int(k["removed"])},
                       _utc(cust["cf"]) if cust else None, SPLIT_STATE in rows)


def _write_state(store: Any, s: Any, st: RollupState, covered: dt.datetime, pending: dt.datetime,
                 name: str = "calls") -> None:
    """A new version of a state row. Rows other than 'calls' keep live_from at the epoch (see SPLIT_STATE)."""
    live_from = st.live_from if name == "calls" else _EPOCH
    store.command(f"INSERT INTO {s.name(STATE_TABLE)} (name, live_from, covered_from, pending_from, ttl_days, "
                  "version) VALUES ({name:String}, fromUnixTimestamp64Micro({lf:Int64}), "
                  "fromUnixTimestamp64Micro({cf:Int64}), fromUnixTimestamp64Micro({pf:Int64}), {ttl:UInt32}, "
                  "toUnixTimestamp64Micro(now64(6)))",
                  parameters={"name": name, "lf": _us(live_from), "cf": _us(covered), "pf": _us(pending),
                              "ttl": st.ttl_days})


def rollup_tables() -> list[str]:
    """Every rollup table, of every family and level."""
    return [f.table(sfx) for f in FAMILIES for sfx, _ in f.levels]


def set_ttl(store: Any, s: Any, st: RollupState, days: int, now: dt.datetime) -> None:
    """The rollups now keep `days` (0: forever; exporters.retention changed their tables' TTL). A longer TTL cannot
    bring back what the old one deleted: coverage starts no earlier than the old horizon (older days read raw, or
    are rolled up again by a backfill, under the new TTL)."""
    covered, pending = st.covered_from, st.pending_from
    horizon = now - dt.timedelta(days=st.ttl_days)
    if st.ttl_days > 0 and (days == 0 or days > st.ttl_days) and horizon > covered:
        # Coverage starts at the old horizon's next midnight: whole days, so whole buckets at every level. What the
        # old TTL's merges had not deleted yet below it goes now (a backfill rolls those days up again from the raw
        # calls, under the new TTL, with nothing left to count twice); nothing is pending any more.
        covered = pending = _ceil(horizon, 86400)
        _delete_range(store, s, _EPOCH, covered)
        # tag keys covered from before it: from it now, so a backfill rolls them up with the days it redoes
        _write_keys(store, s, {k: covered for k, since in st.tag_keys.items() if since < covered})
    _write_state(store, s, dataclasses.replace(st, ttl_days=days), covered, pending)


def _write_keys(store: Any, s: Any, keys: dict[str, dt.datetime], removed: Iterable[str] = ()) -> None:
    rows = [(k, _us(v), 0) for k, v in keys.items()] + [(k, 0, 1) for k in removed]
    if not rows:
        return
    values = ", ".join(f"({{k{i}:String}}, fromUnixTimestamp64Micro({{c{i}:Int64}}), {r}, "
                       f"toUnixTimestamp64Micro(now64(6)))" for i, (_, _, r) in enumerate(rows))
    params: dict[str, Any] = {}
    for i, (k, c, _) in enumerate(rows):
        params[f"k{i}"], params[f"c{i}"] = k, c
    store.command(f"INSERT INTO {s.name(KEYS_TABLE)} (key, covered_from, removed, version) VALUES {values}",
                  parameters=params)


def _us(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


def sync_tag_keys(store: Any, s: Any, keys: Sequence[str]) -> None:
    """Roll up `keys` too. Keys are only added: gateways with different configs (a rolling deploy) must not turn a
    key off and on, each time losing its coverage; `remove_tag_keys` stops one. A new key is covered from where no
    call already stored can be missing: live_from on a store with no newer calls, else 5 s past the newest call
    (the backfill does not fill it)."""
    st = read_state(store, s)
    if st is None:
        return
    added = sorted(set(keys) - set(st.tag_keys))
    if not added:
        return
    since = st.live_from
    r = store.query(f"SELECT count() AS n, toUnixTimestamp64Micro(max(Timestamp)) AS t "
                    f"FROM {s.name('llm_calls')} WHERE Timestamp >= fromUnixTimestamp64Micro({{lf:Int64}})",
                    parameters={"lf": _us(st.live_from)})[0]
    if int(r["n"]):
        since = max(st.live_from, _utc(r["t"]) + dt.timedelta(seconds=5))
    _write_keys(store, s, {k: since for k in added})


def remove_tag_keys(store: Any, s: Any, keys: Sequence[str]) -> None:
    """Stop rolling up `keys` (their rows stay until the rollups' TTL; queries read them raw from now on)."""
    _write_keys(store, s, {}, sorted(set(keys)))


# -- backfill --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BackfillStep:
    done_seconds: float  # of the range to backfill
    total_seconds: float
    covered_from: dt.datetime
    rows: int  # raw calls rolled up in this step


def _floor_day(t: dt.datetime) -> dt.datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def _delete_range(store: Any, s: Any, a: dt.datetime, b: dt.datetime) -> None:
    """Drop what an interrupted day wrote, at every level: only whole buckets inside [a, b). When the interrupted
    day is live_from's, its buckets that straddle live_from keep the rows it wrote (they also hold the views'
    rows, which no delete may touch): the caller marks them never to be read (SPLIT_STATE)."""
    for family in FAMILIES:
        for suffix, seconds in family.levels:
            lo = _ceil(a, seconds)
            hi = _floor(b, seconds)
            if lo < hi:
                store.command(f"ALTER TABLE {s.local(family.table(suffix))}{s.on_cluster()} DELETE WHERE "
                              "bucket >= toDateTime({a:Int64}, 'UTC') AND bucket < toDateTime({b:Int64}, 'UTC')",
                              parameters={"a": int(lo.timestamp()), "b": int(hi.timestamp())},
                              settings={"mutations_sync": 2})


def _floor(t: dt.datetime, seconds: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(seconds=int((t - _EPOCH).total_seconds()) // seconds * seconds)


def _ceil(t: dt.datetime, seconds: int) -> dt.datetime:
    f = _floor(t, seconds)
    return f if f == t else f + dt.timedelta(seconds=seconds)


def backfill(store: Any, s: Any, *, now: dt.datetime | None = None, settle_seconds: float = 60.0,
             redo: bool = False, rows_per_step: int = 2_000_000,
             progress: Callable[[BackfillStep], None] | None = None) -> RollupState:
    """Roll up the calls stored before the views existed, newest day first; resumable (each finished day moves
    covered_from; an unfinished one is deleted and redone). `redo`: roll up the whole backfilled range again.
    Waits for nothing: it refuses to start until `settle_seconds` past live_from (calls in flight then land)."""
    st = read_state(store, s)
    if st is None:
        raise RollupError("the store has no rollups: run `tagway db migrate` first")
    now = now or dt.datetime.now(dt.timezone.utc)
    if now < st.live_from + dt.timedelta(seconds=settle_seconds):
        wait = (st.live_from + dt.timedelta(seconds=settle_seconds) - now).total_seconds()
        raise RollupError(f"the rollups went live at {st.live_from.isoformat()}; calls recorded just before may "
                          f"still arrive: run the backfill in {max(1, int(wait + 0.999))} s")
    # --redo rolls up again the whole days before live_from's day. That day is left as it is: its buckets (minute,
    # hour, day) mix backfilled calls and calls from the views, so rolling its backfilled part up again would count
    # it twice in the buckets that straddle live_from.
    redo_to = _floor_day(st.live_from)
    if redo and st.covered_from < redo_to:
        _delete_range(store, s, st.covered_from, redo_to)
        tag_keys = {k: (redo_to if v < redo_to else v) for k, v in st.tag_keys.items()}
        _write_keys(store, s, tag_keys)
        _write_state(store, s, st, redo_to, redo_to)
        st = read_state(store, s)
    _backfill_main(store, s, st, rows_per_step, progress)
    return read_state(store, s)


def _backfill_main(store: Any, s: Any, st: RollupState, rows_per_step: int,
                   progress: Callable[[BackfillStep], None] | None) -> None:
    r = store.query(f"SELECT count() AS n, toUnixTimestamp64Micro(min(Timestamp)) AS t FROM {s.name('llm_calls')} "
                    "WHERE Timestamp < fromUnixTimestamp64Micro({cf:Int64})", parameters={"cf": _us(st.covered_from)})
    if not int(r[0]["n"]):
        return
    oldest = _floor_day(_utc(r[0]["t"]))
    total = (st.covered_from - oldest).total_seconds()
    if st.pending_from < st.covered_from:  # a day cut short by a crash or ^C: drop what it wrote, redo it
        if st.covered_from >= st.live_from and not st.split_at_live_from:
            # live_from's own day: its straddling buckets also hold the views' rows, so what it wrote there cannot
            # be deleted and will count twice. From now on queries read around them (finer levels, raw seconds).
            _write_state(store, s, st, st.live_from, _EPOCH, name=SPLIT_STATE)
        _delete_range(store, s, st.pending_from, st.covered_from)
    start = b = st.covered_from
    while b > oldest:
        a = _floor_day(b - dt.timedelta(microseconds=1))
        keys = [k for k, v in st.tag_keys.items() if v == b]  # keys covered down to here go down with it
        _write_state(store, s, st, b, a)
        rows = 0
        hi = b
        step = _step_seconds(store, s, a, b, rows_per_step)
        while hi > a:  # within the day, whole hours of ~rows_per_step calls: bounded memory, a moving progress bar
            lo = max(a, _floor(hi - dt.timedelta(microseconds=1), step))
            rows += _roll_up(store, s, lo, hi, keys)
            hi = lo
            if progress:
                progress(BackfillStep((start - lo).total_seconds(), total, lo, rows))
        for k in keys:
            st.tag_keys[k] = a
        _write_keys(store, s, {k: a for k in keys})
        _write_state(store, s, st, a, a)
        b = a


def _step_seconds(store: Any, s: Any, a: dt.datetime, b: dt.datetime, rows_per_step: int) -> int:
    """Hours per step (a divisor of 24, so steps stay aligned) for about rows_per_step calls each."""
    n = int(store.query(f"SELECT count() AS n FROM {s.name('llm_calls')} WHERE Timestamp >= "
                        "fromUnixTimestamp64Micro({a:Int64}) AND Timestamp < fromUnixTimestamp64Micro({b:Int64})",
                        parameters={"a": _us(a), "b": _us(b)})[0]["n"])
    per_hour = max(1.0, n / max(1.0, (b - a).total_seconds() / 3600))
    hours = max([h for h in (1, 2, 3, 4, 6, 8, 12, 24) if h * per_hour <= rows_per_step] or [1])
    return hours * 3600


def _roll_up(store: Any, s: Any, a: dt.datetime, b: dt.datetime, tag_keys: Sequence[str]) -> int:
    params = {"a": _us(a), "b": _us(b), "keys": list(tag_keys)}
    where = ("Timestamp >= fromUnixTimestamp64Micro({a:Int64}) AND Timestamp < fromUnixTimestamp64Micro({b:Int64})")
    n = int(store.query(f"SELECT count() AS n FROM {s.name('llm_calls')} WHERE {where}", parameters=params)[0]["n"])
    if not n:
        return 0
    src = s.name("llm_calls")
    store.command(f"INSERT INTO {s.name(MAIN.finest)} {finest_select(s, MAIN, where, src=src)}",
                  parameters=params)
    if tag_keys:
        store.command(f"INSERT INTO {s.name(TAGS.finest)} "
                      f"{finest_select(s, TAGS, where, '{keys:Array(String)}', src)}", parameters=params)
    return n
