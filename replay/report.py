"""Per-segment report, pure: aggregation of case results into segment rows (n, baseline and candidate pass rates,
delta, 95% Wilson intervals, flags) and a weighted mean row, per candidate; renderers for the terminal (rich),
Markdown (PR comments), JSON and a self-contained HTML page (inline SVG chart, no CDN).

Errored results (the gateway failed after its retries, or an evaluator / the judge failed) are not scores: they are
left out of n and the pass rates, counted in their own `errored` column, and make the run incomplete until a
`tagway replay resume` scores them.
"""
from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any, Iterable, Sequence

import orjson

from exporters.queries import wilson_interval as wilson

from .gate import Verdict, evaluate_gate, segment_failures

__all__ = ["wilson", "SegmentRow", "CandidateReport", "Report", "aggregate", "render_terminal", "render_markdown",
           "render_json", "render_html", "render", "FORMATS", "BASELINE"]

BASELINE = "baseline"
ERRORED = "errored"
FAIL_MARK = "❌"
LOW_MARK = "⚠ low n"


@dataclasses.dataclass
class SegmentRow:
    segment: str
    n: int  # candidate cases with a score (passed or failed; errored ones are not counted here)
    after_pass: int
    after: float
    after_ci: tuple[float, float]
    before_n: int = 0  # baseline scores on the same cases
    before_pass: int = 0
    before: float | None = None
    before_ci: tuple[float, float] | None = None
    delta: float | None = None
    errored: int = 0  # candidate results without a score (not in n)
    before_errored: int = 0  # baseline results without a score on the same cases (not in before_n)
    failing: bool = False  # violates threshold or max_drop AND counts for the gate
    below: bool = False  # violates threshold or max_drop (shown even when the gate does not count it)
    low_confidence: bool = False
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CandidateReport:
    candidate: str
    model: str
    rows: list[SegmentRow]
    overall: SegmentRow
    verdict: Verdict
    cost_usd: float = 0.0


@dataclasses.dataclass
class Report:
    run_id: str
    status: str  # complete | incomplete | running
    segment_by: list[str]
    gating: dict[str, Any]
    baseline_mode: str
    candidates: list[CandidateReport]
    passed: bool
    reasons: list[str]
    n_cases: int = 0
    errored: int = 0  # results without a score, all candidates and the baseline: the run is incomplete while > 0
    baseline_cost_usd: float = 0.0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        return d


def _scored(results: Sequence[Any]) -> list[Any]:
    return [r for r in results if r.status != ERRORED]


def _row(segment: str, cand: Sequence[Any], base: dict[str, Any]) -> SegmentRow:
    """One segment: the candidate's scored results, and the baseline's on the cases the candidate scored."""
    scored = _scored(cand)
    n, k = len(scored), sum(1 for r in scored if r.status == "passed")
    row = SegmentRow(segment, n, k, k / n if n else 0.0, wilson(k, n), errored=len(cand) - n)
    paired = [base[r.case_id] for r in scored if r.case_id in base]
    base_scored = _scored(paired)
    row.before_errored = len(paired) - len(base_scored)
    if base_scored:
        bk = sum(1 for r in base_scored if r.status == "passed")
        row.before_n, row.before_pass = len(base_scored), bk
        row.before, row.before_ci = bk / len(base_scored), wilson(bk, len(base_scored))
        row.delta = row.after - row.before
    return row


def aggregate(results: Iterable[Any], gating: Any, *, run_id: str = "", status: str = "complete",
              segment_by: Sequence[str] = (), baseline_mode: str = "logged", models: dict[str, str] | None = None,
              n_cases: int = 0, skipped: dict[str, int] | None = None, notes: Sequence[str] = ()) -> Report:
    """Case results (objects with candidate, case_id, segment, status, cost_usd) -> Report. The baseline's results
    are those of candidate "baseline"; each candidate is compared with the baseline on the same cases."""
    by_cand: dict[str, dict[str, Any]] = {}
    for r in results:
        by_cand.setdefault(r.candidate, {})[r.case_id] = r
    base = by_cand.pop(BASELINE, {})
    reports = []
    for name in sorted(by_cand):
        cases = by_cand[name]
        segments: dict[str, list[Any]] = {}
        for r in cases.values():
            segments.setdefault(r.segment, []).append(r)
        rows = []
        for seg in sorted(segments):
            rows.append(_row(seg, segments[seg], base))
        overall = _row("mean (weighted)", list(cases.values()), base)
        verdict = evaluate_gate(rows, overall, gating)
        for row in rows:
            row.low_confidence = row.n < gating.min_cases_per_segment
            row.problems = segment_failures(row, gating)
            row.below = bool(row.problems)
            row.failing = row.segment in verdict.failing
        overall.problems = segment_failures(overall, gating) if gating.aggregate == "mean" else []
        overall.failing = "mean" in verdict.failing
        reports.append(CandidateReport(name, (models or {}).get(name, ""), rows, overall, verdict,
                                       sum(float(r.cost_usd or 0) for r in cases.values())))
    reasons = [f"{c.candidate}: {x}" if len(reports) > 1 else x for c in reports for x in c.verdict.reasons]
    passed = bool(reports) and all(c.verdict.passed for c in reports)
    if not reports:
        reasons.append("no candidate result: nothing to gate on")
    per_target = {c.candidate: c.overall.errored for c in reports}
    per_target[BASELINE] = sum(1 for r in base.values() if r.status == ERRORED)
    errored = sum(per_target.values())
    if errored:
        if status == "complete":  # a verdict on the cases that happened to score is not the run's verdict
            status = "incomplete"
        by = ", ".join(f"{name} {n}" for name, n in per_target.items() if n)
        reasons.append(f"{errored} errored case result(s) ({by}: gateway errors after retries or evaluator "
                       f"failures) are not counted in the pass rates; `tagway replay resume {run_id}` retries them")
    if status != "complete":
        reasons.append(f"run {status}: the verdict covers only the cases that finished")
    return Report(run_id, status, list(segment_by), _gating_dict(gating), baseline_mode, reports, passed, reasons,
                  n_cases, errored, sum(float(r.cost_usd or 0) for r in base.values()), dict(skipped or {}),
                  list(notes))


