"""Capturing production traces as dataset cases: each case keeps its trace id, its tags and every vocabulary column
(the shared keys: model, prompt version, intent, customer, source, ...) as they were at capture time, and its
content (request, production answer) so the version replays after `llm_calls` has dropped the call.

A trace that cannot become a case is named with the reason (never recorded or removed by the TTL, recorded without
content, a replayed call), never silently skipped.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import orjson

from exporters.datasets import CaseRecord, get_content
from exporters.vocabulary import COLUMNS, TAG_PREFIX

from ..slice import CONTENT_COLUMNS, NONE_SEGMENT, Case, case_from_row

__all__ = ["Captured", "capture", "segment_for", "content_json", "case_from_content", "MISSING", "NO_CONTENT"]

MISSING = "no call with this trace id in llm_calls (never recorded, or removed by the TTL)"
NO_CONTENT = "recorded without content (content capture was off for that call): nothing to replay"
_CHUNK = 2000


@dataclasses.dataclass
class Captured:
    record: CaseRecord
    case: Case

    @property
    def trace_id(self) -> str:
        return self.record.trace_id


def segment_for(columns: dict[str, str], tags: dict[str, str], segment_by: Sequence[str]) -> str:
    """The segment of a case: its values of the segment keys joined with '/' (as replay.slice.segment_of)."""
    values = [tags.get(k[len(TAG_PREFIX):], "") if k.startswith(TAG_PREFIX) else columns.get(k, "")
              for k in segment_by]
    return "/".join(v or NONE_SEGMENT for v in values)


def content_json(case: Case) -> str:
    """What `dataset_content` stores for a case: the replayable parts (not its labels or segment)."""
    d = case.to_json()
    for k in ("segment", "label", "critique"):
        d.pop(k, None)
    return orjson.dumps(d).decode()


def case_from_content(record: CaseRecord, content: str) -> Case:
    d = orjson.loads(content)
    d.update(case_id=record.trace_id, segment=record.segment, label=record.label, critique=record.critique)
    return Case.from_json(d)


def _columns_select() -> str:
    return ", ".join(f"toString({col}) AS col_{name}" for name, col in COLUMNS.items())


def capture(store: Any, trace_ids: Sequence[str], *, segment_by: Sequence[str] = ("customer",), origin: str,
            added_by: str, now: float | None = None) -> tuple[list[Captured], dict[str, str]]:
    """The cases for `trace_ids` (in that order) and, for those that cannot be cases, trace id -> why. A trace no
    longer in llm_calls still becomes a case when a dataset captured its content before."""
    now = time.time() if now is None else now
    ids = list(dict.fromkeys(trace_ids))
    rows: dict[str, dict] = {}
    for i in range(0, len(ids), _CHUNK):
        for r in store.query(f"SELECT {CONTENT_COLUMNS}, replay_run_id, {_columns_select()} FROM llm_calls "
                             "WHERE trace_id IN {ids:Array(String)} ORDER BY Timestamp LIMIT 1 BY trace_id",
                             {"ids": ids[i:i + _CHUNK]}):
            rows[r["trace_id"]] = r
    out: dict[str, Captured] = {}
    problems: dict[str, str] = {}
    for tid in ids:
        r = rows.get(tid)
        if r is None:
            continue
        if r["replay_run_id"]:
            problems[tid] = f"a replayed call (run {r['replay_run_id']}), not production traffic"
            continue
        columns = {name: r[f"col_{name}"] for name in COLUMNS}
        tags = dict(r["tags"] or {})
        segment = segment_for(columns, tags, segment_by)
        case, why = case_from_row(r, segment)
        if case is None:
            problems[tid] = NO_CONTENT if why and why.startswith("no captured content") else (why or NO_CONTENT)
            continue
        rec = CaseRecord(tid, segment, columns["customer"], columns["intent"], columns["prompt_version"],
                         columns["model"], columns["source"], columns, tags, r["ts_ms"] / 1000, now, added_by, origin)
        out[tid] = Captured(rec, case)
    gone = [t for t in ids if t not in out and t not in problems]
    if gone:  # past the TTL (or never here): a dataset may have captured it before
        for c in _from_datasets(store, gone, segment_by, origin, added_by, now):
            out[c.trace_id] = c
        for t in gone:
            if t not in out:
                problems[t] = MISSING
    return [out[t] for t in ids if t in out], problems


def _from_datasets(store: Any, ids: Sequence[str], segment_by: Sequence[str], origin: str, added_by: str,
                   now: float) -> list[Captured]:
    content = get_content(store, ids)
    if not content:
        return []
    rows = store.query("SELECT trace_id, segment, customer, intent, prompt_version, model, source, columns, tags, "
                       "toFloat64(captured_at) AS captured_at FROM dataset_cases WHERE trace_id IN "
                       "{ids:Array(String)} ORDER BY added_at DESC LIMIT 1 BY trace_id", {"ids": list(content)})
    out = []
    for r in rows:
        columns, tags = dict(r["columns"] or {}), dict(r["tags"] or {})
        rec = CaseRecord(r["trace_id"], segment_for(columns, tags, segment_by), r["customer"], r["intent"],
                         r["prompt_version"], r["model"], r["source"], columns, tags, float(r["captured_at"]), now,
                         added_by, origin)
        out.append(Captured(rec, case_from_content(rec, content[r["trace_id"]])))
    return out
