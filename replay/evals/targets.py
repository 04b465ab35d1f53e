"""What an evaluation run evaluates: a dataset's rows (recorded calls, by trace id) turned into targets.

- message mode: each row is a target, the call itself (its messages and its recorded answer);
- session mode: the rows' sessions are the targets, each with all of its recorded calls in order (the session's
  production calls, not only the ones in the dataset). Rows whose call has no session id are named and counted.

`load_rows` is the one seam to the datasets: a versioned dataset (`refunds`, the latest version, or `refunds@3`),
a pinned dataset id or a JSONL file of cases, as replay.datasets.resolve reads them; `name` is what a delta run
compares against (the rows an evaluator already covered on it): a versioned dataset's name, whatever its version,
so a delta run on `refunds@4` scores the rows added since the evaluator's last run on `refunds`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from exporters.tagstate import MESSAGE, SESSION, session_target_id
from exporters.vocabulary import NON_PRODUCTION_SOURCES

from ..datasets.resolve import resolve
from ..slice import CONTENT_COLUMNS, Case, case_from_row

__all__ = ["DatasetRows", "EvalTarget", "Skipped", "load_rows", "message_targets", "session_targets",
           "NO_SESSION", "NO_CONTENT"]

NO_SESSION = "no session id (the call was sent without x-tagway-session-id or metadata.session_id)"
NO_CONTENT = "no captured content for the session's calls"
_CHUNK = 2000


@dataclasses.dataclass
class DatasetRows:
    name: str  # the dataset a delta run compares against: a versioned dataset's name, an id or a file path
    ref: str  # what was asked for
    cases: list[Case]  # the rows that have content, in dataset order
    skipped: dict[str, int]  # rows without content, by reason
    version: str = ""


@dataclasses.dataclass
class EvalTarget:
    kind: str  # message | session
    id: str  # trace id, or <customer>/<session id>
    customer: str
    calls: list[Case]  # what the evaluator sees, in order
    dataset_rows: list[str]  # the dataset's trace ids this target covers


@dataclasses.dataclass
class Skipped:
    """Dataset rows that became no target, and why."""
    reason: str
    trace_ids: list[str]


def load_rows(store: Any, ref: str) -> DatasetRows:
    """A dataset's rows with their content. Raises DatasetStoreError / DatasetError for an unknown or bad dataset."""
    found = resolve(store, ref)
    return DatasetRows(name=found.name, ref=ref, cases=found.cases, skipped=found.skipped,
                       version=found.dataset_id if found.name != found.dataset_id else "")


def message_targets(rows: Sequence[Case]) -> list[EvalTarget]:
    return [EvalTarget(MESSAGE, c.case_id, c.customer, [c], [c.case_id]) for c in rows]


def _sessions_of(store: Any, trace_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """trace id -> (customer, session id) of the recorded call."""
    out: dict[str, tuple[str, str]] = {}
    ids = sorted(set(trace_ids))
    for i in range(0, len(ids), _CHUNK):
        for r in store.query("SELECT trace_id, customer, session_id FROM llm_calls WHERE trace_id IN "
                             "{ids:Array(String)} AND replay_run_id = '' LIMIT 1 BY trace_id",
                             {"ids": ids[i:i + _CHUNK]}):
            out[r["trace_id"]] = (r["customer"], r["session_id"])
    return out


def _session_calls(store: Any, target_ids: Sequence[str]) -> dict[str, list[Case]]:
    """target id -> the session's production calls with content, oldest first."""
    out: dict[str, list[Case]] = {}
    for i in range(0, len(target_ids), _CHUNK):
        rows = store.query(
            f"SELECT {CONTENT_COLUMNS}, concat(customer, '/', session_id) AS target FROM llm_calls WHERE "
            "session_id != '' AND concat(customer, '/', session_id) IN {ids:Array(String)} AND replay_run_id = '' "
            "AND source NOT IN {excluded:Array(String)} ORDER BY Timestamp LIMIT 1 BY trace_id",
            {"ids": list(target_ids[i:i + _CHUNK]), "excluded": list(NON_PRODUCTION_SOURCES)})
        for r in sorted(rows, key=lambda r: (r["ts_ms"], r["trace_id"])):
            case, _ = case_from_row(r, r["target"])
            if case is not None:
                out.setdefault(r["target"], []).append(case)
    return out


def session_targets(store: Any, rows: Sequence[Case]) -> tuple[list[EvalTarget], list[Skipped]]:
    """The sessions of the rows (in the order their first row appears), each with its calls; the rows without a
    session id, and sessions with no captured content, as Skipped."""
    sessions = _sessions_of(store, [c.case_id for c in rows])
    order: dict[str, list[str]] = {}
    customers: dict[str, str] = {}
    no_session: list[str] = []
    for c in rows:
        customer, sid = sessions.get(c.case_id, (c.customer, ""))
        if not sid:
            no_session.append(c.case_id)
            continue
        tid = session_target_id(customer, sid)
        order.setdefault(tid, []).append(c.case_id)
        customers[tid] = customer
    calls = _session_calls(store, list(order))
    targets, skipped = [], [Skipped(NO_SESSION, no_session)] if no_session else []
    empty = [t for t in order if not calls.get(t)]
    if empty:
        skipped.append(Skipped(NO_CONTENT, [tr for t in empty for tr in order[t]]))
    for tid, covered in order.items():
        if calls.get(tid):
            targets.append(EvalTarget(SESSION, tid, customers[tid], calls[tid], covered))
    return targets, skipped

