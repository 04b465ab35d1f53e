"""Evaluation runs in ClickHouse (migration 8): versioned evaluator definitions, runs and per-row results.

- `eval_evaluators`: one row per (name, version); a definition saved again unchanged keeps its version.
- `eval_runs`: append-only versions of a run's row (newest `version` wins at read time, as for replay runs).
- `eval_results`: one row per (run, evaluator, target) with the evaluator version, the row's field values, and the
  tags its rules matched (the Applied Tags column). `dataset_rows` are the dataset's trace ids the row covers, which
  is what a delta run leaves out next time.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable, Sequence

import orjson

from .tagstate import TagLock

# the statuses of a finished run whose tags were reconciled (a preview is complete without touching tags)
RECONCILED = ("complete", "incomplete")

APPLIED_TAGS = "Applied Tags"  # the results column: the tags a row's rules met (a preview applies none)

__all__ = ["APPLIED_TAGS", "run_document", "result_target", "applied_tags", "event_fields", "RECONCILED", "EvalRun",
           "EvalResult", "save_evaluator", "get_evaluator", "list_evaluators", "write_run", "get_run", "list_runs",
           "write_results", "read_results", "covered_rows"]


def save_evaluator(store: Any, name: str, definition_json: str, content_hash: str) -> tuple[int, bool]:
    """Store a definition under `name`: (version, created). The same content as the newest version is not a new
    version; versions are numbered 1, 2, ... under a lock, so two saves at once never share a number."""
    with TagLock(store, [f"evaluator-definition:{name}"], run_id="", holder=f"save {name}", wait=30, lease=60):
        rows = store.query("SELECT version, content_hash FROM eval_evaluators WHERE name = {n:String} "
                           "ORDER BY version DESC LIMIT 1", {"n": name})
        if rows and rows[0]["content_hash"] == content_hash:
            return int(rows[0]["version"]), False
        version = int(rows[0]["version"]) + 1 if rows else 1
        store.insert_json_rows("eval_evaluators", orjson.dumps(
            {"name": name, "version": version, "content_hash": content_hash, "definition_json": definition_json,
             "created_at": time.time()}), settings={"insert_distributed_sync": 1})
        return version, True


def get_evaluator(store: Any, name: str, version: int | None = None) -> tuple[int, str] | None:
    """(version, definition json) of `name` at `version` (default: the newest), or None."""
    cond = " AND version = {v:UInt32}" if version is not None else ""
    rows = store.query(f"SELECT version, definition_json FROM eval_evaluators WHERE name = {{n:String}}{cond} "
                       "ORDER BY version DESC LIMIT 1", {"n": name, **({"v": version} if version is not None else {})})
    return (int(rows[0]["version"]), rows[0]["definition_json"]) if rows else None


def list_evaluators(store: Any) -> list[dict]:
    rows = store.query("SELECT name, max(version) AS latest, count() AS versions, "
                       "argMax(definition_json, version) AS definition_json, toFloat64(max(created_at)) AS updated_at "
                       "FROM eval_evaluators GROUP BY name ORDER BY name")
    return [{**r, "version": r.pop("latest")} for r in rows]


@dataclasses.dataclass
class EvalRun:
    run_id: str
    mode: str  # full | delta | preview
    status: str  # running | complete | incomplete (rows errored) | unreconciled (tags left as they were)
    dataset: str = ""
    dataset_version: str = ""
    evaluators: list[str] = dataclasses.field(default_factory=list)  # name@version
    summary: dict = dataclasses.field(default_factory=dict)
    created_at: float = dataclasses.field(default_factory=time.time)
    finished_at: float | None = None


def write_run(store: Any, run: EvalRun) -> None:
    row = {"run_id": run.run_id, "created_at": run.created_at, "finished_at": run.finished_at, "status": run.status,
           "mode": run.mode, "dataset": run.dataset, "dataset_version": run.dataset_version,
           "evaluators": run.evaluators, "summary_json": orjson.dumps(run.summary).decode(),
           "version": time.time_ns()}
    store.insert_json_rows("eval_runs", orjson.dumps(row))


_RUN_COLS = ("status", "mode", "dataset", "dataset_version", "evaluators", "summary_json")


def _runs(store: Any, where: str, params: dict, limit: int, customer: str | None = None) -> list[EvalRun]:
    if customer is not None:  # a tenant sees the runs that evaluated its calls or sessions
        where = (where + " AND " if where else "WHERE ") + ("run_id IN (SELECT run_id FROM eval_results WHERE "
                                                              "customer = {customer:String})")
        params = {**params, "customer": customer}
    latest = ", ".join(f"argMax({c}, version) AS {c}" for c in _RUN_COLS)
    rows = store.query(f"SELECT run_id, {latest}, toFloat64(min(created_at)) AS created_at, "
                       f"toFloat64(argMax(finished_at, version)) AS finished_at FROM eval_runs {where} "
                       "GROUP BY run_id ORDER BY created_at DESC LIMIT {limit:UInt32}", {**params, "limit": limit})
    return [EvalRun(r["run_id"], r["mode"], r["status"], r["dataset"], r["dataset_version"], list(r["evaluators"]),
                    orjson.loads(r["summary_json"] or "{}"), r["created_at"], r["finished_at"]) for r in rows]


def get_run(store: Any, run_id: str, *, customer: str | None = None) -> EvalRun | None:
    """A run (for a tenant: only one that evaluated its calls or sessions)."""
    runs = _runs(store, "WHERE run_id = {run_id:String}", {"run_id": run_id}, 1, customer)
    return runs[0] if runs else None


def list_runs(store: Any, limit: int = 20, *, customer: str | None = None) -> list[EvalRun]:
    return _runs(store, "", {}, limit, customer)


@dataclasses.dataclass
class EvalResult:
    run_id: str
    mode: str
    dataset: str
    evaluator: str
    evaluator_version: int
    target_kind: str  # message | session
    target_id: str  # trace id, or <customer>/<session id>; "" for a dataset row that has no target (skipped)
    customer: str = ""
    dataset_rows: list[str] = dataclasses.field(default_factory=list)
    trace_ids: list[str] = dataclasses.field(default_factory=list)  # the calls the evaluator saw, in order
    status: str = "scored"  # scored | errored | skipped
    error: str = ""
    passed: bool | None = None
    score: float | None = None
    reason: str = ""
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    matched_tags: list[str] = dataclasses.field(default_factory=list)
    timestamp: float = dataclasses.field(default_factory=time.time)

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["Timestamp"] = d.pop("timestamp")
        d["fields"] = orjson.dumps(self.fields).decode()
        return d


def write_results(store: Any, results: Iterable[EvalResult]) -> int:
    lines = [orjson.dumps(r.row()) for r in results]
    for i in range(0, len(lines), 5000):
        store.insert_json_rows("eval_results", b"\n".join(lines[i:i + 5000]))
    return len(lines)


_RESULT_COLS = [f.name for f in dataclasses.fields(EvalResult) if f.name != "timestamp"]


def read_results(store: Any, run_id: str, *, customer: str | None = None) -> list[EvalResult]:
    """A run's rows (for a tenant: its own calls and sessions only)."""
    cond = " AND customer = {customer:String}" if customer is not None else ""
    rows = store.query(f"SELECT {', '.join(_RESULT_COLS)}, toFloat64(Timestamp) AS timestamp FROM eval_results "
                       f"WHERE run_id = {{run_id:String}}{cond} ORDER BY evaluator, Timestamp, target_id",
                       {"run_id": run_id, **({"customer": customer} if customer is not None else {})})
    out = []
    for r in rows:
        r["fields"] = orjson.loads(r["fields"] or "{}")
        r["dataset_rows"], r["trace_ids"], r["matched_tags"] = (list(r["dataset_rows"]), list(r["trace_ids"]),
                                                                list(r["matched_tags"]))
        out.append(EvalResult(**r))
    return out


