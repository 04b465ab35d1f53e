"""An evaluation run's results as the terminal table and the JSON document: one row per (evaluator, target) with
its status, field values (or pass/score for a deterministic evaluator) and the Applied Tags column (the tags its
rules matched; a preview applies none and says so), then the tag changes the run made and what it left alone."""
from __future__ import annotations

from typing import Any, Sequence

from exporters.evals import EvalResult, EvalRun

__all__ = ["report_json", "print_report", "APPLIED_TAGS"]

APPLIED_TAGS = "Applied Tags"
_MAX_FIELD_COLUMNS = 6


def _target(r: EvalResult) -> str:
    return f"{r.target_kind}:{r.target_id}" if r.target_id else f"(row {', '.join(r.dataset_rows)})"


def _applied(run: EvalRun, r: EvalResult) -> list[str]:
    return [] if run.mode == "preview" else list(r.matched_tags)


def report_json(run: EvalRun, results: Sequence[EvalResult], events: Sequence[Any]) -> dict:
    """Everything about a run: its header, each row with its field values and applied tags, the tag changes."""
    return {
        "run_id": run.run_id, "mode": run.mode, "status": run.status, "dataset": run.dataset,
        "dataset_version": run.dataset_version, "evaluators": run.evaluators, "summary": run.summary,
        "rows": [{"evaluator": r.evaluator, "evaluator_version": r.evaluator_version, "target": _target(r),
                  "target_kind": r.target_kind, "target_id": r.target_id, "customer": r.customer,
                  "status": r.status, "error": r.error, "passed": r.passed, "score": r.score, "reason": r.reason,
                  "fields": r.fields, "trace_ids": r.trace_ids, "applied_tags": _applied(run, r),
                  "matched_tags": r.matched_tags} for r in results],
        "tag_changes": [_event(e) for e in events],
    }


def _event(e: Any) -> dict:
    d = e if isinstance(e, dict) else e.__dict__
    return {k: d[k] for k in ("target_kind", "target_id", "customer", "tag", "action", "actor", "evaluator",
                              "evaluator_version", "rule", "field", "field_value")}


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v:g}" if isinstance(v, float) else str(v)


def print_report(run: EvalRun, results: Sequence[EvalResult], events: Sequence[Any], console: Any) -> None:
    from rich import box  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    fields = list(dict.fromkeys(k for r in results for k in r.fields))
    shown = fields[:_MAX_FIELD_COLUMNS]
    s = run.summary
    dataset = f"{run.dataset}@{run.dataset_version}" if run.dataset_version else run.dataset
    title = (f"eval run {run.run_id} ({run.mode}) on {dataset}"
             f": {', '.join(run.evaluators)}: {s.get('scored', 0)} scored, {s.get('errored', 0)} errored, "
             f"{s.get('skipped', 0)} skipped")
    t = Table(title=Text(title), box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("evaluator", "target", "customer", "status", *shown):
        t.add_column(col)
    if any(r.passed is not None for r in results):
        t.add_column("pass")
        t.add_column("score", justify="right")
    t.add_column(APPLIED_TAGS + (" (preview: not applied)" if run.mode == "preview" else ""))
    with_pass = any(r.passed is not None for r in results)
    for r in results:
        status = f"{r.status}: {r.error[:80]}" if r.error else r.status
        cells = [r.evaluator, _target(r), r.customer or "—", status]
        cells += [_cell(r.fields.get(f)) for f in shown]
        if with_pass:
            cells += [_cell(r.passed), _cell(r.score)]
        tags = r.matched_tags if run.mode == "preview" else _applied(run, r)
        cells.append(", ".join(tags) or "—")
        t.add_row(*(Text(c) for c in cells))
    console.print(t)
    applied = [e for e in events if _event(e)["action"] == "apply"]
    removed = [e for e in events if _event(e)["action"] == "remove"]
    if run.mode == "preview":
        console.print(Text("preview: no tag was applied or removed"))
    else:
        console.print(Text(f"tags: {len(applied)} applied, {len(removed)} removed"))
        for e in removed:
            d = _event(e)
            console.print(Text(f"  removed {d['tag']} from {d['target_kind']}:{d['target_id']} ({d['actor']}, "
                               f"{d['field']} = {d['field_value']})"))
    errored = [r for r in results if r.status == "errored"]
    if errored:
        console.print(Text(f"{len(errored)} row(s) errored; their tags were left as they were:"))
        for r in errored[:50]:
            console.print(Text(f"  {r.evaluator} {_target(r)}: {r.error}"))
    if s.get("reconcile_error"):
        console.print(Text(s["reconcile_error"]))
