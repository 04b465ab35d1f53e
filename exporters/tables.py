"""Terminal tables that fit the terminal without cutting a number (`tagway stats`, `tagway errors` and the replay
report all print through it; it lives here because exporters is the one package both gateway and replay import).

Rich squeezes a table that is wider than the terminal by truncating cells (`0.0…`). Here a table that would not
fit drops whole columns instead, least important first (the caller ranks them), and says which; label columns
(segment names, trace ids) wrap onto more lines. `wide=True` keeps every column and lets lines run past the
terminal's edge (pipe it to `less -S`, or use --json / --csv).
"""
from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from typing import Any, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["Col", "Row", "fit_table", "hidden_notice", "fmt_usd", "KEEP"]

KEEP = 100  # a priority that is never dropped


@dataclasses.dataclass
class Col:
    header: str
    justify: str = "right"
    priority: int = KEEP  # lower is dropped first when the table does not fit
    wrap: bool = False  # labels and ids may wrap onto more lines; numbers never do
    min_width: int | None = None  # for a wrapping column: narrowest it may get (default: its longest word)


@dataclasses.dataclass
class Row:
    cells: Sequence[Any]
    style: str | None = None
    section: bool = False  # a rule above this row (the total)


def fit_table(console: Console, cols: Sequence[Col], rows: Sequence[Row], *, wide: bool = False,
              **table_kw: Any) -> tuple[Table, list[str]]:
    """The table with the columns that fit `console.width` (all of them when `wide`), and the headers left out."""
    pad_edge = table_kw.pop("pad_edge", False)
    keep = list(range(len(cols)))
    cells = [[r.cells[i] for r in rows] for i in range(len(cols))]
    needs = [_min_width(c, cells[i]) for i, c in enumerate(cols)]
    fixed: dict[int, int] = {}
    if not wide:
        while _table_width([needs[i] for i in keep], pad_edge) > console.width:
            droppable = [i for i in keep if cols[i].priority < KEEP]
            if not droppable:
                break
            keep.remove(min(droppable, key=lambda i: (cols[i].priority, -i)))  # least important, rightmost first
        # rich would squeeze the widest wrapping column only, past what it can take; share the squeeze instead:
        # narrow the widest wrapping column one cell at a time, none below its minimum
        fixed = {i: _natural_width(cols[i], cells[i]) for i in keep if cols[i].wrap}
        excess = _table_width([fixed.get(i) or needs[i] for i in keep], pad_edge) - console.width
        while excess > 0:
            room = [i for i in fixed if fixed[i] > needs[i]]
            if not room:
                break
            widest = max(room, key=lambda i: fixed[i])
            fixed[widest] -= 1
            excess -= 1
    table = Table(pad_edge=pad_edge, **table_kw)
    for i in keep:
        c = cols[i]
        table.add_column(c.header, justify=c.justify, no_wrap=not c.wrap, width=fixed.get(i),  # type: ignore[arg-type]
                         overflow="fold" if c.wrap else "ellipsis")
    for r in rows:
        if r.section:
            table.add_section()
        table.add_row(*(r.cells[i] for i in keep), style=r.style)
    return table, [cols[i].header for i in range(len(cols)) if i not in keep]


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


def _min_width(col: Col, cells: Sequence[Any]) -> int:
    texts = [col.header] + [_plain(c) for c in cells]
    if not col.wrap:
        return max(cell_len(line) for t in texts for line in (t.splitlines() or [""]))
    longest = max((cell_len(w) for t in texts for w in t.split()), default=1)
    return min(longest, col.min_width) if col.min_width else longest


def _natural_width(col: Col, cells: Sequence[Any]) -> int:
    return max(cell_len(line) for t in [col.header, *map(_plain, cells)] for line in (t.splitlines() or [""]))


def _table_width(widths: Sequence[int], pad_edge: bool = False) -> int:
    # one space each side of a cell (not at the outer edges unless pad_edge), and a box character (a space for the
    # simple boxes) between columns and at both ends
    n = len(widths)
    return sum(widths) + 2 * n - (0 if pad_edge else 2) + n + 1 if n else 0


def hidden_notice(console: Console, hidden: Sequence[str], how: str = "--wide shows every column") -> str:
    """The line that says which columns a narrow terminal left out ("" when none were), and how to see them."""
    return f"not shown at {console.width} columns: {', '.join(hidden)} ({how})" if hidden else ""


def fmt_usd(x: float | None, digits: int = 2) -> str:
    """A cost as the CLI and the replay reports print it: from a dollar up to the cent ($12.34, $1,234.50), under
    a dollar to `digits` significant digits ($0.42, $0.015, $0.000027), so a cost that is not zero never prints as
    zero (a model with no price is recorded as 0 and prints $0.00). "-" for None or NaN. Exact values: --json, --csv.
    A spend set against a budget takes more digits (the budget is as precise as it was typed)."""
    if x is None or math.isnan(x):
        return "-"
    if x == 0:
        return "$0.00"
    sign = "-" if x < 0 else ""
    x = abs(x)
    if math.isinf(x):
        return f"{sign}$inf"
    sig = f"{x:#.{digits}g}"  # significant digits, trailing zeros kept (0.0010), maybe as an exponent (2.7e-05)
    if float(sig) >= 1:  # 0.996 rounds up to a dollar: cents from there
        return f"{sign}${x:,.2f}"
    return f"{sign}${format(Decimal(sig), 'f')}"
