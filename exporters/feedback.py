"""Feedback and complaints on a call, by trace id (table `llm_feedback`, migration 6): the intake's validation, the
row it stores (time, who, the rated call's customer), and the per-segment numbers `tagway stats` shows beside the
failure rate: `complaint_rate` (calls with a complaint / calls) and `feedback_score` (mean of each rated call's
latest score: `score` in [0, 1], or thumbs up = 1, down = 0).

A rating joins production on `trace_id` (JOIN_SQL). Values reach SQL only as server-side parameters.
"""
from __future__ import annotations

import dataclasses
import re
import secrets
import time
from typing import Any, Sequence

import orjson

from .vocabulary import QueryInputError, show

__all__ = ["TABLE", "THUMBS", "FeedbackInput", "parse_feedback", "feedback_row", "insert_feedback", "call_owner",
           "segment_feedback", "for_trace", "feedback_table", "value_expr", "JOIN_SQL", "MAX_COMMENT_CHARS"]

TABLE = "llm_feedback"
THUMBS = ("up", "down")
MAX_COMMENT_CHARS = 4000
_SOURCE_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")
_TRACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DB_RE = re.compile(r"^[A-Za-z0-9_]{0,64}$")
FIELDS = ("trace_id", "score", "thumbs", "complaint", "comment", "source")
# the value a rating gives a call: its score, else its thumbs
value_expr = "if(score IS NOT NULL, score, multiIf(thumbs = 'up', 1., thumbs = 'down', 0., NULL))"


@dataclasses.dataclass(frozen=True)
class FeedbackInput:
    trace_id: str
    score: float | None = None
    thumbs: str = ""
    complaint: bool = False
    comment: str = ""
    source: str = "api"


def parse_feedback(body: Any, *, max_comment: int = MAX_COMMENT_CHARS) -> FeedbackInput:
    """The request body -> FeedbackInput, or QueryInputError naming the field at fault. A rating says something:
    a score, thumbs, or a complaint (a comment alone is not a rating)."""
    if not isinstance(body, dict):
        raise QueryInputError("the body must be a JSON object", param=None)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise QueryInputError(f"unknown field {show(unknown[0], 40)}: use {', '.join(FIELDS)}", param=unknown[0][:40])
    tid = body.get("trace_id")
    if tid is not None and not isinstance(tid, str):
        raise QueryInputError("trace_id must be a string: the x-tagway-trace-id of the call being rated",
                              param="trace_id")
    if not isinstance(tid, str) or not _TRACE_RE.match(tid):
        raise QueryInputError("trace_id is required: the x-tagway-trace-id of the call being rated", param="trace_id")
    score = body.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1):
        raise QueryInputError("score must be a number from 0 to 1", param="score")
    thumbs = body.get("thumbs")
    if thumbs is not None and thumbs not in THUMBS:
        raise QueryInputError("thumbs must be up or down", param="thumbs")
    complaint = body.get("complaint", False)
    if not isinstance(complaint, bool):
        raise QueryInputError("complaint must be true or false", param="complaint")
    if score is None and thumbs is None and not complaint:
        raise QueryInputError("say something: a score (0-1), thumbs (up|down) or complaint: true", param="score")
    comment = body.get("comment") or ""
    if not isinstance(comment, str):
        raise QueryInputError("comment must be a string", param="comment")
    if len(comment) > max_comment:
        raise QueryInputError(f"comment is too long (at most {max_comment} characters)", param="comment")
    source = body.get("source") or "api"
    if not isinstance(source, str) or not _SOURCE_RE.match(source):
        raise QueryInputError("source must match [a-z0-9_.-]{1,64} (e.g. app, support, csat)", param="source")
    return FeedbackInput(tid, None if score is None else float(score), thumbs or "", complaint, comment, source)


def feedback_row(f: FeedbackInput, *, customer: str, key_id: str, by_admin: bool, now: float | None = None) -> dict:
    return {"Timestamp": time.time() if now is None else now, "feedback_id": secrets.token_hex(8),
            "trace_id": f.trace_id, "customer": customer, "score": f.score, "thumbs": f.thumbs,
            "complaint": f.complaint, "comment": f.comment, "source": f.source, "key_id": key_id,
            "by_admin": by_admin}


