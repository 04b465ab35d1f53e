"""An evaluation run's results as the terminal table and the JSON document: one row per (evaluator, target) with
its status, field values (or pass/score for a deterministic evaluator) and the Applied Tags column (the tags its
rules matched; a preview applies none and says so), then the tag changes the run made and what it left alone."""
from __future__ import annotations

from typing import Any, Sequence

from exporters.evals import (APPLIED_TAGS, EvalResult, EvalRun, applied_tags, event_fields, result_target,
                             run_document)

__all__ = ["report_json", "print_report", "APPLIED_TAGS"]

report_json = run_document

_MAX_FIELD_COLUMNS = 6


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
    version = run.dataset_version  # a dataset's version ref ('refunds@4') or a bare version ('4')
    dataset = version if version.startswith(f"{run.dataset}@") else \
        f"{run.dataset}@{version}" if version else run.dataset
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
        cells = [r.evaluator, result_target(r), r.customer or "—", status]
        cells += [_cell(r.fields.get(f)) for f in shown]
        if with_pass:
            cells += [_cell(r.passed), _cell(r.score)]
        tags = r.matched_tags if run.mode == "preview" else applied_tags(run, r)
        cells.append(", ".join(tags) or "—")
        t.add_row(*(Text(c) for c in cells))
    console.print(t)
    applied = [e for e in events if event_fields(e)["action"] == "apply"]
    removed = [e for e in events if event_fields(e)["action"] == "remove"]
    if run.mode == "preview":
        console.print(Text("preview: no tag was applied or removed"))
    else:
        console.print(Text(f"tags: {len(applied)} applied, {len(removed)} removed"))
        for e in removed:
            d = event_fields(e)
            console.print(Text(f"  removed {d['tag']} from {d['target_kind']}:{d['target_id']} ({d['actor']}, "
                               f"{d['field']} = {d['field_value']})"))
    errored = [r for r in results if r.status == "errored"]
    if errored:
        console.print(Text(f"{len(errored)} row(s) errored; their tags were left as they were:"))
        for r in errored[:50]:
            console.print(Text(f"  {r.evaluator} {result_target(r)}: {r.error}"))
    if s.get("reconcile_error"):
        console.print(Text(s["reconcile_error"]))
