"""The calls list and one call, over `llm_calls` (and the call's spans in `otel_traces`): what the Calls and Call
pages of the dashboard, `GET /admin/calls` and `GET /v1/tagway/calls[/{trace_id}]` show.

The list is newest first and pages with a keyset cursor on (Timestamp, trace_id), never OFFSET: page 1,000 costs
what page 1 costs. A page is looked for in the most recent stretch of the window first (list_calls), and only the
page's rows are read whole (ClickHouse's lazy materialization reads the captured content of the LIMIT rows only):
~30 ms for a first page at 1M calls, ~110 ms at 10M (bench/ui_bench.py). The selection (window,
filters, status, non-production sources) is the stats' own (exporters.queries.Selection), so a link from a failing
segment lists exactly the calls that segment counted.

Free-text search (`search`) looks for a substring, case-insensitive, in the captured content (input messages,
system instructions, output messages) and matches a trace id exactly. Content is not indexed, so a search reads
the content of every call in the window: every query here runs under a `Budget` (seconds, and optionally rows
read), and one that would exceed it raises `QueryTooHeavyError` with a message saying what to narrow.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import re
from typing import Any

import orjson

from . import semconv as sc
from .queries import _EPOCH, Selection, _Params, _where, calls_table, get_call, parse_trace_id
from .store import Store, StoreError
from .vocabulary import QueryInputError, Window, show

__all__ = ["Budget", "QueryTooHeavyError", "Cursor", "CallsPage", "list_calls", "call_detail", "truncate_json_text",
           "session_filter", "SESSION_TAG_KEYS", "LIST_COLUMNS", "table_name"]

PAGE_DEFAULT = 50
# How far back from the top of a page the list looks first, then next (see list_calls); then the whole window.
LOOKBACK = (dt.timedelta(minutes=15), dt.timedelta(hours=3), dt.timedelta(days=1), dt.timedelta(days=7))
PAGE_MAX = 500
SEARCH_MAX_LEN = 200
EXCERPT_CHARS = 200
# A conversation is linked to the calls of its session through the first of these tags it carries (a session id
# column, once the gateway records one, comes first: see session_filter).
SESSION_TAG_KEYS = ("session_id", "session", "conversation_id", "thread_id")
_DB_RE = re.compile(r"^[A-Za-z0-9_]{0,64}$")

# What a list row shows; the captured content only as short excerpts (the first input part of the last input
# message, the first output part), read for the page's rows only.
LIST_COLUMNS = (
    "toUnixTimestamp64Nano(Timestamp) AS ts_ns, trace_id, customer, intent, prompt_version, tags, operation, "
    "model_requested, model_served, provider, stream, status, error_type, http_status, attempts, latency_ms, "
    "ttft_ms, input_tokens, output_tokens, cost_usd, source, key_id, replay_run_id, replay_case_id, "
    f"left(JSONExtractString(request_json, -1, 'parts', 1, 'content'), {EXCERPT_CHARS}) AS input_excerpt, "
    f"left(JSONExtractString(response_json, 1, 'parts', 1, 'content'), {EXCERPT_CHARS}) AS output_excerpt")


class QueryTooHeavyError(StoreError):
    """A query ran past its Budget (time or rows read). The message says what to narrow."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits for one interactive query: ClickHouse stops it (max_execution_time, max_rows_to_read) instead of the
    page waiting forever. `max_rows` 0 = no row limit."""
    seconds: float = 10.0
    max_rows: int = 0

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"max_execution_time": self.seconds, "timeout_overflow_mode": "throw"}
        if self.max_rows:
            s.update(max_rows_to_read=self.max_rows, read_overflow_mode="throw")
        return s


_TOO_HEAVY = ("TIMEOUT_EXCEEDED", "Timeout exceeded", "TOO_MANY_ROWS", "Limit for rows")


def _run(store: Store, sql: str, params: dict, budget: Budget, what: str) -> list[dict]:
    try:
        return store.query(sql, parameters=params, settings=budget.settings())
    except StoreError as e:
        if any(m in str(e) for m in _TOO_HEAVY):
            raise QueryTooHeavyError(
                f"{what} took too long (over {budget.seconds:g} s"
                + (f" or {budget.max_rows:,} rows read" if budget.max_rows else "")
                + "): narrow the time window, add filters, or search for a longer phrase") from e
        raise


def table_name(table: str, database: str = "") -> str:
    if not _DB_RE.match(database or ""):
        raise QueryInputError(f"invalid database name {show(database)}", param="database")
    return f"`{database}`.`{table}`" if database else f"`{table}`"


# -- the keyset cursor -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cursor:
    """The position after the last row of a page: (Timestamp in ns, trace id). Opaque to clients (base64url)."""
    ts_ns: int
    trace_id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(f"{self.ts_ns}:{self.trace_id}".encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> "Cursor":
        raw = (text or "").strip()
        try:
            decoded = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
            ts, tid = decoded.split(":", 1)
            cursor = cls(int(ts), parse_trace_id(tid))
        except (ValueError, binascii.Error, UnicodeDecodeError, QueryInputError):
            raise QueryInputError(f"invalid cursor {show(raw, 40)}: pass the `next` value of the previous page "
                                  "as it is", param="cursor") from None
        if not 0 <= cursor.ts_ns < 2**63:  # an Int64 of nanoseconds, as the pages' cursors are made
            raise QueryInputError("invalid cursor: its time is out of range", param="cursor")
        return cursor


@dataclasses.dataclass
class CallsPage:
    selection: Selection
    search: str | None
    dataset: str | None
    segment: str | None
    calls: list[dict[str, Any]]
    next: Cursor | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.selection.to_dict(), "search": self.search, "dataset": self.dataset,
                "segment": self.segment, "calls": self.calls, "next": self.next.encode() if self.next else None}


def _iso_ns(ns: int) -> str:
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.timezone.utc).replace(microsecond=(ns // 1000) % 1_000_000)
    return t.isoformat().replace("+00:00", "Z")


def _list_row(r: dict) -> dict[str, Any]:
    out = dict(r)
    out["Timestamp"] = _iso_ns(int(out.pop("ts_ns")))
    out["tags"] = dict(out.get("tags") or {})
    for k in ("latency_ms", "ttft_ms", "cost_usd"):
        v = out.get(k)
        out[k] = None if v is None or v != v else float(v)
    return out


def _page(store: Store, sel: Selection, window: Window, search: str | None, dataset: str | None,
          segment: str | None, limit: int, cursor: Cursor | None, database: str, budget: Budget) -> list[dict]:
    p = _Params()
    where = [_where(sel, p, window, database)]
    if cursor is not None:
        where.append(f"(Timestamp, trace_id) < (fromUnixTimestamp64Nano({p.add('c', 'Int64', cursor.ts_ns)}), "
                     f"{p.add('c', 'String', cursor.trace_id)})")
    if search is not None:
        needle = p.add("q", "String", search)
        where.append(f"(trace_id = {needle} OR positionCaseInsensitiveUTF8(request_json, {needle}) > 0 "
                     f"OR positionCaseInsensitiveUTF8(response_json, {needle}) > 0 "
                     f"OR positionCaseInsensitiveUTF8(system_instructions, {needle}) > 0)")
    if dataset:
        in_segment = f" AND segment = {p.add('d', 'String', segment)}" if segment is not None else ""
        where.append(f"trace_id IN (SELECT trace_id FROM {table_name('replay_datasets', database)} "
                     f"WHERE dataset_id = {p.add('d', 'String', dataset)}{in_segment})")
    sql = (f"SELECT {LIST_COLUMNS}\nFROM {calls_table(database)}\nWHERE {' AND '.join(where)}\n"
           f"ORDER BY Timestamp DESC, trace_id DESC\nLIMIT {p.add('n', 'UInt32', limit + 1)}")
    return _run(store, sql, p.values, budget, "the search" if search else "the calls query")


def list_calls(store: Store, sel: Selection, *, search: str | None = None, dataset: str | None = None,
               segment: str | None = None, limit: int = PAGE_DEFAULT, cursor: Cursor | None = None,
               database: str = "", budget: Budget = Budget()) -> CallsPage:
    """Calls matching `sel` (and `search`, and membership of `dataset`, in its `segment` when given), newest first,
    `limit` per page, starting after `cursor`. `next` is the cursor of the following page, or None on the last."""
    if not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
        raise QueryInputError(f"limit must be between 1 and {PAGE_MAX}", param="limit")
    search = (search or "").strip() or None
    if search is not None and len(search) > SEARCH_MAX_LEN:
        raise QueryInputError(f"search text is too long (at most {SEARCH_MAX_LEN} characters)", param="q")
    if segment is not None and not dataset:
        raise QueryInputError("segment needs dataset (the segment a dataset's case was sampled in)", param="segment")
    # Newest first, the page comes from the most recent stretch of the window: look back 15 minutes from the
    # cursor (or the window's end) first, and widen only while that holds fewer than a page. Every call newer than
    # the stretch's start is in it, so a full page from a stretch is the same page the whole window gives; the
    # table's (customer, intent, Timestamp) key lets ClickHouse skip the granules outside the stretch.
    top = min(sel.window.end, _EPOCH + dt.timedelta(microseconds=cursor.ts_ns // 1000)) if cursor else sel.window.end
    for back in LOOKBACK + (None,):
        start = sel.window.start if back is None else max(sel.window.start, top - back)
        rows = _page(store, sel, Window(start, sel.window.end), search, dataset, segment, limit, cursor, database,
                     budget)
        if len(rows) > limit or start == sel.window.start:
            break
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = Cursor(int(rows[-1]["ts_ns"]), rows[-1]["trace_id"]) if more and rows else None
    return CallsPage(sel, search, dataset or None, segment if dataset else None, [_list_row(r) for r in rows], nxt)


# -- one call --------------------------------------------------------------------------------------------------
CONTENT_COLUMNS = ("request_json", "system_instructions", "request_params", "response_json")


def truncate_json_text(text: str, max_chars: int) -> tuple[str, int]:
    """Cut the strings inside a JSON document so their total stays within `max_chars`; each cut string ends with
    a marker saying how much was left out. Returns (JSON text, characters left out). Text that is not JSON is cut
    as text. The document stays valid JSON, so the page can still render it as a conversation."""
    if len(text) <= max_chars:
        return text, 0
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text[:max_chars] + f"...[{len(text) - max_chars} more characters]", len(text) - max_chars
    budget = [max_chars]
    cut = [0]

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            if len(x) <= budget[0]:
                budget[0] -= len(x)
                return x
            keep = max(budget[0], 0)
            budget[0] = 0
            cut[0] += len(x) - keep
            return x[:keep] + f"...[{len(x) - keep} more characters]"
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return x

    out = walk(doc)
    return orjson.dumps(out).decode(), cut[0]


def session_filter(call: dict[str, Any]) -> str | None:
    """The calls-list filter that selects this call's session (`tag.session_id=...`), or None without one."""
    if call.get("session_id"):
        return f"session_id={call['session_id']}"
    tags = call.get("tags") or {}
    for key in SESSION_TAG_KEYS:
        if tags.get(key):
            return f"tag.{key}={tags[key]}"
    return None


