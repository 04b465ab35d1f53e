"""`tagway replay trend`: per segment, the candidate's pass rate in each run over time (the dashboard's trend query,
exporters.replays.trend), with the change against the previous run and against a pinned baseline run, each tested
with the gate's own paired test (replay.gate: the sign test on the cases both runs scored, Holm across the segments
of one comparison, the spec's alpha and margin): a drop it calls a regression is marked.

Runs of different dataset versions replay different cases, and runs scored by different evaluators (or judge
versions) measure different things, so neither is compared or drawn as one line: a series breaks where either
changes (`|` in the sparkline, `break` in JSON) and restarts there.

Pure functions over the query's output; the CLI (replay/cli.py) does the I/O.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .gate import REGRESSION, Evidence, decide, pairs_from

__all__ = ["TrendPoint", "SeriesTrend", "build_trend", "sparkline", "SPARKS"]

SPARKS = "▁▂▃▄▅▆▇█"
BREAK = "|"


@dataclasses.dataclass
class TrendPoint:
    run_id: str
    created_at: float
    dataset: str
    n: int
    rate: float | None  # the candidate's pass rate on the run's cases
    baseline_rate: float | None  # the run's baseline on the same cases
    gate: str  # the run's own gate mark for this segment (regression | inconclusive | ok | "")
    breaks: bool = False  # the dataset version or the evaluators changed since the previous point: not compared
    vs_previous: float | None = None
    previous_regression: bool = False  # the drop from the previous run is a regression by the gate's test
    vs_pinned: float | None = None
    pinned_regression: bool = False


@dataclasses.dataclass
class SeriesTrend:
    segment: str
    candidate: str
    points: list[TrendPoint]

    @property
    def regressed(self) -> bool:
        last = self.points[-1] if self.points else None
        return bool(last and (last.previous_regression or last.pinned_regression or last.gate == REGRESSION))


def sparkline(points: list[TrendPoint]) -> str:
    """One glyph per run (height = pass rate, `·` when nothing was scored), `|` where the dataset version changes."""
    out = []
    for p in points:
        if p.breaks:
            out.append(BREAK)
        out.append("·" if p.rate is None else SPARKS[min(int(p.rate * len(SPARKS)), len(SPARKS) - 1)])
    return "".join(out)


def _compare(series: dict[tuple[str, str], list[dict]], pick: Any, alpha: float, margin: float) -> dict:
    """For each series (segment, candidate) and each point index, the paired drop test against the point `pick`
    chooses (or None); Holm across the series compared at the same run. -> {(series key, index): verdict}."""
    by_run: dict[str, list[tuple[tuple[str, str], int, Any]]] = {}
    for key, pts in series.items():
        for i, p in enumerate(pts):
            ref = pick(pts, i)
            if ref is None:
                continue
            shared = [(ref["outcomes"][c], o) for c, o in p["outcomes"].items()
                      if o is not None and ref["outcomes"].get(c) is not None]
            pairs = pairs_from(shared)
            by_run.setdefault(p["run_id"], []).append((key, i, pairs))
    out = {}
    for items in by_run.values():
        decision = decide([Evidence(f"{k[0]}\x00{k[1]}", (pairs,), (pairs.n,)) for k, _, pairs in items],
                          alpha=alpha, margin=margin)
        verdicts = {f.key: f.verdict for f in decision.segments}
        for k, i, _ in items:
            out[(k, i)] = verdicts.get(f"{k[0]}\x00{k[1]}", "")
    return out


def build_trend(data: dict, *, pinned: str | None, alpha: float, margin: float) -> list[SeriesTrend]:
    """The query's runs and points (with outcomes) -> one series per (segment, candidate), oldest run first.
    `pinned`: the baseline run every point is also compared with (default: the series' first run)."""
    runs = {r["run_id"]: r for r in data["runs"]}
    series: dict[tuple[str, str], list[dict]] = {}
    for seg in data["segments"]:
        for p in seg["points"]:
            series.setdefault((seg["segment"], p["candidate"]), []).append(p)

    def version(p: dict) -> str:  # what a run measured: its cases, and what scored them
        run = runs[p["run_id"]]
        return "\x00".join(str(run.get(k) or "") for k in ("dataset_id", "evaluators_key", "judge_version"))

    def previous(pts: list[dict], i: int) -> dict | None:
        return pts[i - 1] if i and version(pts[i - 1]) == version(pts[i]) else None

    def pinned_point(pts: list[dict], i: int) -> dict | None:
        ref = next((p for p in pts if p["run_id"] == pinned), None) if pinned else pts[0]
        return ref if ref is not None and ref is not pts[i] and version(ref) == version(pts[i]) else None

    prev_v = _compare(series, previous, alpha, margin)
    pin_v = _compare(series, pinned_point, alpha, margin)
    out = []
    for key, pts in sorted(series.items()):
        points = []
        for i, p in enumerate(pts):
            run = runs[p["run_id"]]
            prev, ref = previous(pts, i), pinned_point(pts, i)
            gate = "regression" if p.get("regression") else (p.get("marks") or [""])[0]
            points.append(TrendPoint(
                p["run_id"], float(run.get("created_at") or 0), run.get("dataset_id") or "", int(p.get("n") or 0),
                p.get("after"),
                p.get("before"), gate, breaks=bool(i) and version(pts[i - 1]) != version(p),
                vs_previous=_diff(p, prev), previous_regression=prev_v.get((key, i)) == REGRESSION,
                vs_pinned=_diff(p, ref), pinned_regression=pin_v.get((key, i)) == REGRESSION))
        out.append(SeriesTrend(key[0], key[1], points))
    return out


def _diff(p: dict, ref: dict | None) -> float | None:
    if ref is None or p.get("after") is None or ref.get("after") is None:
        return None
    return p["after"] - ref["after"]


def trend_json(trends: list[SeriesTrend], data: dict, pinned: str | None) -> dict:
    return {"spec": data.get("spec"), "dataset": data.get("dataset"), "pinned": pinned or None,
            "runs": data["runs"],
            "series": [{"segment": t.segment, "candidate": t.candidate, "sparkline": sparkline(t.points),
                        "regressed": t.regressed, "points": [dataclasses.asdict(p) for p in t.points]}
                       for t in trends]}