def _gating_dict(g: Any) -> dict:
    if hasattr(g, "model_dump"):
        return g.model_dump()
    return {k: getattr(g, k) for k in ("metric", "aggregate", "threshold", "max_drop", "min_cases_per_segment")
            if hasattr(g, k)}


# -- formatting helpers -------------------------------------------------------------------------------------------

def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _delta(v: float | None) -> str:
    return "—" if v is None else f"{v:+.3f}"


def _after(row: SegmentRow) -> str:
    return _rate(row.after if row.n else None)


def _after_ci(row: SegmentRow) -> str:
    return f"{row.after_ci[0]:.3f}–{row.after_ci[1]:.3f}" if row.n else "—"


def _errored(row: SegmentRow) -> str:
    """The errored column: the candidate's results without a score (and the baseline's, if any)."""
    return str(row.errored) + (f" (+{row.before_errored} baseline)" if row.before_errored else "")


def _mark(row: SegmentRow) -> str:
    marks = []
    if row.failing:
        marks.append(FAIL_MARK)
    elif row.below and not row.low_confidence:
        marks.append("▽ not gated")
    if row.low_confidence:
        marks.append(LOW_MARK)
    return "  ".join(marks)


def _gate_line(r: Report) -> str:
    g = r.gating
    extra = f", max_drop {g['max_drop']:g}" if g.get("max_drop") is not None else ""
    return (f"gate {g.get('aggregate')} {g.get('metric', 'pass_rate')} >= {g.get('threshold'):g}{extra}, "
            f"min {g.get('min_cases_per_segment')} cases per segment")


def _not_final(r: Report) -> str:
    return "" if r.status == "complete" else f" (run {r.status}: not final)"


def _title(c: CandidateReport) -> str:
    return f"candidate {c.candidate}" + (f" ({c.model})" if c.model else "")


# -- terminal -----------------------------------------------------------------------------------------------------

def render_terminal(r: Report, console: Any = None) -> str:
    """The seed-001 table (segment, n, before, after, delta, mark), one per candidate, then the verdict. Printed to
    `console` (colours on a terminal) if given; the plain text is returned either way."""
    from rich.console import Console

    buf = io.StringIO()
    targets = [Console(file=buf, width=110, force_terminal=False, color_system=None)]
    if console is not None:
        targets.append(console)
    for out in targets:
        for c in r.candidates:
            out.print(_rich_table(c))
            out.print(f"cost ${c.cost_usd:.4f}   {c.verdict.status.upper()}", markup=False, emoji=False,
                      highlight=False)
        out.print(_footer_text(r), markup=False, emoji=False, highlight=False)  # reasons quote segment values
    return buf.getvalue()


