"""The one query layer over `llm_calls` behind `tagway stats|errors|show`, the stats API and the dashboard page.

Inputs are validated with the vocabulary of `llm_calls` (exporters.vocabulary: columns, `tag.<key>`, durations,
filters, sources) and reach ClickHouse only as server-side parameters (`{name:Type}` placeholders passed with
`parameters=`); values and times are always bound. Nothing the caller typed is pasted into SQL text. Bad input
raises `QueryInputError` with one line saying what is wrong.

Per segment the report gives calls, errors, the error rate with a 95% Wilson score interval (computed in Python
from the counts), the delta against the previous window of the same length, latency and TTFT percentiles,
tokens and cost; segments are sorted worst first and those under `min_calls` are kept but flagged, because
averages hide the failing segment and a three-call segment is three coin flips.

Replayed and judge traffic is not production traffic: a replay re-sends a customer's recorded calls (with that
customer's tags) to a candidate model, and the judge grades them, so their failures are the candidate's, not the
customer's. Every query therefore leaves out rows whose `source` is in `EXCLUDED_SOURCES` (the vocabulary's
NON_PRODUCTION_SOURCES) unless the selection filters on `source` itself (`source=replay` shows exactly the
replayed calls, `source!=production` everything else). Reports say which sources were left out (`sources_excluded`).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from typing import Any, Iterable, Sequence

from . import feedback as fb
from .rollup_plan import Piece, Route, choose_route, plan_pieces, question_keys
from .rollup_read import read_info, union_source
from .rollups import COST, LAT_Q, TTFT_Q, read_state
from .store import Store, StoreError
from .tagstate import applied_tags_source
from .vocabulary import (APPLIED_TAG, COLUMNS, NON_PRODUCTION_SOURCES, STATUSES, Filter, Params, QueryInputError,
                         Window, column_expr, filter_condition, parse_dimension, parse_duration, parse_filter,
                         parse_filters, parse_window)
from .vocabulary import iso_utc as _iso
from .vocabulary import show as _show

__all__ = [
    "QueryInputError", "GROUP_COLUMNS", "STATUSES", "EXCLUDED_SOURCES", "Window", "Filter", "Selection",
    "parse_duration", "parse_window", "parse_dimension", "parse_filter", "parse_where", "parse_by",
    "make_selection", "wilson_interval", "choose_step",
    "SegmentStats", "StatsReport", "ErrorGroup", "ErrorsReport", "Series", "TimeSeries",
    "segment_stats", "top_errors", "get_call", "parse_trace_id", "error_timeseries", "calls_table", "calls_source",
]

# The vocabulary (exporters.vocabulary) under the names this module's users know.
GROUP_COLUMNS = COLUMNS
EXCLUDED_SOURCES = NON_PRODUCTION_SOURCES
TRACE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_W3C_TRACE_ID = re.compile(r"^[0-9A-Fa-f]{32}$")
_DB_RE = re.compile(r"^[A-Za-z0-9_]{0,64}$")
MAX_DIMENSIONS = 5
MAX_FILTERS = 20
Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Bucket sizes for the time series, smallest first; the first that gives <= MAX_BUCKETS buckets wins.
STEPS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
MAX_BUCKETS = 60


# -- dimensions and filters ------------------------------------------------------------------------------------
def parse_by(by: Iterable[str] | None) -> tuple[str, ...]:
    """Group-by keys; each item may also be comma separated ('customer,intent'). Default: customer."""
    keys: list[str] = []
    for item in by or ():
        for part in str(item).split(","):
            if part.strip():
                keys.append(parse_dimension(part, "by"))
    if not keys:
        keys = ["customer"]
    if len(set(keys)) != len(keys):
        raise QueryInputError("a group-by column is repeated", param="by")
    if len(keys) > MAX_DIMENSIONS:
        raise QueryInputError(f"at most {MAX_DIMENSIONS} group-by columns", param="by")
    return tuple(keys)


def _sessions_per_customer(by: tuple[str, ...]) -> tuple[str, ...]:
    """A session is per customer: grouped by session_id alone, two customers' "sess-1" were one row of both."""
    if "session_id" not in by or "customer" in by:
        return by
    i = by.index("session_id")
    return by[:i] + ("customer",) + by[i:]


def parse_where(items: Iterable[str] | None) -> tuple[Filter, ...]:
    filters = parse_filters(items or ())
    if len(filters) > MAX_FILTERS:
        raise QueryInputError(f"at most {MAX_FILTERS} filters", param="where")
    return filters

