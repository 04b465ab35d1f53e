"""Slice selection: the parameterized SQL over `llm_calls`, a pure sampler (stratified by segment with a floor, or
uniform; deterministic under a seed), and the `Case` a replay runs, rebuilt from the recorded call.

Two queries: a light one for the pool (keys and tags only, so sampling 100k calls does not move their content)
and one for the content of the sampled trace ids. Every value, tag keys included, is a server-side parameter.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from typing import Any, Iterable, Sequence

import orjson

from exporters.genai_messages import from_semconv_input, loads_or_empty, output_text
from exporters.responses_format import API_MARK, messages_from_record
from exporters.vocabulary import (COLUMNS, NON_PRODUCTION_SOURCES, TAG_PREFIX, Filter, Params, filter_condition,
                                  parse_duration, parse_filter)

from .spec import Sampling, SliceSpec

__all__ = ["NONE_SEGMENT", "PoolRow", "Sampled", "SampleResult", "Case", "EmptySliceError", "build_pool_query",
           "build_content_query", "count_production_errors", "segment_of", "order_key", "sample", "case_from_row",
           "sample_pool", "select_slice", "fetch_cases"]

NONE_SEGMENT = "(none)"
# the slice's own value-list filters: spec field -> llm_calls column
_LIST_FILTERS = {k: COLUMNS[k] for k in ("customer", "intent", "prompt_version", "model")}
# request params never forwarded as recorded: replay is non-streaming
_DROP_PARAMS = {"stream", "stream_options", "messages", "model"}
# a recorded call's messages, rebuilt for the API it spoke (tagway.api); chat completions and Anthropic messages
# need nothing more than the chat shape
_MESSAGES_FROM_RECORD = {"responses": messages_from_record}


class EmptySliceError(ValueError):
    """The slice (or dataset) has no replayable call."""


# why a call is not a case: nothing recorded to re-send (a tenant with capture off, or a call refused, e.g. an unknown
# model's 404, before its content was read)
NO_CONTENT = "no captured content (content capture off for that call, or the call refused before capture)"


@dataclasses.dataclass(frozen=True)
class PoolRow:
    trace_id: str
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    model: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    has_content: bool = True
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # other segment columns (provider, ...)


@dataclasses.dataclass(frozen=True)
class Sampled:
    trace_id: str
    segment: str


@dataclasses.dataclass
class SampleResult:
    cases: list[Sampled]
    available: dict[str, int]  # replayable calls per segment in the pool
    selected: dict[str, int]
    skipped: dict[str, int]  # reason -> count
    notes: list[str] = dataclasses.field(default_factory=list)
    groups: dict[str, list[PoolRow]] = dataclasses.field(default_factory=dict, repr=False)  # each in seeded order

    def next_picks(self, draws: dict[str, int], drawn: set[str]) -> list[Sampled]:
        """Escalation: the next `k` calls of each segment in the seeded order that were not drawn yet (stratified,
        without replacement, deterministic under the seed)."""
        out = []
        for seg, k in sorted(draws.items()):
            fresh = [r for r in self.groups.get(seg, []) if r.trace_id not in drawn]
            out += [Sampled(r.trace_id, seg) for r in fresh[:k]]
        return out


# -- SQL ----------------------------------------------------------------------------------------------------------

def _window(s: SliceSpec, now: float) -> tuple[float | None, float | None]:
    if s.since:
        return now - parse_duration(s.since).total_seconds(), None
    return s.from_, s.to


def _conditions(s: SliceSpec, now: float, status: str) -> tuple[list[str], dict[str, Any]]:
    """The slice's WHERE conditions and their parameters (every value a server-side parameter)."""
    where = ["operation = {operation:String}", "replay_run_id = ''"]
    params: dict[str, Any] = {"operation": s.operation}
    for key, column in _LIST_FILTERS.items():
        values = getattr(s, key)
        if values:
            where.append(f"{column} IN {{f_{key}:Array(String)}}")
            params[f"f_{key}"] = list(values)
    filters = [Filter(TAG_PREFIX + k, v) for k, v in sorted(s.tags.items())] + [parse_filter(f) for f in s.where]
    p = Params("w_")
    where += [filter_condition(f, p) for f in filters]
    params.update(p.values)
    if s.source:
        where.append("source IN {sources:Array(String)}")
        params["sources"] = list(s.source)
    elif not any(f.key == "source" for f in filters):
        where.append("source NOT IN {excluded_sources:Array(String)}")
        params["excluded_sources"] = list(NON_PRODUCTION_SOURCES)
    if status != "any":
        where.append("status = {status:String}")
        params["status"] = status
    t_from, t_to = _window(s, now)
    if t_from is not None:
        where.append("Timestamp >= fromUnixTimestamp64Milli({t_from:Int64})")
        params["t_from"] = int(t_from * 1000)
    if t_to is not None:
        where.append("Timestamp < fromUnixTimestamp64Milli({t_to:Int64})")
        params["t_to"] = int(t_to * 1000)
    return where, params