def covered_rows(store: Any, evaluator: str, dataset: str) -> set[str]:
    """The dataset rows (trace ids) `evaluator` already covered in a full or delta run on `dataset` whose tags were
    reconciled: a delta run scores the others (rows whose evaluation errored are not covered: a delta retries
    them)."""
    rows = store.query("SELECT DISTINCT arrayJoin(dataset_rows) AS t FROM eval_results WHERE evaluator = {e:String} "
                       "AND dataset = {d:String} AND mode IN ('full', 'delta') AND status != 'errored' AND run_id IN "
                       "(SELECT run_id FROM eval_runs GROUP BY run_id HAVING argMax(status, version) IN "
                       "{done:Array(String)})",
                       {"e": evaluator, "d": dataset, "done": list(RECONCILED)})
    return {r["t"] for r in rows}


# -- the run as one document (the CLI's JSON, the API, the dashboard) -------------------------------------------
def result_target(r: EvalResult) -> str:
    return f"{r.target_kind}:{r.target_id}" if r.target_id else f"(row {', '.join(r.dataset_rows)})"


def applied_tags(run: EvalRun, r: EvalResult) -> list[str]:
    return [] if run.mode == "preview" else list(r.matched_tags)


def run_document(run: EvalRun, results: Sequence[EvalResult], events: Sequence[Any]) -> dict:
    """Everything about a run: its header, each row with its field values and applied tags, the tag changes."""
    return {
        "run_id": run.run_id, "mode": run.mode, "status": run.status, "dataset": run.dataset,
        "dataset_version": run.dataset_version, "evaluators": run.evaluators, "summary": run.summary,
        "rows": [{"evaluator": r.evaluator, "evaluator_version": r.evaluator_version, "target": result_target(r),
                  "target_kind": r.target_kind, "target_id": r.target_id, "customer": r.customer,
                  "status": r.status, "error": r.error, "passed": r.passed, "score": r.score, "reason": r.reason,
                  "fields": r.fields, "trace_ids": r.trace_ids, "applied_tags": applied_tags(run, r),
                  "matched_tags": r.matched_tags} for r in results],
        "tag_changes": [event_fields(e) for e in events],
    }


def event_fields(e: Any) -> dict:
    d = e if isinstance(e, dict) else e.__dict__
    return {k: d[k] for k in ("target_kind", "target_id", "customer", "tag", "action", "actor", "evaluator",
                              "evaluator_version", "rule", "field", "field_value")}
