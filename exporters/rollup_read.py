"""The FROM of a stats query read from rollups: one subquery per table of the plan (exporters.rollup_plan), raw
pieces aggregated to the rollups' shape, UNION ALL; the caller's outer query merges them (sums of counts, tokens
and Decimal costs are exact whatever the order; bfloat16 histogram states merge into the same histogram).

Each subquery exposes the caller's dimensions (`d0`, `d1`, ... or `k`, computed on that table: a rollup table has
the llm_calls column names, and the tag rollup is read through `map(tag_key, tag_value) AS tags` so `tags[k]`
works as on llm_calls), the caller's extra columns over the piece's time column (`Timestamp` raw, `bucket` in a
rollup), `status`, and the measures.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from .rollup_plan import Piece, Route
from .rollups import MEASURES, RAW_MEASURES, TAGS

__all__ = ["union_source", "read_info", "MEASURE_ALIASES"]

MEASURE_ALIASES = ("n", "n_in", "n_out", "n_cost", "s_lat", "s_ttft")  # not the column names: outer aliases differ


def union_source(pieces: Sequence[Piece], route: Route, conds: str, dims: Sequence[tuple[str, str]],
                 extras: Sequence[tuple[str, Callable[[str], str]]], time_of: Callable[[Any], str],
                 table_name: Callable[[str], str], measures: int = len(MEASURES),
                 tag_param: str = "") -> str:
    """`dims`: (alias, SQL expression); `extras`: (alias, f(time column) -> SQL); `time_of`: a datetime -> bound SQL
    time; `measures`: how many of MEASURES the caller needs (1 = the count only); `tag_param`: the bound tag key
    of a tag-family route."""
    by_table: dict[str, list[Piece]] = {}
    for piece in pieces:
        by_table.setdefault(piece.table, []).append(piece)
    parts = []
    for table, ps in by_table.items():
        raw = ps[0].level == 0
        tcol = "Timestamp" if raw else "bucket"
        span = " OR ".join(f"({tcol} >= {time_of(p.start)} AND {tcol} < {time_of(p.end)})" for p in ps)
        cols = [f"{e} AS {a}" for a, e in dims] + [f"{f(tcol)} AS {a}" for a, f in extras] + ["status"]
        aliases = MEASURE_ALIASES[:measures]
        if raw:
            cols += [f"{e} AS {a}" for e, a in zip(RAW_MEASURES, aliases)]
            group = [a for a, _ in dims] + [a for a, _ in extras] + ["status"]
            parts.append(f"SELECT {', '.join(cols)} FROM {table_name('llm_calls')} WHERE ({span}) AND {conds} "
                         f"GROUP BY {', '.join(group)}")
            continue
        cols += [f"{c} AS {a}" for c, a in zip(MEASURES, aliases)]
        src = table_name(table)
        if route.family == TAGS.name:
            src = f"(SELECT *, map(tag_key, tag_value) AS tags FROM {src} WHERE tag_key = {tag_param})"
        parts.append(f"SELECT {', '.join(cols)} FROM {src} WHERE ({span}) AND {conds}")
    return "(\n" + "\nUNION ALL\n".join(parts) + "\n)"


def read_info(route: Route, pieces: Sequence[Piece]) -> dict[str, Any]:
    """What `--json` says about the tables read: `source` rollup (any rollup piece) or raw, and why raw."""
    used = any(p.level for p in pieces)
    out: dict[str, Any] = {"source": "rollup" if used else "raw", "pieces": [p.to_dict() for p in pieces]}
    if not used:
        out["reason"] = route.reason or "the window has no whole rollup bucket inside the rollups' coverage"
    return out