def build_pool_query(s: SliceSpec, *, now: float | None = None, table: str = "llm_calls",
                     extra_where: str = "", oldest_first: bool = False) -> tuple[str, dict]:
    """The light pool query. Returns (sql, parameters) for `Store.query`; no value is pasted into the SQL.
    `extra_where`: one more condition from the caller (its values bound as parameters the caller adds).
    `oldest_first`: the pool is the oldest `pool_max` calls (a caller paging through time), not the newest."""
    where, params = _conditions(s, time.time() if now is None else now, s.status)
    if extra_where:
        where.append(extra_where)
    params["pool_max"] = s.pool_max
    extra = "".join(f"toString({COLUMNS[k]}) AS seg_{k}, " for k in _extra_columns(s.segment_by))
    sql = (f"SELECT trace_id, customer, intent, prompt_version, model_requested AS model, {extra}tags, "
           f"request_json != '' AS has_content, toUnixTimestamp64Milli(Timestamp) AS ts_ms\nFROM {table}\nWHERE " +
           "\n  AND ".join(where) + f"\nORDER BY Timestamp {'ASC' if oldest_first else 'DESC'}\nLIMIT 1 BY trace_id"
           "\nLIMIT {pool_max:UInt32}")
    return sql, params


def count_production_errors(store: Any, s: SliceSpec, *, now: float | None = None) -> int:
    """Errored production calls that match the slice's filters and window (whatever its `status` says), for the
    report header: errors are outcomes, so the reader sees how many a status filter left out."""
    where, params = _conditions(s, time.time() if now is None else now, "error")
    rows = store.query("SELECT uniqExact(trace_id) AS n FROM llm_calls WHERE " + " AND ".join(where), params)
    return int(rows[0]["n"]) if rows else 0


def _extra_columns(segment_by: Sequence[str]) -> list[str]:
    """Segment keys that are columns the pool query does not always select."""
    return [k for k in segment_by if k in COLUMNS and k not in _LIST_FILTERS]


CONTENT_COLUMNS = ("trace_id, toUnixTimestamp64Milli(Timestamp) AS ts_ms, customer, intent, prompt_version, "
                   "model_requested AS model, tags, status, latency_ms, cost_usd, input_tokens, output_tokens, "
                   "request_json, system_instructions, request_params, response_json")


def build_content_query(trace_ids: Sequence[str], *, table: str = "llm_calls") -> tuple[str, dict]:
    return (f"SELECT {CONTENT_COLUMNS}\nFROM {table}\nWHERE trace_id IN {{ids:Array(String)}} AND replay_run_id = ''\n"
            "ORDER BY Timestamp DESC\nLIMIT 1 BY trace_id", {"ids": list(trace_ids)})


# -- sampling (pure) ----------------------------------------------------------------------------------------------

def segment_of(row: PoolRow | Any, segment_by: Sequence[str]) -> str:
    """The segment name of a call: its values for the segment keys joined with '/'; a key absent on the call
    (empty column or missing tag) is its own "(none)" value."""
    values = []
    for key in segment_by:
        if key.startswith(TAG_PREFIX):
            v = row.tags.get(key[len(TAG_PREFIX):], "")
        else:
            v = row.columns.get(key, "") if key in row.columns else getattr(row, key, "")
        values.append(str(v) if v else NONE_SEGMENT)
    return "/".join(values)


def order_key(seed: int, trace_id: str) -> bytes:
    """The sampler's seeded order of calls: a segment's sample is a prefix of its calls in this order, and
    escalation draws the next ones (so every look is a prefix too)."""
    return hashlib.blake2b(f"{seed}:{trace_id}".encode(), digest_size=8).digest()