@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rows: a time window, ANDed filters and an optional status."""
    window: Window
    filters: tuple[Filter, ...] = ()
    status: str | None = None

    def with_filter(self, f: Filter) -> "Selection":
        return dataclasses.replace(self, filters=self.filters + (f,))

    @property
    def sources_excluded(self) -> tuple[str, ...]:
        """The sources left out: EXCLUDED_SOURCES, or none when a filter names `source` (either operator)."""
        return () if any(f.key == "source" for f in self.filters) else EXCLUDED_SOURCES

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window.to_dict(), "filters": [f.to_dict() for f in self.filters],
                "status": self.status, "sources_excluded": list(self.sources_excluded)}


def make_selection(where: Iterable[str] | None = None, status: str | None = None, since: str | None = None,
                   from_: str | None = None, to: str | None = None, now: dt.datetime | None = None,
                   default_since: str = "24h") -> Selection:
    """Validate the common inputs of every query (the CLI options and API query parameters)."""
    if status is not None and status != "" and status not in STATUSES:
        raise QueryInputError(f"invalid status {_show(status)}: use one of {', '.join(STATUSES)}", param="status")
    return Selection(parse_window(since, from_, to, now, default_since), parse_where(where), status or None)


# -- SQL building ----------------------------------------------------------------------------------------------
class _Params(Params):
    def time(self, t: dt.datetime) -> str:
        # Epoch microseconds: no time zone ambiguity between the client and the server.
        return f"fromUnixTimestamp64Micro({self.add('t', 'Int64', _epoch_us(t))})"


def _epoch_us(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _dim_select(key: str, p: Params) -> str:
    e = column_expr(key, p)
    return f"toString({e})" if key == "stream" else e


def _where(sel: Selection, p: _Params, window: Window, database: str = "") -> str:
    return " AND ".join([f"Timestamp >= {p.time(window.start)}", f"Timestamp < {p.time(window.end)}",
                         _conditions(sel, p, database)])


# filters worth a "did you mean": names people type, whose recorded values are few and named by people
_HINTED = ("customer", "intent", "prompt_version", "model", "model_served", "provider", "key_id")


def filter_hints(store: Store, sel: Selection, database: str = "") -> list[str]:
    """For a question that matched nothing: each `key=value` filter on a named column whose value no call in the
    window has, with the recorded values closest to it (a typo'd customer read as "nothing wrong" at 3 a.m.).
    One small query a filter, run only after an empty answer."""
    import difflib  # noqa: PLC0415 - only for an empty answer

    hints = []
    for f in sel.filters:
        if f.op != "=" or f.key not in _HINTED:
            continue
        p = _Params()
        col = COLUMNS[f.key]
        window = (f"Timestamp >= {p.time(sel.window.start)} AND Timestamp < {p.time(sel.window.end)}"
                  + (f" AND source NOT IN {p.add('v', 'Array(String)', list(sel.sources_excluded))}"
                     if sel.sources_excluded else ""))
        rows = store.query(f"SELECT {col} AS v, count() AS n FROM {calls_table(database)} WHERE {window} "
                           f"GROUP BY v ORDER BY n DESC LIMIT 10000", p.values)
        values = [str(r["v"]) for r in rows if r["v"] != ""]
        if f.value in values:
            continue
        close = difflib.get_close_matches(f.value, values, n=3, cutoff=0.6)
        if close:
            hints.append(f"no call in this window has {f.key}={f.value}; did you mean "
                         f"{' or '.join(f'{f.key}={v}' for v in close)}?")
        else:
            known = ", ".join(values[:8]) + (f" and {len(values) - 8} more" if len(values) > 8 else "")
            hints.append(f"no call in this window has {f.key}={f.value}"
                         + (f" (those with calls: {known})" if values else ""))
    return hints


def _conditions(sel: Selection, p: _Params, database: str = "") -> str:
    """The selection's filters, status and excluded sources (no time): valid on llm_calls and on the rollups."""
    parts = [filter_condition(f, p, database) for f in sel.filters]
    if sel.status:
        parts.append(f"status = {p.add('v', 'String', sel.status)}")
    if sel.sources_excluded:
        parts.append(f"source NOT IN {p.add('v', 'Array(String)', list(sel.sources_excluded))}")
    return " AND ".join(parts) or "1"


# -- rollups (exporters.rollups): the same answers from per-bucket aggregates when the question allows -----------
def _plan(store: Store, sel: Selection, by: Sequence[str], window: Window, database: str,
          splits: Sequence[dt.datetime] = (), step: int | None = None,
          rollups: bool = True) -> tuple[Route, list[Piece]]:
    keys = question_keys(by, sel.filters, sel.status, bool(sel.sources_excluded))
    if not rollups:
        route = Route(None, "rollups turned off for this question")
    else:
        try:
            state = read_state(store, database)
        except StoreError:  # not migrated yet (or a store without the rollups): raw answers are still right
            state = None
        route = choose_route(keys, state, dt.datetime.now(dt.timezone.utc))
    return route, plan_pieces(route, window.start, window.end, splits, step)


def _rollup_from(route: Route, pieces: list[Piece], sel: Selection, p: _Params, database: str,
                 dims: Sequence[tuple[str, str]], extras: Sequence[tuple[str, Any]], measures: int = 6) -> str:
    tag = p.add("k", "String", route.tag_key) if route.tag_key else ""
    return union_source(pieces, route, _conditions(sel, p, database), dims, extras, p.time,
                        lambda t: _table_name(t, database), measures, tag)


# The outer aggregation over rollup_read.union_source (cur: the row is in the current window, not the previous one).
_ROLLUP_AGG = (
    "sumIf(n, cur) AS calls, sumIf(n, cur AND status = 'error') AS errors, "
    "sumIf(n, cur AND status = 'cancelled') AS cancelled, "
    f"{LAT_Q.replace('(', 'MergeIf(', 1)}(s_lat, cur) AS lat, {TTFT_Q.replace('(', 'MergeIf(', 1)}(s_ttft, cur) AS ttft, "
    "sumIf(n_in, cur) AS tin, sumIf(n_out, cur) AS tout, sumIf(n_cost, cur) AS cost, "
    "sumIf(n, NOT cur) AS prev_calls, sumIf(n, NOT cur AND status = 'error') AS prev_errors")

# Raw rows take the rollups' quantile functions (bfloat16 histograms), so one question answered from either gives the
# same latency figures: `quantiles` (a reservoir, interpolated) differed from the rollups' by up to ~13% at p50.
_LAT_IF, _TTFT_IF = LAT_Q.replace("(", "If(", 1), TTFT_Q.replace("(", "If(", 1)


def _table_name(table: str, database: str) -> str:
    calls_table(database)  # validates the name
    return f"`{database}`.`{table}`" if database else f"`{table}`"


def calls_table(database: str = "") -> str:
    if not _DB_RE.match(database or ""):
        raise QueryInputError(f"invalid database name {_show(database)}", param="database")
    return f"`{database}`.`llm_calls`" if database else "`llm_calls`"


def calls_source(database: str, by: Sequence[str]) -> str:
    """What a query reads: llm_calls, or llm_calls with each call's applied tags when it groups by them."""
    table = calls_table(database)
    return applied_tags_source(table, database) if APPLIED_TAG in by else table


# -- statistics ------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion successes/n. n == 0 -> (0.0, 1.0): nothing is known."""
    if n <= 0:
        return 0.0, 1.0
    if successes < 0 or successes > n:
        raise ValueError("successes must be between 0 and n")
    phat = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = phat + z2 / (2 * n)
    margin = z * math.sqrt(phat * (1 - phat) / n + z2 / (4 * n * n))
    low = (centre - margin) / denom
    high = (centre + margin) / denom
    # exact bounds at the edges (the formula gives 0.9999999999999999 for n/n)
    return (0.0 if successes == 0 else max(0.0, low)), (1.0 if successes == n else min(1.0, high))


def _num(x: Any) -> float | None:
    """NaN/None -> None (JSON null); anything else -> float."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _iso_us(us: int) -> str:
    return _iso(_EPOCH + dt.timedelta(microseconds=int(us)))


# -- segment stats ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SegmentStats:
    key: dict[str, str]
    calls: int
    errors: int
    cancelled: int
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_p50: float | None = None
    latency_p95: float | None = None
    latency_p99: float | None = None
    ttft_p50: float | None = None
    low_confidence: bool = False
    prev_calls: int | None = None  # set in compare mode
    prev_errors: int | None = None
    complaints: int = 0  # calls with a complaint (exporters.feedback)
    rated: int = 0  # calls with a score or thumbs
    score_sum: float = 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.calls if self.calls else 0.0

    @property
    def feedback_score(self) -> float | None:
        return self.score_sum / self.rated if self.rated else None

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def error_rate_ci(self) -> tuple[float, float]:
        return wilson_interval(self.errors, self.calls)

    @property
    def prev_error_rate(self) -> float | None:
        if not self.prev_calls:
            return None
        return self.prev_errors / self.prev_calls

    @property
    def delta_error_rate(self) -> float | None:
        prev = self.prev_error_rate
        return None if prev is None else self.error_rate - prev

    def to_dict(self) -> dict[str, Any]:
        low, high = self.error_rate_ci
        out: dict[str, Any] = {
            "key": dict(self.key),
            "calls": self.calls,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "error_rate": self.error_rate,
            "error_rate_ci": {"low": low, "high": high},
            "low_confidence": self.low_confidence,
            "latency_ms": {"p50": self.latency_p50, "p95": self.latency_p95, "p99": self.latency_p99},
            "ttft_ms": {"p50": self.ttft_p50},
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "complaints": self.complaints,
            "complaint_rate": self.complaint_rate,
            "rated": self.rated,
            "feedback_score": self.feedback_score,
        }
        if self.prev_calls is not None:
            out["previous"] = {"calls": self.prev_calls, "errors": self.prev_errors,
                               "error_rate": self.prev_error_rate}
            out["delta_error_rate"] = self.delta_error_rate
        return out


def _sort_key(s: SegmentStats) -> tuple:
    # Worst first: error rate, then volume. Segments under min_calls keep their place and carry the flag.
    return (-s.error_rate, -s.calls, tuple(s.key.values()))


@dataclasses.dataclass
class StatsReport:
    by: tuple[str, ...]
    selection: Selection
    compare: bool
    min_calls: int
    segments: list[SegmentStats]
    total: SegmentStats
    truncated: bool = False
    read: dict[str, Any] | None = None  # which tables answered (rollup_read.read_info)
    # compare: segments with calls in the previous window and none in this one (no current rate, so no row; a
    # tenant that went silent is news)
    gone: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def previous_window(self) -> Window | None:
        return self.selection.window.previous() if self.compare else None

    def to_dict(self) -> dict[str, Any]:
        total = self.total.to_dict()
        for k in ("key", "low_confidence", "latency_ms", "ttft_ms"):
            total.pop(k, None)
        prev = self.previous_window
        return {
            "by": list(self.by),
            "window": self.selection.window.to_dict(),
            "previous_window": prev.to_dict() if prev else None,
            "filters": [f.to_dict() for f in self.selection.filters],
            "status": self.selection.status,
            "sources_excluded": list(self.selection.sources_excluded),
            "min_calls": self.min_calls,
            "compare": self.compare,
            "segments": [s.to_dict() for s in self.segments],
            "total": total,
            "truncated": self.truncated,
            "read": self.read,
            **({"gone": self.gone} if self.compare else {}),
        }


def _validate_limits(min_calls: int, limit: int) -> None:
    if not isinstance(min_calls, int) or min_calls < 0 or min_calls > 10**9:
        raise QueryInputError("min_calls must be a whole number from 0 to 1000000000", param="min_calls")
    if not isinstance(limit, int) or limit < 1 or limit > 10_000:
        raise QueryInputError("limit must be between 1 and 10000", param="limit")


def segment_stats(store: Store, sel: Selection, by: Sequence[str] = ("customer",), *, compare: bool = False,
                  min_calls: int = 20, limit: int = 500, database: str = "", rollups: bool = True) -> StatsReport:
    """Per-segment failure rates over `sel`, worst first. `by` keys are validated again here."""
    by = _sessions_per_customer(parse_by(by))
    _validate_limits(min_calls, limit)
    p = _Params()
    window = sel.window.previous() if compare else sel.window
    window = Window(window.start, sel.window.end)
    route, pieces = _plan(store, sel, by, window, database, splits=[sel.window.start], rollups=rollups)
    group = ", ".join(f"d{i}" for i in range(len(by)))
    if any(piece.level for piece in pieces):
        dims = [(f"d{i}", _dim_select(k, p)) for i, k in enumerate(by)]
        start = p.time(sel.window.start)
        src = _rollup_from(route, pieces, sel, p, database, dims, [("cur", lambda tcol: f"{tcol} >= {start}")])
        agg = _ROLLUP_AGG
        sql = f"SELECT {''.join(f'd{i}, ' for i in range(len(by)))}{agg}\nFROM {src}\n"
    else:
        dims = [f"{_dim_select(k, p)} AS d{i}" for i, k in enumerate(by)]
        where = _where(sel, p, window, database)
        if compare:
            cur = f"Timestamp >= {p.time(sel.window.start)}"
            agg = (f"countIf({cur}) AS calls, countIf({cur} AND status = 'error') AS errors, "
                   f"countIf({cur} AND status = 'cancelled') AS cancelled, "
                   f"{_LAT_IF}(latency_ms, {cur}) AS lat, {_TTFT_IF}(ttft_ms, {cur}) AS ttft, "
                   f"sumIf(input_tokens, {cur}) AS tin, sumIf(output_tokens, {cur}) AS tout, "
                   f"sumIf({COST}, {cur}) AS cost, "
                   f"countIf(NOT ({cur})) AS prev_calls, countIf(NOT ({cur}) AND status = 'error') AS prev_errors")
        else:
            agg = ("count() AS calls, countIf(status = 'error') AS errors, countIf(status = 'cancelled') AS cancelled, "
                   f"{LAT_Q}(latency_ms) AS lat, {TTFT_Q}(ttft_ms) AS ttft, "
                   f"sum(input_tokens) AS tin, sum(output_tokens) AS tout, sum({COST}) AS cost")
        sql = f"SELECT {', '.join(dims)}, {agg}\nFROM {calls_source(database, by)}\nWHERE {where}\n"
    sql += (f"GROUP BY {group}\nORDER BY calls = 0, errors / calls DESC, calls DESC, {group}\n"
            f"LIMIT {p.add('n', 'UInt32', limit + 1)}")
    # In compare mode a segment seen only in the previous window comes back with calls = 0: it counts in the
    # previous total, and is listed apart (`gone`: it has no current rate). Such rows sort last.
    rows = store.query(sql, parameters=p.values)
    truncated = len(rows) > limit
    rows = rows[:limit]
    segments = [_segment(r, by, min_calls, compare) for r in rows if int(r["calls"]) > 0]
    gone = [{"key": {k: str(r[f"d{i}"]) for i, k in enumerate(by)}, "prev_calls": int(r["prev_calls"]),
             "prev_errors": int(r["prev_errors"])} for r in rows if compare and int(r["calls"]) == 0]
    segments.sort(key=_sort_key)
    if truncated or APPLIED_TAG in by:  # a call with several applied tags is in several segments: count it once
        total = _totals(store, sel, compare, database, rollups)
    else:
        total = SegmentStats(key={}, calls=sum(s.calls for s in segments), errors=sum(s.errors for s in segments),
                             cancelled=sum(s.cancelled for s in segments),
                             input_tokens=sum(s.input_tokens for s in segments),
                             output_tokens=sum(s.output_tokens for s in segments),
                             cost_usd=sum(s.cost_usd for s in segments),
                             prev_calls=sum(int(r["prev_calls"]) for r in rows) if compare else None,
                             prev_errors=sum(int(r["prev_errors"]) for r in rows) if compare else None)
    _attach_feedback(store, sel, by, segments, total, database)
    return StatsReport(by, sel, compare, min_calls, segments, total, truncated, read_info(route, pieces), gone)


def _attach_feedback(store: Store, sel: Selection, by: Sequence[str], segments: list[SegmentStats],
                     total: SegmentStats, database: str) -> None:
    """Complaints and feedback scores per segment, from the rated calls of the selection (exporters.feedback)."""
    p = _Params()
    dims = [f"{_dim_select(k, p)} AS d{i}" for i, k in enumerate(by)]
    where = _where(sel, p, sel.window, database)  # an applied_tag filter reads this database's tag tables
    rows = fb.segment_feedback(store, dims, where, p.values, p.time(sel.window.start), database,
                               source=calls_source(database, by))
    found = {tuple(str(r[f"d{i}"]) for i in range(len(by))): r for r in rows}
    for s in segments:
        r = found.get(tuple(s.key.values()))
        if r is not None:
            s.complaints, s.rated, s.score_sum = int(r["complaints"]), int(r["rated"]), float(r["score_sum"] or 0)
    if APPLIED_TAG in by and rows:  # a call with several applied tags is in several segments: count it once
        rows = fb.segment_feedback(store, ["'' AS d0"], where, p.values, p.time(sel.window.start), database,
                                   source=calls_source(database, ()))
    total.complaints = sum(int(r["complaints"]) for r in rows)
    total.rated = sum(int(r["rated"]) for r in rows)
    total.score_sum = sum(float(r["score_sum"] or 0) for r in rows)


def _segment(r: dict, by: Sequence[str], min_calls: int, compare: bool) -> SegmentStats:
    lat = list(r.get("lat") or [])
    lat += [None] * (3 - len(lat))
    calls = int(r["calls"])
    return SegmentStats(
        key={k: str(r[f"d{i}"]) for i, k in enumerate(by)},
        calls=calls, errors=int(r["errors"]), cancelled=int(r["cancelled"]),
        input_tokens=int(r["tin"]), output_tokens=int(r["tout"]), cost_usd=float(r["cost"] or 0.0),
        latency_p50=_num(lat[0]), latency_p95=_num(lat[1]), latency_p99=_num(lat[2]), ttft_p50=_num(r["ttft"]),
        low_confidence=calls < min_calls,
        prev_calls=int(r["prev_calls"]) if compare else None,
        prev_errors=int(r["prev_errors"]) if compare else None,
    )


def _totals(store: Store, sel: Selection, compare: bool, database: str, rollups: bool = True) -> SegmentStats:
    p = _Params()
    window = Window(sel.window.previous().start, sel.window.end) if compare else sel.window
    route, pieces = _plan(store, sel, (), window, database, splits=[sel.window.start], rollups=rollups)
    if any(piece.level for piece in pieces):
        start = p.time(sel.window.start)
        src = _rollup_from(route, pieces, sel, p, database, [], [("cur", lambda tcol: f"{tcol} >= {start}")])
        sql = f"SELECT {_ROLLUP_AGG}\nFROM {src}"
    else:
        where = _where(sel, p, window, database)
        cur = f"Timestamp >= {p.time(sel.window.start)}" if compare else "1"
        sql = (f"SELECT countIf({cur}) AS calls, countIf({cur} AND status = 'error') AS errors, "
               f"countIf({cur} AND status = 'cancelled') AS cancelled, sumIf(input_tokens, {cur}) AS tin, "
               f"sumIf(output_tokens, {cur}) AS tout, sumIf({COST}, {cur}) AS cost, "
               f"countIf(NOT ({cur})) AS prev_calls, countIf(NOT ({cur}) AND status = 'error') AS prev_errors\n"
               f"FROM {calls_table(database)}\nWHERE {where}")
    r = store.query(sql, parameters=p.values)[0]
    return SegmentStats(key={}, calls=int(r["calls"]), errors=int(r["errors"]), cancelled=int(r["cancelled"]),
                        input_tokens=int(r["tin"]), output_tokens=int(r["tout"]), cost_usd=float(r["cost"] or 0.0),
                        prev_calls=int(r["prev_calls"]) if compare else None,
                        prev_errors=int(r["prev_errors"]) if compare else None)


# -- top errors ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ErrorGroup:
    error_type: str
    count: int
    share: float  # of the errors matched
    http_statuses: list[int]
    customers: int
    example_trace_ids: list[str]
    first_seen: str
    last_seen: str
    top_customers: list[str] = dataclasses.field(default_factory=list)  # the customers with most of them (<= 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ErrorsReport:
    selection: Selection
    total_errors: int
    groups: list[ErrorGroup]
    error_types: int = 0  # all the error types of the selection; `groups` holds the top `limit` of them

    @property
    def omitted(self) -> tuple[int, int]:
        """The error types past the limit, and their calls."""
        return self.error_types - len(self.groups), self.total_errors - sum(g.count for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {**self.selection.to_dict(), "total_errors": self.total_errors, "error_types": self.error_types,
                "errors": [g.to_dict() for g in self.groups]}


def top_errors(store: Store, sel: Selection, *, limit: int = 10, examples: int = 3,
               database: str = "") -> ErrorsReport:
    """The most frequent error types among the selected calls (status 'error' unless the selection says
    otherwise), each with up to `examples` trace ids to look at with `tagway show`: its newest calls."""
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise QueryInputError("limit must be between 1 and 1000", param="limit")
    if not isinstance(examples, int) or not 1 <= examples <= 20:
        raise QueryInputError("examples must be between 1 and 20", param="examples")
    if sel.status is None:
        sel = dataclasses.replace(sel, status="error")
    if sel.status == "ok" or any(f.key == "status" and f.op == "=" and f.value == "ok" for f in sel.filters):
        # answered calls have no error type: a table of them under "(none)" says nothing (and `--where status=ok`
        # beside the default status=error was an empty list, exit 0)
        raise QueryInputError("status=ok: the errors view lists failed calls; use status error or cancelled "
                              "(tagway stats counts the answered ones)", param="status")
    p = _Params()
    where = _where(sel, p, sel.window, database)
    sql = (f"SELECT error_type, count() AS n, sum(count()) OVER () AS total, count() OVER () AS types, "
           f"groupUniqArray(5)(http_status) AS statuses, uniqIf(customer, customer != '') AS customers, "
           f"topKIf(3)(customer, customer != '') AS top_customers, "
           # the newest calls (ties by trace id): the same examples on every read, whichever process answers
           f"arrayMap(x -> x.2, groupArraySorted({p.add('n', 'UInt32', examples)})"
           f"((-toUnixTimestamp64Nano(Timestamp), trace_id))) AS examples, "
           f"toUnixTimestamp64Micro(min(Timestamp)) AS first_us, toUnixTimestamp64Micro(max(Timestamp)) AS last_us\n"
           f"FROM {calls_table(database)}\nWHERE {where}\nGROUP BY error_type\n"
           f"ORDER BY n DESC, error_type\nLIMIT {p.add('n', 'UInt32', limit)}")
    rows = store.query(sql, parameters=p.values)
    total = int(rows[0]["total"]) if rows else 0
    groups = [ErrorGroup(error_type=r["error_type"], count=int(r["n"]), share=int(r["n"]) / total if total else 0.0,
                         http_statuses=sorted(int(s) for s in r["statuses"] if s), customers=int(r["customers"]),
                         top_customers=list(r["top_customers"]),
                         example_trace_ids=list(r["examples"]), first_seen=_iso_us(r["first_us"]),
                         last_seen=_iso_us(r["last_us"])) for r in rows]
    return ErrorsReport(sel, total, groups, int(rows[0]["types"]) if rows else 0)


# -- one call --------------------------------------------------------------------------------------------------
def parse_trace_id(trace_id: str) -> str:
    tid = (trace_id or "").strip()
    if not TRACE_ID_RE.match(tid):
        why = "at most 128 characters" if len(tid) > 128 else "letters, digits, '-' or '_'" if tid else "an id"
        raise QueryInputError(f"invalid trace id {_show(tid)}: expected {why}", param="trace_id")
    return tid


def get_call(store: Store, trace_id: str, *, database: str = "") -> dict[str, Any] | None:
    """Every column of the call with this trace id (the first one, if a trace holds several), or None.
    Timestamps come back as ISO strings (UTC), `tags` as a dict."""
    tid = parse_trace_id(trace_id)
    p = _Params()
    # the id as given first; a W3C trace id (recorded lower case) copied from a tool that prints it upper case is
    # the same call
    ids = [tid, tid.lower()] if _W3C_TRACE_ID.match(tid) and tid != tid.lower() else [tid]
    sql = (f"SELECT *, toUnixTimestamp64Micro(Timestamp) AS _ts_us FROM {calls_table(database)}\n"
           f"WHERE trace_id IN {p.add('v', 'Array(String)', ids)}\nORDER BY trace_id = {p.add('v', 'String', tid)} "
           f"DESC, Timestamp\nLIMIT 1")
    rows = store.query(sql, parameters=p.values)
    if not rows:
        return None
    row = rows[0]
    ts_us = row.pop("_ts_us")
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "Timestamp":
            v = _iso_us(ts_us)
        elif isinstance(v, dt.datetime):
            v = _iso(v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc))
        elif isinstance(v, float):
            v = _num(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[k] = v
    return out


# -- error rate over time --------------------------------------------------------------------------------------
def choose_step(window: Window) -> int:
    """Bucket size in seconds for a window: the smallest of STEPS giving at most MAX_BUCKETS buckets."""
    for step in STEPS:
        if window.seconds / step <= MAX_BUCKETS:
            return step
    return STEPS[-1]


@dataclasses.dataclass
class Series:
    key: str
    calls: int
    errors: int
    points: list[dict[str, Any]]  # {t, calls, errors, error_rate (None without calls)}

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "calls": self.calls, "errors": self.errors,
                "error_rate": self.errors / self.calls if self.calls else None, "points": self.points}


@dataclasses.dataclass
class TimeSeries:
    selection: Selection
    by: str
    step_seconds: int
    buckets: list[str]
    series: list[Series]
    omitted: int  # series left out by series_limit
    read: dict[str, Any] | None = None  # which tables answered (rollup_read.read_info)

    def to_dict(self) -> dict[str, Any]:
        return {**self.selection.to_dict(), "by": self.by, "step_seconds": self.step_seconds,
                "buckets": self.buckets, "series": [s.to_dict() for s in self.series], "omitted": self.omitted,
                "read": self.read}


def error_timeseries(store: Store, sel: Selection, *, by: str = "customer", step: int | None = None,
                     series_limit: int = 10, min_calls: int = 20, database: str = "",
                     rollups: bool = True) -> TimeSeries:
    """Error rate per bucket for each value of `by` (a tenant by default). The bucket size follows the window
    (choose_step) unless given. Keeps the `series_limit` worst series, worst first: series with at least
    `min_calls` calls before the others, each group by error rate (then calls), so that on a chart a 1-in-2 tenant
    does not push the real problem out of the legend."""
    by = parse_dimension(by, "by")
    if step is None:
        step = choose_step(sel.window)
    if not isinstance(step, int) or step < 1 or sel.window.seconds / step > 10_000:
        raise QueryInputError("step is too small for this window", param="step")
    if not isinstance(series_limit, int) or not 1 <= series_limit <= 100:
        raise QueryInputError("series_limit must be between 1 and 100", param="series_limit")
    _validate_limits(min_calls, 1)
    p = _Params()
    key = _dim_select(by, p)
    st = p.add("s", "UInt32", step)
    route, pieces = _plan(store, sel, [by], sel.window, database, step=step, rollups=rollups)
    if any(piece.level for piece in pieces):
        src = _rollup_from(route, pieces, sel, p, database, [("k", key)],
                           [("b", lambda tcol: f"toUnixTimestamp(toStartOfInterval({tcol}, toIntervalSecond({st}), "
                                               "'UTC'))")], measures=1)
        sql = (f"SELECT b, k, sum(n) AS calls, sumIf(n, status = 'error') AS errors\nFROM {src}\n"
               "GROUP BY b, k\nORDER BY b, k")
    else:
        where = _where(sel, p, sel.window, database)
        sql = (f"SELECT toUnixTimestamp(toStartOfInterval(Timestamp, toIntervalSecond({st}), 'UTC')) AS b, "
               f"{key} AS k, count() AS calls, countIf(status = 'error') AS errors\n"
               f"FROM {calls_source(database, [by])}\nWHERE {where}\nGROUP BY b, k\nORDER BY b, k")
    rows = store.query(sql, parameters=p.values)
    start = int(sel.window.start.timestamp()) // step * step
    end = sel.window.end.timestamp()
    bucket_ts = list(range(start, int(math.ceil(end)), step)) or [start]
    index = {b: i for i, b in enumerate(bucket_ts)}
    per_key: dict[str, list[list[int]]] = {}
    for r in rows:
        counts = per_key.setdefault(str(r["k"]), [[0, 0] for _ in bucket_ts])
        i = index.get(int(r["b"]))
        if i is not None:
            counts[i][0] += int(r["calls"])
            counts[i][1] += int(r["errors"])
    def rank(kv: tuple[str, list[list[int]]]) -> tuple:
        calls, errors = sum(c for c, _ in kv[1]), sum(e for _, e in kv[1])
        return calls < min_calls, -(errors / calls if calls else 0.0), -calls, kv[0]

    ranked = sorted(per_key.items(), key=rank)
    series = []
    for k, counts in ranked[:series_limit]:
        points = [{"t": _iso_us(b * 1_000_000), "calls": c, "errors": e, "error_rate": e / c if c else None}
                  for b, (c, e) in zip(bucket_ts, counts)]
        series.append(Series(k, sum(c for c, _ in counts), sum(e for _, e in counts), points))
    return TimeSeries(sel, by, step, [_iso_us(b * 1_000_000) for b in bucket_ts], series,
                      max(0, len(ranked) - series_limit), read_info(route, pieces))
