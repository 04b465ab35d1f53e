"""`tagway replay discover RUN_ID`, pure: where do a run's flips concentrate, beyond the segments it was cut by?

Every case of the run is described by what was known before its original call was answered: the recorded columns
that say who asked and how (not its status, error type, served model, output length or latency), every tag, and
derived dimensions (input length in quartile buckets of the run's own cases, the number of user turns). What the
production answer itself was is left out on purpose: the baseline's pass or fail comes from that answer, so a cell
cut by it (short answers, say, where every baseline passed) could only flip one way, and its sign test would flag an
honest candidate (a trial: 23 down, 0 up in the longest-answer bucket of a candidate that flipped 38 down and 33 up
overall). For each (dimension, value) the same paired test as the gate (exact one-sided sign test on the flipped
cases, replay.gate.paired) asks whether the candidate got worse there; Holm across every cell tested keeps the
chance of any false lead at alpha. Cells are ranked by p-value; `lift` is how much likelier a pass->fail flip is
in the cell than in the run. This is how a "document length" regression would show up when the run was cut by
customer (seed 001).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

from .gate import Pairs, holm_adjusted, newcombe_interval, pairs_from, sign_test_drop

__all__ = ["Cell", "DERIVED", "bucket_labels", "turns_label", "describe", "discover"]

DERIVED = {"input_tokens": "input_length"}
# columns of the original call that its answer decided: conditioning on them biases the paired test (see above)
OUTCOME_COLUMNS = frozenset({"status", "error_type", "model_served"})


@dataclasses.dataclass
class Cell:
    dimension: str
    value: str
    n: int
    before: float
    after: float
    delta: float
    delta_ci: tuple[float, float]
    pass_fail: int
    fail_pass: int
    p_value: float
    p_adjusted: float
    lift: float  # pass->fail rate here / in the whole run
    regression: bool  # significant after Holm and the drop beyond margin


def bucket_labels(values: Mapping[str, float | None]) -> dict[str, str]:
    """case -> quartile bucket of its value among the run's cases ("q1 12-80", ...); cases without a value get
    none. Ties stay in one bucket, so there may be fewer than four."""
    known = sorted(v for v in values.values() if v is not None)
    if not known:
        return {}
    # nearest-rank quartiles: a value equal to a cut stays with the quarter below it
    cuts = sorted({known[max(0, math.ceil(len(known) * q / 4) - 1)] for q in (1, 2, 3)})
    bounds = [*cuts, float("inf")]
    groups: dict[int, list[float]] = {}
    which: dict[str, int] = {}
    for case, v in values.items():
        if v is None:
            continue
        i = next(i for i, c in enumerate(bounds) if v <= c)
        groups.setdefault(i, []).append(v)
        which[case] = i
    names = {i: f"q{rank + 1} {_num(min(g))}-{_num(max(g))}" for rank, (i, g) in enumerate(sorted(groups.items()))}
    return {case: names[i] for case, i in which.items()}


def _num(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 10_000 else f"{v:.0f}"


def turns_label(turns: int) -> str:
    return str(turns) if turns <= 2 else "3-4" if turns <= 4 else "5+"


def describe(calls: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """Rows of the original calls (trace_id, the columns, tags, input_tokens, output_tokens, latency_ms, turns) ->
    case -> {dimension: value}."""
    calls = list(calls)
    out: dict[str, dict[str, str]] = {c["trace_id"]: {} for c in calls}
    for c in calls:
        attrs = out[c["trace_id"]]
        for col in columns:
            if col not in OUTCOME_COLUMNS and c.get(col) not in (None, ""):
                attrs[col] = str(c[col])
        for k, v in (c.get("tags") or {}).items():
            attrs[f"tag.{k}"] = str(v)
        if c.get("turns") is not None:
            attrs["turns"] = turns_label(int(c["turns"]))
    for source, dim in DERIVED.items():
        for case, label in bucket_labels({c["trace_id"]: c.get(source) for c in calls}).items():
            out[case][dim] = label
    return out


def discover(outcomes: Mapping[str, tuple[bool, bool]], attrs: Mapping[str, Mapping[str, str]], *, alpha: float,
             margin: float, min_cases: int = 5) -> list[Cell]:
    """Paired test per (dimension, value) over the cases with an outcome; dimensions with one value say nothing
    and are skipped, as are cells under `min_cases`. Ranked by p-value, then by lift."""
    total = pairs_from(outcomes.values())
    base_rate = total.pass_fail / total.n if total.n else 0.0
    cells: dict[tuple[str, str], list[tuple[bool, bool]]] = {}
    for case, o in outcomes.items():
        for dim, value in (attrs.get(case) or {}).items():
            cells.setdefault((dim, value), []).append(o)
    values_per_dim: dict[str, int] = {}
    for dim, _ in cells:
        values_per_dim[dim] = values_per_dim.get(dim, 0) + 1
    tested: dict[tuple[str, str], Pairs] = {k: pairs_from(v) for k, v in cells.items()
                                            if values_per_dim[k[0]] > 1 and len(v) >= min_cases}
    p = {f"{d}\x00{v}": sign_test_drop(pairs) for (d, v), pairs in tested.items()}
    adj = holm_adjusted(p)
    out = []
    for (d, v), pairs in tested.items():
        key = f"{d}\x00{v}"
        rate = pairs.pass_fail / pairs.n
        out.append(Cell(d, v, pairs.n, pairs.before_pass / pairs.n, pairs.after_pass / pairs.n, -pairs.drop,
                        newcombe_interval(pairs), pairs.pass_fail, pairs.fail_pass, p[key], adj[key],
                        rate / base_rate if base_rate else 0.0, adj[key] <= alpha and pairs.drop > margin))
    out.sort(key=lambda c: (c.p_value, -c.lift, c.dimension, c.value))
    return out