def _proportional(remaining: int, room: dict[str, int], weight: dict[str, int]) -> dict[str, int]:
    """Share `remaining` among segments proportionally to `weight`, never beyond `room` (largest remainder,
    ties broken by segment name). Loops while caps bind."""
    give = {s: 0 for s in room}
    while remaining > 0:
        open_ = {s: room[s] - give[s] for s in room if room[s] - give[s] > 0}
        if not open_:
            break
        if sum(open_.values()) <= remaining:
            for s, r in open_.items():
                give[s] += r
            break
        total_w = sum(weight[s] for s in open_) or len(open_)
        exact = {s: remaining * (weight[s] or 1) / total_w for s in open_}
        step = {s: min(int(exact[s]), open_[s]) for s in open_}
        left = remaining - sum(step.values())
        for s in sorted(open_, key=lambda s: (-(exact[s] - int(exact[s])), s)):
            if left <= 0:
                break
            if step[s] < open_[s]:
                step[s] += 1
                left -= 1
        for s, n in step.items():
            give[s] += n
        remaining -= sum(step.values())
    return give


def sample(rows: Iterable[PoolRow], segment_by: Sequence[str], limit: int | None, sampling: Sampling) -> SampleResult:
    """Pick the cases. Stratified: every segment gets min(min_per_segment, available) cases, the rest of `limit`
    goes to segments in proportion to their size (capped by max_per_segment). Uniform: `limit` calls at random.
    Deterministic under `sampling.seed` whatever the order of `rows`."""
    skipped: Counter[str] = Counter()
    groups: dict[str, list[PoolRow]] = {}
    seen: set[str] = set()
    for r in rows:
        if r.trace_id in seen:
            continue
        seen.add(r.trace_id)
        if not r.has_content:
            skipped[NO_CONTENT] += 1
            continue
        groups.setdefault(segment_of(r, segment_by), []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: order_key(sampling.seed, r.trace_id))
    available = {s: len(g) for s, g in sorted(groups.items())}
    notes: list[str] = []
    if sampling.mode == "uniform":
        everything = sorted((r for g in groups.values() for r in g), key=lambda r: order_key(sampling.seed, r.trace_id))
        chosen = everything[:limit] if limit is not None else everything
        picked = [Sampled(r.trace_id, segment_of(r, segment_by)) for r in chosen]
    else:
        cap = {s: min(n, sampling.max_per_segment or n) for s, n in available.items()}
        quota = {s: min(sampling.min_per_segment, cap[s]) for s in available}
        if limit is None:
            quota = dict(cap)
        elif sum(quota.values()) > limit:
            notes.append(f"the per-segment floor ({sampling.min_per_segment} x {len(quota)} segments = "
                         f"{sum(quota.values())}) exceeds limit {limit}; the floor wins")
        else:
            extra = _proportional(limit - sum(quota.values()), {s: cap[s] - quota[s] for s in quota}, available)
            quota = {s: quota[s] + extra[s] for s in quota}
        picked = [Sampled(r.trace_id, s) for s in sorted(groups) for r in groups[s][:quota[s]]]
    selected = dict(sorted(Counter(p.segment for p in picked).items()))
    for s, n in available.items():
        if n < sampling.min_per_segment and sampling.mode == "stratified":
            notes.append(f"segment {s!r} has only {n} replayable call(s) (floor {sampling.min_per_segment})")
    return SampleResult(picked, available, selected, dict(skipped), notes, groups)


