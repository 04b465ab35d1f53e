"""The report in five formats, pure: the terminal (rich), Markdown, GitHub Markdown (a PR comment), JSON, and a
self-contained HTML page (replay/templates/report.html.j2, jinja2 with autoescape, inline SVG chart, no CDN). Each shows per segment
the paired table (n, before, after, delta with its interval, the flips each way, the adjusted p-value, the verdict)
and, for regression and inconclusive segments, the flipped cases: trace id, input, both answers, the reasons.
"""
from __future__ import annotations

import functools
import io
from typing import Any

import orjson

from exporters.tables import fmt_usd, hidden_notice

from .report import NOT_RUN, CandidateReport, Report, SegmentRow

__all__ = ["render_terminal", "render_markdown", "render_github", "render_json", "render_html", "render", "run_page",
           "FORMATS", "GITHUB_MAX_CHARS"]

MARKS = {"regression": "❌ regression", "inconclusive": "⚠ inconclusive", "ok": "ok", "not run": "not run", "": ""}
# In a terminal ❌ (an emoji: missing from many terminal fonts, two cells wide) is shown as ✗, and a terminal that is
# not UTF-8 gets ASCII stand-ins for every mark, arrow and dash. Markdown, JSON and HTML keep the originals.
_UTF8_TERMINAL = str.maketrans({"❌": "✗"})
_ASCII_TERMINAL = str.maketrans({"❌": "X", "✗": "X", "⚠": "!", "▽": "v", "—": "-", "–": "-", "…": "..", "↓": "v",
                                 "↑": "^", "→": "->"})
SHOWN_FLIPS = 10  # per segment in the terminal, Markdown and HTML (JSON keeps what the report holds)