def _rich_table(c: CandidateReport) -> Any:
    """Every cell and the title are `Text`: segment values and candidate names come from traffic and specs, so a
    `[red]` or `[/]` in them is shown as written, never read as Rich markup."""
    from rich import box
    from rich.table import Table
    from rich.text import Text
    t = Table(title=Text(_title(c)), box=box.SIMPLE_HEAD, title_justify="left")
    for col, just in (("segment", "left"), ("n", "right"), ("before", "right"), ("after", "right"),
                      ("delta", "right"), ("errored", "right"), ("", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]

    def cells(row: SegmentRow, mark: str) -> list[Text]:
        return [Text(x) for x in (row.segment, str(row.n), _rate(row.before), _after(row), _delta(row.delta),
                                  _errored(row), mark)]

    for row in c.rows:
        style = "red" if row.failing else "yellow" if row.low_confidence else None
        t.add_row(*cells(row, _mark(row)), style=style)
    t.add_section()
    o = c.overall
    t.add_row(*cells(o, FAIL_MARK if o.failing else ""), style="bold")
    return t


def _footer_text(r: Report) -> str:
    lines = [f"run {r.run_id} ({r.status}), segments by {', '.join(r.segment_by) or '-'}, baseline {r.baseline_mode}",
             _gate_line(r), f"VERDICT: {r.verdict.upper()}{_not_final(r)}"]
    lines += [f"  - {x}" for x in r.reasons]
    if r.skipped:
        lines.append("skipped: " + "; ".join(f"{n} {why}" for why, n in r.skipped.items()))
    lines += [f"note: {x}" for x in r.notes]
    return "\n".join(lines)


# -- markdown -----------------------------------------------------------------------------------------------------

def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(r: Report) -> str:
    icon = "⚠️" if r.status != "complete" else "✅" if r.passed else FAIL_MARK
    out = [f"### tagway replay `{r.run_id}`: {icon} gate {r.verdict}{_not_final(r)}", "",
           f"{_gate_line(r)}; segments by `{', '.join(r.segment_by)}`; baseline {r.baseline_mode}; "
           f"run {r.status}", ""]
    for c in r.candidates:
        out += [f"#### {_md_cell(_title(c))}: {c.verdict.status}", "",
                "| segment | n | before | after | delta | 95% CI after | errored | |",
                "|---|---:|---:|---:|---:|---|---:|---|"]
        for row in c.rows:
            out.append(f"| {_md_cell(row.segment)} | {row.n} | {_rate(row.before)} | {_after(row)} | "
                       f"{_delta(row.delta)} | {_after_ci(row)} | {_errored(row)} | {_md_cell(_mark(row))} |")
        o = c.overall
        out.append(f"| **{o.segment}** | **{o.n}** | **{_rate(o.before)}** | **{_after(o)}** | "
                   f"**{_delta(o.delta)}** | {_after_ci(o)} | **{_errored(o)}** | {FAIL_MARK if o.failing else ''} |")
        out += ["", f"cost ${c.cost_usd:.4f}", ""]
    out.append(f"**Verdict: {r.verdict.upper()}**")
    out += [f"- {_md_cell(x)}" for x in r.reasons]
    if r.skipped:
        out.append("- skipped: " + "; ".join(f"{n} {why}" for why, n in r.skipped.items()))
    out += [f"- note: {_md_cell(x)}" for x in r.notes]
    return "\n".join(out) + "\n"


# -- json ---------------------------------------------------------------------------------------------------------

def render_json(r: Report) -> str:
    return orjson.dumps(r.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"


# -- html ---------------------------------------------------------------------------------------------------------

@functools.cache
def _templates() -> Any:
    import jinja2
    # autoescape on: segment values, candidate names and reasons come from traffic and specs
    return jinja2.Environment(loader=jinja2.PackageLoader("replay", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def _chart(c: CandidateReport, threshold: float) -> dict:
    """Geometry of the inline SVG: per segment a baseline bar, a candidate bar and its Wilson interval."""
    left, bar_w, row_h = 190, 420, 34
    bars = []
    for i, row in enumerate(c.rows):
        lo, hi = row.after_ci
        bars.append({"row": row, "y": 24 + i * row_h, "before": _rate(row.before), "after": _rate(row.after),
                     "delta": _delta(row.delta), "errored": _errored(row),
                     "before_w": None if row.before is None else row.before * bar_w, "after_w": row.after * bar_w,
                     "ci_x1": left + lo * bar_w, "ci_x2": left + hi * bar_w,
                     "colour": "#dc2626" if row.failing else "#d97706" if row.low_confidence else "#2563eb"})
    return {"left": left, "bar_w": bar_w, "width": left + bar_w + 70, "height": 30 + row_h * len(c.rows) + 10,
            "bars": bars, "threshold": f"{threshold:g}", "threshold_x": left + threshold * bar_w}


def _table_row(row: SegmentRow, classes: str, mark: str) -> dict:
    bci = f"{row.before_ci[0]:.3f}–{row.before_ci[1]:.3f}" if row.before_ci else "—"
    return {"row": row, "classes": classes, "before": _rate(row.before), "after": _after(row),
            "delta": _delta(row.delta), "before_ci": bci, "after_ci": _after_ci(row), "errored": _errored(row),
            "mark": mark}


def render_html(r: Report) -> str:
    """A self-contained page (inline CSS and SVG, no CDN) from replay/templates/report.html.j2."""
    candidates = []
    for c in r.candidates:
        rows = [_table_row(row, " ".join(x for x in ("failing" if row.failing else "",
                                                     "low-confidence" if row.low_confidence else "") if x),
                           _mark(row)) for row in c.rows]
        overall = _table_row(c.overall, "mean failing" if c.overall.failing else "mean", "")
        candidates.append({"report": c, "title": _title(c), "rows": rows, "overall": overall,
                           "chart": _chart(c, float(r.gating.get("threshold", 0)))})
    skipped = "; ".join(f"{n} {why}" for why, n in r.skipped.items())
    return _templates().get_template("report.html.j2").render(
        r=r, candidates=candidates, gate_line=_gate_line(r), not_final=_not_final(r), skipped=skipped)


FORMATS = {"table": render_terminal, "md": render_markdown, "json": render_json, "html": render_html}


def render(r: Report, fmt: str) -> str:
    try:
        return FORMATS[fmt](r)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})") from None