# -- cases --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    """One recorded call to replay: the rebuilt OpenAI request and the logged production answer (the baseline)."""
    case_id: str  # = the original call's trace id
    segment: str
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    model: str = ""
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    messages: list[dict] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline_output: list[dict] = dataclasses.field(default_factory=list)  # semconv output messages
    baseline_status: str = "ok"
    baseline_latency_ms: float | None = None
    baseline_cost_usd: float | None = None
    timestamp_ms: int = 0
    label: str = ""  # a dataset's human label of the production answer: pass | fail | "" (the `label` evaluator)
    critique: str = ""

    @property
    def baseline_text(self) -> str:
        return output_text(self.baseline_output)

    @property
    def baseline_message(self) -> dict:
        msgs = from_semconv_input(None, self.baseline_output[:1])
        return msgs[0] if msgs else {"role": "assistant", "content": ""}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Case":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def case_from_row(row: dict, segment: str) -> tuple[Case | None, str | None]:
    """A `llm_calls` row -> (Case, None), or (None, skip reason) when it cannot be replayed."""
    if not row.get("request_json"):
        return None, NO_CONTENT
    try:
        inputs = orjson.loads(row["request_json"])
        system = loads_or_empty(row.get("system_instructions"))
    except orjson.JSONDecodeError:
        return None, "unparseable request_json"
    if not isinstance(inputs, list) or not inputs:
        return None, "no input messages recorded"
    params = loads_or_empty(row.get("request_params")) or {}
    params = {k: v for k, v in params.items() if k not in _DROP_PARAMS} if isinstance(params, dict) else {}
    output = loads_or_empty(row.get("response_json"))
    rebuild = _MESSAGES_FROM_RECORD.get(str(params.get(API_MARK)), from_semconv_input)
    return Case(
        case_id=row["trace_id"], segment=segment, customer=row.get("customer") or "", intent=row.get("intent") or "",
        prompt_version=row.get("prompt_version") or "", model=row.get("model") or "", tags=dict(row.get("tags") or {}),
        messages=rebuild(system if isinstance(system, list) else [], inputs), params=params,
        baseline_output=output if isinstance(output, list) else [], baseline_status=row.get("status") or "ok",
        baseline_latency_ms=row.get("latency_ms"), baseline_cost_usd=row.get("cost_usd"),
        timestamp_ms=int(row.get("ts_ms") or 0),
    ), None


def fetch_cases(store: Any, picked: Sequence[Sampled], *, chunk: int = 2000) -> tuple[list[Case], dict[str, int]]:
    """Load the content of the picked calls (in chunks), in the picked order. Returns (cases, skipped reasons)."""
    rows: dict[str, dict] = {}
    ids = [p.trace_id for p in picked]
    for i in range(0, len(ids), chunk):
        sql, params = build_content_query(ids[i:i + chunk])
        for r in store.query(sql, params):
            rows[r["trace_id"]] = r
    cases, skipped = [], Counter()
    for p in picked:
        row = rows.get(p.trace_id)
        if row is None:
            skipped["call no longer in llm_calls (TTL or deleted)"] += 1
            continue
        case, why = case_from_row(row, p.segment)
        if case is None:
            skipped[why or "unknown"] += 1
        else:
            cases.append(case)
    return cases, dict(skipped)


def sample_pool(store: Any, s: SliceSpec, *, now: float | None = None) -> tuple[SampleResult, int]:
    """Pool query -> sampler (no content yet). Returns the sample and how many calls matched the filters."""
    sql, params = build_pool_query(s, now=now)
    extra = _extra_columns(s.segment_by)
    pool = [PoolRow(r["trace_id"], r["customer"], r["intent"], r["prompt_version"], r["model"], dict(r["tags"] or {}),
                    bool(r["has_content"]), {k: str(r[f"seg_{k}"]) for k in extra}) for r in store.query(sql, params)]
    result = sample(pool, s.segment_by, s.limit, s.sampling)
    # a value the slice names that no call has (a typo'd or silent customer) dropped out of the report unseen
    for field in ("customer", "intent", "prompt_version"):
        seen = {getattr(r, field) for r in pool}
        missing = [v for v in getattr(s, field) or () if v not in seen]
        if missing and 0 < len(pool) < s.pool_max:  # a capped pool holds the newest calls only: no claim then
            result.notes.append(f"slice.{field}: no call matched {', '.join(map(repr, missing))}: the report has "
                                f"no segment for {'it' if len(missing) == 1 else 'them'}")
    return result, len(pool)


def select_slice(store: Any, s: SliceSpec, *, now: float | None = None) -> tuple[list[Case], SampleResult]:
    """Pool query -> sampler -> content query. Raises EmptySliceError when nothing is replayable."""
    result, matched = sample_pool(store, s, now=now)
    if not result.cases:
        why = "; ".join(f"{n} skipped: {r}" for r, n in result.skipped.items())
        raise EmptySliceError(f"the slice matched no replayable call in llm_calls ({matched} matched the filters"
                              f"{'; ' + why if why else ''})")
    cases, skipped = fetch_cases(store, result.cases)
    for reason, n in skipped.items():
        result.skipped[reason] = result.skipped.get(reason, 0) + n
    if not cases:
        raise EmptySliceError("none of the sampled calls could be rebuilt: " +
                              "; ".join(f"{n} {r}" for r, n in result.skipped.items()))
    return cases, result