def _spans(store: Store, trace_id: str, ts: str, database: str, budget: Budget) -> list[dict]:
    """The call's own spans (the call, and one per attempt when it fell back), within an hour of the call: the
    time bound lets ClickHouse skip every other day's partition, the bloom filter on TraceId the rest."""
    p = _Params()
    t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    sql = (f"SELECT SpanId, ParentSpanId, toUnixTimestamp64Nano(Timestamp) AS ts_ns, Duration, StatusCode, "
           f"StatusMessage, SpanAttributes['tagway.kind'] AS kind, SpanAttributes AS attrs\n"
           f"FROM {table_name('otel_traces', database)}\n"
           f"WHERE TraceId = {p.add('v', 'String', trace_id)} AND Timestamp >= {p.time(t - dt.timedelta(hours=1))} "
           f"AND Timestamp <= {p.time(t + dt.timedelta(hours=1))} AND SpanAttributes['tagway.kind'] IN ('call', 'attempt')\n"
           "ORDER BY Timestamp")
    return _run(store, sql, p.values, budget, "reading the call's spans")


def _attempt(span: dict, call_start_ns: int) -> dict[str, Any]:
    a = span["attrs"]
    return {"attempt": int(a.get("tagway.attempt") or 0), "deployment": a.get("tagway.deployment", ""),
            "provider": a.get("gen_ai.provider.name", ""), "model": a.get("gen_ai.request.model", ""),
            "server_address": a.get("server.address", ""),
            "http_status": int(a.get("http.response.status_code") or 0), "error_type": a.get("error.type", ""),
            "status": "error" if span["StatusCode"] == "Error" else "ok",
            "start_offset_ms": (int(span["ts_ns"]) - call_start_ns) / 1e6,
            "duration_ms": int(span["Duration"]) / 1e6}