def _table(name: str, database: str = "") -> str:
    if not _DB_RE.match(database or ""):
        raise QueryInputError(f"invalid database name {show(database)}", param="database")
    return f"`{database}`.`{name}`" if database else f"`{name}`"


def feedback_table(database: str = "") -> str:
    return _table(TABLE, database)


def insert_feedback(store: Any, rows: Sequence[dict], database: str = "") -> None:
    if rows:
        table = f"{database}.{TABLE}" if database else TABLE
        store.insert_json_rows(table, b"\n".join(orjson.dumps(r) for r in rows))


def call_owner(store: Any, trace_id: str, database: str = "") -> tuple[str, str] | None:
    """(customer, key_id) of the recorded call with this trace id, or None when there is none (yet)."""
    rows = store.query(f"SELECT customer, key_id FROM {_table('llm_calls', database)} WHERE trace_id = {{t:String}} "
                       "ORDER BY Timestamp LIMIT 1", {"t": trace_id})
    return (rows[0]["customer"], rows[0]["key_id"]) if rows else None


def for_trace(store: Any, trace_id: str, *, customer: str | None = None, database: str = "") -> list[dict]:
    """Every rating of one call, oldest first (the case board's "feedback" section); `customer` limits them to
    ratings of that customer's call."""
    where, params = "trace_id = {t:String}", {"t": trace_id}
    if customer is not None:
        where, params = where + " AND customer = {c:String}", {**params, "c": customer}
    return store.query(f"SELECT toFloat64(Timestamp) AS rated_at, score, thumbs, complaint, comment, source, key_id "
                       f"AS rated_by FROM {feedback_table(database)} WHERE {where} ORDER BY Timestamp", params)


def segment_feedback(store: Any, dims: Sequence[str], where: str, params: dict[str, Any], since_param: str,
                     database: str = "", source: str | None = None) -> list[dict]:
    """Per segment of llm_calls (`dims`: SELECT expressions d0, d1, ...; `where`: the selection's conditions over
    llm_calls, already parameterised; `source`: what the stats query reads, when not llm_calls itself, e.g. with
    each call's applied tags) the rated and complained calls: complaints, rated, score_sum. Only calls with
    feedback are read (the bloom-filter index on trace_id takes the IN list)."""
    fb = feedback_table(database)
    # most windows hold no rating: then the join is skipped, whose trace_id scan of llm_calls (bloom index or not)
    # grows with traffic (0.11 s at 100M calls, half the rollups' answer)
    since_names = set(re.findall(r"\{(\w+):", since_param))
    rated = store.query(f"SELECT count() AS n FROM {fb} WHERE Timestamp >= {since_param}",
                        parameters={k: v for k, v in params.items() if k in since_names})
    if not rated or not rated[0]["n"]:
        return []
    group = ", ".join(f"d{i}" for i in range(len(dims)))
    sql = (f"SELECT {', '.join(dims)}, countIf(f_complained) AS complaints, countIf(f_rated) AS rated, "
           f"sumIf(f_value, f_rated) AS score_sum\n"
           f"FROM {source or _table('llm_calls', database)} AS c\n"
           f"INNER JOIN (SELECT trace_id AS f_trace, max(complaint) AS f_complained, "
           f"countIf(v IS NOT NULL) > 0 AS f_rated, argMaxIf(v, Timestamp, v IS NOT NULL) AS f_value "
           f"FROM (SELECT trace_id, Timestamp, complaint, {value_expr} AS v FROM {fb} "
           f"WHERE Timestamp >= {since_param}) GROUP BY trace_id) AS f ON c.trace_id = f.f_trace\n"
           f"WHERE {where} AND c.trace_id IN (SELECT trace_id FROM {fb} WHERE Timestamp >= {since_param})\n"
           f"GROUP BY {group}")
    return store.query(sql, parameters=params)


# A rating beside the call it rates: one join on trace_id.
JOIN_SQL = """SELECT f.Timestamp AS rated_at, f.trace_id AS trace_id, f.score AS score, f.thumbs AS thumbs,
       f.complaint AS complaint, f.comment AS comment, f.key_id AS rated_by, c.customer AS customer,
       c.intent AS intent, c.prompt_version AS prompt_version, c.model_requested AS model, c.status AS status
FROM llm_feedback AS f
INNER JOIN llm_calls AS c ON c.trace_id = f.trace_id
WHERE f.customer = {customer:String}"""