def _rate(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _delta(v: float | None) -> str:
    return "—" if v is None else f"{round(v, 3) + 0.0:+.3f}"


def _ci(ci: tuple[float, float] | None, signed: bool = False) -> str:
    if ci is None:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    lo, hi = (round(x, 3) + 0.0 for x in ci)  # + 0.0: no "-0.000"
    return f"{f.format(lo)} … {f.format(hi)}"


def _p(v: float | None) -> str:
    return "—" if v is None else "<0.0001" if v < 1e-4 else f"{v:.4f}" if v < 0.01 else f"{v:.3f}"


def _flips(row: SegmentRow) -> str:
    return f"↓{row.pass_fail} ↑{row.fail_pass}"


def _errored(row: SegmentRow) -> str:
    out = str(row.errored) + (f" (+{row.before_errored} baseline)" if row.before_errored else "")
    out += f", {row.excluded} left out" if row.excluded else ""
    yet = " yet" if row.not_run_yet else ""  # the run is still running, it did not stop before them
    return out + (f", {row.not_run} not run{yet}" if row.not_run and row.verdict != NOT_RUN else "")


def _mark(row: SegmentRow) -> str:
    mark = MARKS.get(row.verdict, row.verdict)
    if row.verdict == NOT_RUN:
        mark += f"{' yet' if row.not_run_yet else ''} ({row.not_run} case(s))"
    elif row.verdict == "inconclusive" and row.too_few:
        mark += " (too few" + (f": ~{row.more_cases} more)" if row.more_cases else ")")
    elif row.verdict == "inconclusive" and row.more_cases:
        mark += f" (~{row.more_cases} more)"
    return mark


def _title(c: CandidateReport) -> str:
    return f"candidate {c.candidate}" + (f" ({c.model})" if c.model else "")


def _verdict_word(r: Report) -> str:
    return r.verdict.upper()


def _not_final(r: Report) -> str:
    return "" if r.status == "complete" or r.verdict == r.status else f" (run {r.status}: not final)"


def _headline(r: Report) -> str:
    return f"gate {_verdict_word(r)}{_not_final(r)}, exit {r.exit_code}"


def _gate_line(r: Report) -> str:
    g = r.gating
    fams = g.get("families") or {}
    what = "families, then segments within" if fams else "segments"
    line = (f"paired exact sign test per segment, Holm across {what} at alpha {g.get('alpha'):g}, margin "
            f"{g.get('margin'):g}; inconclusive: {g.get('inconclusive')}; errors: {g.get('errors')}")
    esc = g.get("escalation") or {}
    if r.escalation.get("plans"):
        spent = r.escalation.get("extra_cases", 0)
        line += f"; escalation on ({spent} extra case(s) drawn of max {esc.get('max_cases')})"
    else:
        line += "; escalation off"
    return line


def _segments_by(r: Report) -> str:
    """How the run's cases are segmented: the slice's keys, or a dataset's own segments (set when it was built)."""
    if list(r.segment_by) == ["segment"]:
        return "the dataset's segments"
    return "segments by " + (", ".join(r.segment_by) or "-")


def _context_line(r: Report) -> str:
    out = (f"run {r.run_id} ({r.status}), {_segments_by(r)}, baseline {r.baseline_mode}, "
           f"{r.n_cases} cases")
    if r.dataset and not r.dataset.startswith("run-"):
        out += f", dataset {r.dataset}" + (f" ({len(r.locks)} locked case(s))" if r.locks else "")
    pe = r.production_errors
    if pe:
        n = pe.get("count", 0)
        out += (f"; {n} errored production call(s) in the slice "
                + ("included as cases (their baseline fails)" if pe.get("included") else
                   "left out (include_errors: false)"))
    return out


def _budget_stop(r: Report) -> str:
    """"the budget stopped the run: spent $X of max_cost $Y", or "" for a run its budget did not stop."""
    if not r.stop_reason or r.status == "complete":
        return ""
    return "the budget stopped the run: " + r.stop_reason.removeprefix("budget reached: ")


def _candidate_cost(r: Report, c: CandidateReport, status: bool) -> str:
    """A candidate's cost line; a run its budget stopped says so there (its "OK" covers only what ran)."""
    line = f"cost {fmt_usd(c.cost_usd)}" + (f"   {c.status.upper()}" if status else "")
    stop = _budget_stop(r)
    return line + (f"{' so far' if status else ''} ({stop})" if stop else "")


def _run_cost(r: Report) -> str:
    """The run's cost in its parts (candidates, a re-run baseline, the LLM judge), when it has more than one or its
    budget stopped it; "" otherwise (the candidate's cost line says it all)."""
    parts = [(f"candidate {c.candidate}", c.cost_usd) for c in r.candidates]
    if r.baseline_mode == "rerun":
        parts.append(("baseline (re-run)", r.rerun_baseline_cost_usd))
    if r.judge_cost_usd > 0:
        parts.append(("LLM judge", r.judge_cost_usd))
    stop = _budget_stop(r)
    if len(parts) < 2 and not stop:
        return ""
    line = f"run cost {fmt_usd(r.run_cost_usd)}"
    if len(parts) > 1:
        line += ": " + ", ".join(f"{what} {fmt_usd(usd)}" for what, usd in parts)
    return line + (f"; {stop}" if stop else "")


def _flip_lines(row: SegmentRow) -> list[str]:
    shown = row.flips[:SHOWN_FLIPS]
    head = (f"flipped cases in {row.segment} ({row.verdict}: {row.pass_fail} pass->fail, {row.fail_pass} "
            f"fail->pass; showing {len(shown)} of {row.flips_total}):")
    out = [head]
    for f in shown:
        out += [f"  {f.direction}  trace {f.case_id}", f"    input:     {f.input or '—'}",
                f"    baseline:  {f.baseline or '—'}", f"    candidate: {f.candidate or '—'}",
                f"    why:       {f.reasons}"]
    return out


def _lock_lines(c: CandidateReport) -> list[str]:
    """The locked cases of a candidate: broken ones named (a regression whatever the statistics), then a count."""
    if not c.locks:
        return []
    n = {st: sum(1 for lk in c.locks if lk.state == st) for st in ("held", "broken", "undecided")}
    out = [f"locks: {n['held']} held, {n['broken']} broken" + (f", {n['undecided']} undecided" if n["undecided"]
                                                                  else "")]
    out += [f"  BROKEN {lk.describe()}" for lk in c.locks if lk.state == "broken"]
    return out


def _flipped_rows(c: CandidateReport) -> list[SegmentRow]:
    return [row for row in c.rows if row.verdict in ("regression", "inconclusive") and row.flips]


# -- terminal -----------------------------------------------------------------------------------------------------

def render_terminal(r: Report, console: Any = None) -> str:
    """One table per candidate (seed 001's columns plus the paired evidence), its flipped cases, then the verdict.
    Printed to `console` (colours on a terminal) if given; the plain text is returned either way."""
    from rich.console import Console

    buf = io.StringIO()
    targets = [Console(file=buf, width=150, force_terminal=False, color_system=None)]
    if console is not None:
        targets.append(console)
    plain = {"markup": False, "emoji": False, "highlight": False}  # values come from traffic and specs
    for out in targets:
        glyphs = _UTF8_TERMINAL if out.encoding.lower().replace("-", "") == "utf8" else _ASCII_TERMINAL
        out.print(_context_line(r).translate(glyphs), **plain)
        for c in r.candidates:
            tables = ([(c.families, "families", None)] if c.families else []) + [(c.rows, "segment", c.overall)]
            for rows, first, overall in tables:
                table, hidden = _rich_table(c, rows, first, overall, out, glyphs)
                out.print(table)
                if hidden:
                    out.print(hidden_notice(out, hidden, "--format md, json or html show every column"), **plain)
            for row in _flipped_rows(c):
                out.print("\n".join(_flip_lines(row)).translate(glyphs), **plain)
            for line in _lock_lines(c):
                out.print(line.translate(glyphs), **plain)
            out.print(_candidate_cost(r, c, status=True), **plain)
        if run_cost := _run_cost(r):
            out.print(run_cost.translate(glyphs), **plain)
        out.print(_footer_text(r).translate(glyphs), **plain)
    return buf.getvalue()


def _rich_table(c: CandidateReport, rows: list[SegmentRow], first: str, overall: SegmentRow | None, console: Any,
                glyphs: dict) -> tuple[Any, list[str]]:
    """Every cell and the title are `Text`: segment values and candidate names come from traffic and specs, so a
    `[red]` or `[/]` in them is shown as written, never read as Rich markup. In a narrow terminal whole columns
    are left out (errored, then the interval, p and flips), never a number cut (exporters.tables)."""
    from rich import box
    from rich.text import Text

    from exporters.tables import Col, Row, fit_table

    cols = [Col(first, "left", wrap=True, min_width=16), Col("n"), Col("before"), Col("after"), Col("delta"),
            Col("95% CI delta", priority=4), Col("flips", priority=6), Col("p adj", priority=5),
            Col("verdict", "left", wrap=True), Col("errored", priority=3, wrap=True)]

    def cells(row: SegmentRow) -> list[Text]:
        return [Text(x.translate(glyphs)) for x in (
            row.segment, str(row.n), _rate(row.before), _rate(row.after), _delta(row.delta), _ci(row.delta_ci, True),
            _flips(row), _p(row.p_adjusted), _mark(row), _errored(row))]

    table_rows = [Row(cells(row), "red" if row.verdict == "regression" else
                      "yellow" if row.verdict == "inconclusive" else "dim" if row.verdict == NOT_RUN else None)
                  for row in rows]
    if overall is not None:
        table_rows.append(Row(cells(overall), "bold", section=True))
    title = Text((_title(c) + (" — families" if first == "families" else "")).translate(glyphs))
    return fit_table(console, cols, table_rows, title=title, box=box.SIMPLE_HEAD, title_justify="left",
                     pad_edge=True)


def _footer_text(r: Report) -> str:
    lines = [_gate_line(r), f"VERDICT: {_verdict_word(r)}{_not_final(r)} (exit {r.exit_code})"]
    lines += [f"  - {x}" for x in r.reasons]
    if r.skipped:
        lines.append("skipped: " + "; ".join(f"{n} {why}" for why, n in r.skipped.items()))
    lines += [f"note: {x}" for x in r.notes]
    return "\n".join(lines)


# -- markdown -----------------------------------------------------------------------------------------------------

def _md(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ").replace("`", "'")


_MD_HEAD = ["| {first} | n | before | after | delta | 95% CI delta | flips | p adj | verdict | errored |",
            "|---|---:|---:|---:|---:|---|---:|---:|---|---:|"]


def _md_row(row: SegmentRow, bold: bool = False) -> str:
    cells = [row.segment, row.n, _rate(row.before), _rate(row.after), _delta(row.delta), _ci(row.delta_ci, True),
             _flips(row), _p(row.p_adjusted), _mark(row), _errored(row)]
    b = "**" if bold else ""
    return "| " + " | ".join(f"{b}{_md(x)}{b}" if x != "" else "" for x in cells) + " |"


def _md_flips(row: SegmentRow) -> list[str]:
    shown = row.flips[:SHOWN_FLIPS]
    out = ["", f"<details><summary>Flipped cases in <b>{_html_text(row.segment)}</b> ({row.verdict}: "
               f"{row.pass_fail} pass→fail, {row.fail_pass} fail→pass; showing {len(shown)} of "
               f"{row.flips_total})</summary>", "",
           "| | trace | input | baseline | candidate | why |", "|---|---|---|---|---|---|"]
    for f in shown:
        out.append(f"| {f.direction} | `{_md(f.case_id)}` | {_md(f.input)} | {_md(f.baseline)} | "
                   f"{_md(f.candidate)} | {_md(f.reasons)} |")
    return out + ["", "</details>", ""]


def _html_text(s: str) -> str:
    import html
    return html.escape(s)


def render_markdown(r: Report) -> str:
    icon = "⚠️" if r.status != "complete" else {"passed": "✅", "regression": "❌"}.get(r.verdict, "⚠️")
    out = [f"### tagway replay `{_md(r.run_id)}`: {icon} {_headline(r)}", "", _md(_context_line(r)), "",
           _md(_gate_line(r)), ""]
    for c in r.candidates:
        out += [f"#### {_md(_title(c))}: {c.status}", ""]
        if c.families:
            out += [x.format(first="family") for x in _MD_HEAD] + [_md_row(f) for f in c.families] + [""]
        out += [x.format(first="segment") for x in _MD_HEAD]
        out += [_md_row(row) for row in c.rows]
        out.append(_md_row(c.overall, bold=True))
        for row in _flipped_rows(c):
            out += _md_flips(row)
        out += [f"- {_md(line.strip())}" for line in _lock_lines(c)]
        out += ["", _md(_candidate_cost(r, c, status=False)), ""]
    if run_cost := _run_cost(r):
        out += [_md(run_cost), ""]
    out.append(f"**Verdict: {_verdict_word(r)}{_not_final(r)}** (exit {r.exit_code})")
    out += [f"- {_md(x)}" for x in r.reasons]
    if r.skipped:
        out.append("- skipped: " + "; ".join(f"{n} {_md(why)}" for why, n in r.skipped.items()))
    out += [f"- note: {_md(x)}" for x in r.notes]
    return "\n".join(out) + "\n"


# -- github (a PR comment) -----------------------------------------------------------------------------------------

GITHUB_MAX_CHARS = 60_000  # GitHub refuses a comment over 65,536 characters; leave room for a bot's own header
_GITHUB_ICONS = {"passed": "✅", "regression": "❌"}


def run_page(dashboard_url: str | None, run_id: str) -> str:
    """The dashboard's page of a run (gateway /ui/replays/RUN_ID), or "" without a dashboard URL."""
    from urllib.parse import quote
    return f"{dashboard_url.rstrip('/')}/ui/replays/{quote(run_id, safe='')}" if dashboard_url else ""


def render_github(r: Report, dashboard_url: str | None = None) -> str:
    """GitHub-flavoured Markdown sized for a PR comment: the verdict first, the regression and inconclusive
    segments, the full table collapsed, a link to the run's dashboard page. Past GITHUB_MAX_CHARS the flipped cases
    go first, then the collapsed table is cut, each with a line saying so."""
    for flips, rows in ((True, None), (False, None), (False, 50), (False, 0)):
        text = _github(r, dashboard_url, flips=flips, full_rows=rows)
        if len(text) <= GITHUB_MAX_CHARS:
            return text
    return text[:GITHUB_MAX_CHARS - 40] + "\n\n…(cut to fit a GitHub comment)\n"


def _github(r: Report, dashboard_url: str | None, *, flips: bool, full_rows: int | None) -> str:
    icon = "⚠️" if r.status != "complete" else _GITHUB_ICONS.get(r.verdict, "⚠️")
    page = run_page(dashboard_url, r.run_id)
    run = f"[`{_md(r.run_id)}`]({page})" if page else f"`{_md(r.run_id)}`"
    out = [f"## {icon} tagway gate: {_verdict_word(r)}{_not_final(r)}", "",
           f"Replay run {run}: {len(r.candidates)} candidate(s), {r.n_cases} case(s), "
           f"{_md(_segments_by(r))}" + (f", dataset `{_md(r.dataset)}`" if r.dataset and
                                                        not r.dataset.startswith("run-") else "") + ".", ""]
    out += [f"- {_md(x)}" for x in r.reasons] + [""]
    for c in r.candidates:
        flagged = [row for row in c.rows if row.verdict in ("regression", "inconclusive", NOT_RUN)]
        out += [f"### {_md(_title(c))}: {c.status}", ""]
        if flagged:
            out += [x.format(first="segment") for x in _MD_HEAD] + [_md_row(row) for row in flagged]
            if flips:
                for row in _flipped_rows(c):
                    out += _md_flips(row)
            elif any(row.flips for row in flagged):
                out += ["", "_Flipped cases left out to fit a comment: see the run page or `tagway replay report "
                        f"{_md(r.run_id)}`._"]
        else:
            out.append(f"No regression or inconclusive segment among {len(c.rows)}.")
        out += [f"- {_md(line.strip())}" for line in _lock_lines(c)]
        shown = c.rows if full_rows is None else c.rows[:full_rows]
        out += ["", f"<details><summary>All {len(c.rows)} segments</summary>", ""]
        out += [x.format(first="segment") for x in _MD_HEAD] + [_md_row(row) for row in shown]
        out.append(_md_row(c.overall, bold=True))
        if len(shown) < len(c.rows):
            out += ["", f"_{len(c.rows) - len(shown)} more segment(s) left out to fit a comment._"]
        out += ["", "</details>", ""]
    cost = _run_cost(r)
    out += [f"<sub>{_md(_gate_line(r))}; exit {r.exit_code}" + (f"; {_md(cost)}" if cost else "")
            + (f" · [run page]({page})" if page else "") + "</sub>"]
    return "\n".join(out) + "\n"


# -- json ---------------------------------------------------------------------------------------------------------

def render_json(r: Report) -> str:
    return orjson.dumps(r.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n"


# -- html ---------------------------------------------------------------------------------------------------------

@functools.cache
def _templates() -> Any:
    import jinja2
    # autoescape on: segment values, candidate names, answers and reasons come from traffic and specs
    return jinja2.Environment(loader=jinja2.PackageLoader("replay", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def _chart(c: CandidateReport) -> dict:
    """Geometry of the inline SVG: per segment a baseline bar, a candidate bar and its Wilson interval; a segment
    with no scored pair gets no bar (an empty bar would read as a pass rate of 0)."""
    left, bar_w, row_h = 190, 420, 34
    bars = []
    for i, row in enumerate(c.rows):
        bar: dict[str, Any] = {"row": row, "y": 24 + i * row_h, "before": _rate(row.before),
                               "after": _rate(row.after), "delta": _delta(row.delta), "errored": _errored(row),
                               "mark": _mark(row), "scored": row.n > 0}
        if row.n > 0:
            lo, hi = row.after_ci or (0.0, 1.0)
            bar.update(before_w=(row.before or 0.0) * bar_w, after_w=(row.after or 0.0) * bar_w,
                       ci_x1=left + lo * bar_w, ci_x2=left + hi * bar_w,
                       colour={"regression": "#dc2626", "inconclusive": "#d97706"}.get(row.verdict, "#2563eb"))
        bars.append(bar)
    return {"left": left, "bar_w": bar_w, "width": left + bar_w + 70, "height": 30 + row_h * len(c.rows) + 10,
            "bars": bars}


def _cells(row: SegmentRow) -> dict:
    return {"row": row, "before": _rate(row.before), "after": _rate(row.after), "delta": _delta(row.delta),
            "delta_ci": _ci(row.delta_ci, True), "before_ci": _ci(row.before_ci), "after_ci": _ci(row.after_ci),
            "flips": _flips(row), "p": _p(row.p_adjusted), "mark": _mark(row), "errored": _errored(row)}


def render_html(r: Report) -> str:
    """A self-contained page (inline CSS and SVG, no CDN) from replay/templates/report.html.j2."""
    candidates = [{"report": c, "title": _title(c), "cost": _candidate_cost(r, c, status=False),
                   "rows": [_cells(row) for row in c.rows], "families": [_cells(f) for f in c.families],
                   "overall": _cells(c.overall), "chart": _chart(c),
                   "flipped": [(row, row.flips[:SHOWN_FLIPS]) for row in _flipped_rows(c)]}
                  for c in r.candidates]
    skipped = "; ".join(f"{n} {why}" for why, n in r.skipped.items())
    return _templates().get_template("report.html.j2").render(
        r=r, candidates=candidates, headline=_headline(r), verdict_word=_verdict_word(r), gate_line=_gate_line(r),
        context=_context_line(r), skipped=skipped, run_cost=_run_cost(r))


FORMATS = {"table": render_terminal, "md": render_markdown, "github": render_github, "json": render_json,
           "html": render_html}


def render(r: Report, fmt: str, *, dashboard_url: str | None = None) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
    return render_github(r, dashboard_url) if fmt == "github" else FORMATS[fmt](r)

