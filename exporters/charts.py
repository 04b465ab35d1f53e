"""Calls, error rate, p50/p95 latency and cost over time, one series per value of a chosen dimension: the top N
values by calls, and the rest summed into one "other" series (so a chart's total is the selection's total).
Buckets follow the window like the stats' error-rate series (exporters.queries.choose_step)."""
from __future__ import annotations

import math
from typing import Any

from .calls import Budget, _run
from .queries import Selection, _dim_select, _iso_us, _num, _Params, _where, calls_source, choose_step
from .vocabulary import QueryInputError, parse_dimension

__all__ = ["METRICS", "metrics_timeseries"]

METRICS = ("calls", "error_rate", "p50_ms", "p95_ms", "cost_usd")
TOP_MAX = 20


def metrics_timeseries(store: Any, sel: Selection, *, by: str = "customer", step: int | None = None, top: int = 5,
                       database: str = "", budget: Budget = Budget()) -> dict[str, Any]:
    by = parse_dimension(by, "by")
    if not isinstance(top, int) or not 1 <= top <= TOP_MAX:
        raise QueryInputError(f"top must be between 1 and {TOP_MAX}", param="top")
    step = step or choose_step(sel.window)
    if not isinstance(step, int) or step < 1 or sel.window.seconds / step > 10_000:
        raise QueryInputError("step is too small for this window", param="step")
    p = _Params()
    key = _dim_select(by, p)
    where = _where(sel, p, sel.window, database)
    source = calls_source(database, [by])  # llm_calls, with each call's applied tags when grouped by them
    tops = _run(store, f"SELECT {key} AS k, count() AS c, count() OVER () AS keys\nFROM {source}\n"
                       f"WHERE {where}\nGROUP BY k ORDER BY c DESC, k LIMIT {p.add('n', 'UInt32', top)}",
                p.values, budget, "the chart query")
    named = [str(r["k"]) for r in tops]
    has_other = bool(tops) and int(tops[0]["keys"]) > len(named)
    p2 = _Params()
    key2 = _dim_select(by, p2)
    st = p2.add("s", "UInt32", step)
    where2 = _where(sel, p2, sel.window, database)
    sql = (f"SELECT toUnixTimestamp(toStartOfInterval(Timestamp, toIntervalSecond({st}), 'UTC')) AS b, "
           f"{key2} IN {p2.add('v', 'Array(String)', named)} AS named, if(named, {key2}, '') AS k, "
           "count() AS calls, countIf(status = 'error') AS errors, quantilesBFloat16(0.5, 0.95)(latency_ms) AS lat, "
           f"sum(cost_usd) AS cost\nFROM {source}\nWHERE {where2}\nGROUP BY b, named, k")
    rows = _run(store, sql, p2.values, budget, "the chart query")
    start = int(sel.window.start.timestamp()) // step * step
    buckets = list(range(start, int(math.ceil(sel.window.end.timestamp())), step)) or [start]
    index = {b: i for i, b in enumerate(buckets)}

    def empty(t: int) -> dict[str, Any]:
        return {"t": _iso_us(t * 1_000_000), "calls": 0, "errors": 0, "error_rate": None, "p50_ms": None,
                "p95_ms": None, "cost_usd": 0.0}

    series: dict[tuple[bool, str], list[dict[str, Any]]] = {}
    for k in named:
        series[(True, k)] = [empty(b) for b in buckets]
    if has_other:
        series[(False, "")] = [empty(b) for b in buckets]
    for r in rows:
        pts = series.get((bool(r["named"]), str(r["k"])))
        i = index.get(int(r["b"]))
        if pts is None or i is None:
            continue
        lat = list(r["lat"] or []) + [None, None]
        calls, errors = int(r["calls"]), int(r["errors"])
        pts[i].update(calls=calls, errors=errors, error_rate=errors / calls if calls else None,
                      p50_ms=_num(lat[0]), p95_ms=_num(lat[1]), cost_usd=float(r["cost"] or 0.0))
    out = []
    for (is_named, k), pts in series.items():
        calls = sum(pt["calls"] for pt in pts)
        errors = sum(pt["errors"] for pt in pts)
        out.append({"key": k if is_named else "(other)", "other": not is_named, "calls": calls, "errors": errors,
                    "error_rate": errors / calls if calls else None,
                    "cost_usd": sum(pt["cost_usd"] for pt in pts), "points": pts})
    return {**sel.to_dict(), "by": by, "top": top, "step_seconds": step,
            "buckets": [_iso_us(b * 1_000_000) for b in buckets], "series": out, "metrics": list(METRICS)}
