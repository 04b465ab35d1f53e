"""One case, on one screen (seed 004's case board): the production trace, every replay result for it across runs
(candidate, output, evaluator verdicts and reasons, judge version) with a word diff of the baseline's output
against each candidate's, and the sections other parts of tagway record about a trace.

Sections plug in: each `CaseSection` names the table it reads and a function returning rows (dicts, shown as a
table by the page and the CLI). A section appears once its table exists in the store, so the datasets, labels,
feedback and tag-audit work adds one entry to SECTIONS and nothing else changes. Today: the datasets that hold the
trace (versioned and pinned), its labels and locks, its feedback and the audit log of its applied tags.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Callable

from . import calls, datasets, feedback, replays, tagstate
from .store import Store

__all__ = ["CaseSection", "SECTIONS", "PLANNED_SECTIONS", "case_view", "word_diff", "sections_for"]


@dataclasses.dataclass(frozen=True)
class CaseSection:
    name: str
    title: str
    table: str  # the section appears once this table exists
    # (store, trace_id, customer or None, database) -> rows; `customer` limits them for a tenant key
    fetch: Callable[[Any, str, str | None, str], list[dict[str, Any]]]


def _datasets(store: Any, trace_id: str, customer: str | None, database: str) -> list[dict[str, Any]]:
    """The versioned datasets holding the trace (their latest versions), then the pinned ones (a replay run's
    cases, `replay dataset save`)."""
    return datasets.holding_trace(store, trace_id) + replays.datasets_for_trace(store, trace_id, database=database)


def _labels(store: Any, trace_id: str, customer: str | None, database: str) -> list[dict[str, Any]]:
    return datasets.cases_for_trace(store, trace_id)


def _feedback(store: Any, trace_id: str, customer: str | None, database: str) -> list[dict[str, Any]]:
    return feedback.for_trace(store, trace_id, customer=customer, database=database)


def _tag_audit(store: Any, trace_id: str, customer: str | None, database: str) -> list[dict[str, Any]]:
    """Every change of the call's applied tags (tag rules and people), oldest first."""
    return [{"changed_at": e["event_time"], "tag": e["tag"], "action": e["action"], "by": e["actor"],
             "run": f"{e['run_id']} ({e['mode']})" if e["run_id"] else "",
             "field value": f"{e['field']} = {e['field_value']}" if e["field"] else ""}
            for e in tagstate.audit(store, tagstate.Target(tagstate.MESSAGE, trace_id), database=database)]


SECTIONS: list[CaseSection] = [
    CaseSection("datasets", "In datasets", "replay_datasets", _datasets),
    CaseSection("labels", "Labels and locks", "dataset_cases", _labels),  # versioned datasets (issue 12)
    CaseSection("feedback", "Feedback", "llm_feedback", _feedback),
    CaseSection("tag_audit", "Tag audit", "tag_events", _tag_audit),
]
# Sections whose tables a store may not have yet (its schema predates them): named here so the page and the CLI say
# they are not recorded rather than leave the reader guessing.
PLANNED_SECTIONS = {"labels": "Labels and locks", "feedback": "Feedback", "tag_audit": "Tag audit"}


def _existing_tables(store: Any, database: str) -> set[str]:
    db = "{db:String}" if database else "currentDatabase()"
    rows = store.query(f"SELECT name FROM system.tables WHERE database = {db}",
                       parameters={"db": database} if database else None)
    return {r["name"] for r in rows}


def sections_for(store: Any, trace_id: str, *, customer: str | None = None,
                 database: str = "") -> list[dict[str, Any]]:
    tables = _existing_tables(store, database)
    out = [{"name": s.name, "title": s.title, "rows": s.fetch(store, trace_id, customer, database)}
           for s in SECTIONS if s.table in tables]
    present = {s["name"] for s in out}
    out += [{"name": n, "title": t, "rows": None} for n, t in PLANNED_SECTIONS.items() if n not in present]
    return out


_TOKEN = re.compile(r"\s+|\w+|[^\w\s]", re.UNICODE)


def word_diff(a: str, b: str) -> list[list[str]]:
    """[op, text] runs turning `a` into `b`, word by word: "=" kept, "-" only in a, "+" only in b. A change reads
    as one deletion then one insertion: whitespace kept between two changed words is folded into both."""
    ta, tb = _TOKEN.findall(a or ""), _TOKEN.findall(b or "")
    runs: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if tag == "equal":
            runs.append(("=", "".join(ta[i1:i2])))
            continue
        if i2 > i1:
            runs.append(("-", "".join(ta[i1:i2])))
        if j2 > j1:
            runs.append(("+", "".join(tb[j1:j2])))
    out: list[list[str]] = []
    block: list[tuple[str, str]] = []

    def flush() -> None:
        gone = "".join(t for op, t in block if op in "-~")
        new = "".join(t for op, t in block if op in "+~")
        out.extend([op, t] for op, t in (("-", gone), ("+", new)) if t)
        block.clear()

    for i, (op, text) in enumerate(runs):
        between = 0 < i < len(runs) - 1 and runs[i - 1][0] != "=" and runs[i + 1][0] != "="
        if op == "=" and not (text.isspace() and between):
            flush()
            out.append(["=", text])
        else:
            block.append(("~" if op == "=" else op, text))
    flush()
    return out


def case_view(store: Store, trace_id: str, *, customer: str | None = None, max_chars: int | None = None,
              database: str = "") -> dict[str, Any] | None:
    """The production call (calls.call_detail), its replay results grouped by run with the baseline's output
    diffed against each candidate's, and the sections. None when the call does not exist for this reader."""
    call = calls.call_detail(store, trace_id, customer=customer, max_chars=max_chars, database=database)
    if call is None:
        return None
    results = replays.results_for_case(store, call["trace_id"], customer=customer, database=database)
    runs: list[dict[str, Any]] = []
    for r in results:
        if not runs or runs[-1]["run_id"] != r["run_id"]:
            runs.append({"run_id": r["run_id"], **r["run"], "baseline": None, "candidates": []})
        run = runs[-1]
        entry = {k: r.get(k) for k in ("candidate", "status", "passed", "score", "error", "evaluations", "output",
                                       "model", "judge_version", "replay_trace_id", "latency_ms", "cost_usd",
                                       "segment", "at")}
        if r["candidate"] == replays.BASELINE:
            run["baseline"] = entry
        else:
            run["candidates"].append(entry)
    for run in runs:
        base = run["baseline"]
        for c in run["candidates"]:
            c["diff"] = word_diff(base["output"] or "", c["output"] or "") if base else None
            c["flip"] = (None if base is None or {base["status"], c["status"]} != {"passed", "failed"}
                         else "regressed" if base["status"] == "passed" else "fixed")
    return {"trace_id": call["trace_id"], "call": call, "runs": runs,
            "sections": sections_for(store, call["trace_id"], customer=customer, database=database)}
