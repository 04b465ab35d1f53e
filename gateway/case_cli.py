"""`tagway show TRACE_ID --cases`: the case view in the terminal, the same data as the dashboard's case page
(exporters.cases.case_view): the production call, then each replay run that used it with the baseline's and each
candidate's output, the evaluator verdicts and reasons, the judge version and a word diff, then the sections."""
from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["print_case"]

_STATUS_STYLE = {"passed": "green", "failed": "bold red", "errored": "yellow"}


def plain_diff(console: Console) -> bool:
    """Mark the diff in text when colours will not show it: no colours (a pipe) or NO_COLOR (rich keeps a colour
    system then, and only drops the colours)."""
    return console.no_color or console.color_system is None


def _diff_text(diff: list[list[str]], plain: bool = False) -> Text:
    """Deleted words red and struck through, inserted ones green; `plain` (no colours: a pipe, NO_COLOR) marks them
    as `git diff --word-diff=plain` does, [-deleted-]{+inserted+}, so the two never run together."""
    out = Text()
    for op, text in diff:
        if plain and op in "-+":
            text = f"[-{text}-]" if op == "-" else f"{{+{text}+}}"
        out.append(text, style={"-": "red strike", "+": "green"}.get(op, ""))
    return out


def _result(title: str, r: dict[str, Any] | None) -> Table:
    t = Table(title=Text(title, style="bold"), title_justify="left", show_header=False, box=None, pad_edge=False)
    t.add_column("field", style="bold", no_wrap=True)
    t.add_column("value")
    if r is None:
        t.add_row("result", "none")
        return t
    status = r.get("status", "")
    t.add_row("result", Text(status + (f"  ({r['flip']})" if r.get("flip") else ""), _STATUS_STYLE.get(status, "")))
    for name, key in (("model", "model"), ("judge version", "judge_version"), ("error", "error"),
                      ("replayed call", "replay_trace_id")):
        if r.get(key):
            t.add_row(name, Text(str(r[key])))
    if r.get("score") is not None:
        t.add_row("score", f"{r['score']:.2f}")
    t.add_row("output", Text(r.get("output") or ""))
    for e in r.get("evaluations") or []:
        verdict = "pass" if e.get("passed") else "fail"
        t.add_row(Text(f"  {e.get('name') or e.get('type')}"),
                  Text(f"{verdict}: {e.get('reason', '')}", "green" if e.get("passed") else "red"))
    return t


def print_case(view: dict[str, Any], console: Console, print_call: Any) -> None:
    """`print_call` is stats_cli.print_call (the production call as `tagway show` prints it)."""
    print_call(view["call"], console)
    runs = view["runs"]
    console.print()
    console.print(Text(f"replays of this case: {len(runs)} run(s)", style="bold"))
    for run in runs:
        console.print()
        head = f"run {run['run_id']}  {run.get('status') or ''}  verdict {run.get('verdict') or '-'}"
        if run.get("spec_name"):
            head += f"  spec {run['spec_name']}"
        if run.get("judge_version"):
            head += f"  judge {run['judge_version']}"
        console.print(Text(head, style="bold"))
        console.print(_result("baseline", run.get("baseline")))
        for cand in run["candidates"]:
            console.print(_result(f"candidate {cand['candidate']}", cand))
            if cand.get("diff") is not None:
                console.print(Text(f"diff baseline -> {cand['candidate']}:", style="bold"))
                console.print(_diff_text(cand["diff"], plain=plain_diff(console)))
    for s in view["sections"]:
        console.print()
        if s["rows"] is None:
            console.print(Text(f"{s['title']}: not recorded in this store yet", style="dim"))
            continue
        console.print(Text(f"{s['title']}: {len(s['rows'])}", style="bold"))
        for row in s["rows"]:
            console.print(Text("  " + "  ".join(f"{k}={_cell(k, v)}" for k, v in row.items())))


def _cell(key: str, value: Any) -> str:
    """A section's value as the page shows it: times (`*_at`, epoch seconds) in UTC, the rest as they are."""
    if key.endswith("_at") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return str(value)