def _names(text: str | None) -> list[str]:
    """A span's JSON array of deployment names ([] when absent or not one)."""
    try:
        names = orjson.loads(text) if text else []
    except orjson.JSONDecodeError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def call_detail(store: Store, trace_id: str, *, customer: str | None = None, max_chars: int | None = None,
                database: str = "", budget: Budget = Budget()) -> dict[str, Any] | None:
    """Every column of the call (exporters.queries.get_call) plus `error_message` (the provider's or gateway's
    message, from the span status), `cost_known` (False when the gateway recorded no cost: `cost_usd` is then 0
    but means unknown, not free), `attempts` (per upstream try, when it fell back), `deployments_cooling` and
    `fallbacks_skipped` (deployments it passed over, and why), `session` (the list filter
    of its session) and `truncated` (content column -> characters left out, when `max_chars` cut it).
    None when there is no such call, or it belongs to another customer than `customer`: a tenant cannot tell
    another tenant's trace from one that does not exist."""
    call = get_call(store, trace_id, database=database)
    if call is None or (customer is not None and call.get("customer") != customer):
        return None
    spans = _spans(store, call["trace_id"], call["Timestamp"], database, budget)
    own = next((s for s in spans if s["kind"] == "call" and s["SpanId"] == call.get("span_id")), None)
    call["error_message"] = own["StatusMessage"] if own and own["StatusCode"] == "Error" else ""
    # llm_calls stores 0 for a call the gateway gave no cost (a model without a price, a call without token usage:
    # no tagway.cost_usd on its span); the span tells that from a real $0. Without the span (a row written straight
    # into llm_calls) only a cost that is not zero is known to be one.
    call["cost_known"] = (sc.COST_USD in (own["attrs"] or {})) if own else bool(call.get("cost_usd"))
    # a stream cut short: its tokens (and so its cost) are the gateway's estimate, not the provider's count
    call["usage_estimated"] = bool(own) and (own["attrs"] or {}).get(sc.USAGE_ESTIMATED) == "true"
    # why it did or did not fall back: deployments passed over while cooling, fallbacks its tenant may not use
    for key, attr in (("deployments_cooling", sc.DEPLOYMENTS_COOLING), ("fallbacks_skipped", sc.FALLBACKS_SKIPPED)):
        call[key] = _names((own["attrs"] or {}).get(attr)) if own else []
    start_ns = int(own["ts_ns"]) if own else 0
    attempts = [_attempt(s, start_ns) for s in spans if s["kind"] == "attempt"
                and (own is None or s["ParentSpanId"] == own["SpanId"])]
    call["attempts_detail"] = sorted(attempts, key=lambda a: a["attempt"])
    call["session"] = session_filter(call)
    call["truncated"] = {}
    if max_chars is not None:
        for col in CONTENT_COLUMNS:
            text = call.get(col) or ""
            call[col], cut = truncate_json_text(text, max_chars)
            if cut:
                call["truncated"][col] = cut
    return call
