"""The gate, pure: per-segment pass rates -> verdict and reasons.

`min_segment` gates on the worst segment, `mean` on the weighted mean (seed 001: a mean of +0.003 hid a -0.149
drop in one customer's refund flow). Segments under `min_cases_per_segment` are low-confidence: printed, never
gated, because one flipped case in six moves the rate by 16 points. `max_drop` is a per-segment limit on the
drop against the baseline and applies with either aggregate.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

__all__ = ["SegmentLike", "Verdict", "segment_failures", "evaluate_gate"]


class SegmentLike(Protocol):
    segment: str
    n: int
    before: float | None  # baseline pass rate on the same cases; None when there is no baseline
    after: float  # candidate pass rate


class _GatingLike(Protocol):
    aggregate: str
    threshold: float
    max_drop: float | None
    min_cases_per_segment: int


@dataclasses.dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    failing: list[str]  # segments that make the gate fail
    low_confidence: list[str]  # segments printed but not gated

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"


def _drop(row: SegmentLike) -> float | None:
    return None if row.before is None else row.before - row.after


def segment_failures(row: SegmentLike, gating: _GatingLike) -> list[str]:
    """What this segment violates, whatever the aggregate (the report marks it; the gate decides if it counts)."""
    out = []
    if row.after < gating.threshold:
        out.append(f"pass rate {row.after:.3f} < threshold {gating.threshold:g}")
    drop = _drop(row)
    if gating.max_drop is not None and drop is not None and drop > gating.max_drop + 1e-12:
        out.append(f"dropped {-drop:+.3f} vs baseline (max drop {gating.max_drop:g})")
    return out


def evaluate_gate(rows: Sequence[SegmentLike], overall: SegmentLike, gating: _GatingLike) -> Verdict:
    low = [r for r in rows if r.n < gating.min_cases_per_segment]
    gated = [r for r in rows if r.n >= gating.min_cases_per_segment]
    reasons: list[str] = []
    failing: list[str] = []
    if gating.aggregate == "min_segment":
        if not gated:
            reasons.append(f"no segment has at least {gating.min_cases_per_segment} cases: nothing to gate on "
                           "(lower min_cases_per_segment or replay more cases)")
            failing.append("(all)")
        for r in gated:
            if r.after < gating.threshold:
                failing.append(r.segment)
                reasons.append(f"segment {r.segment}: pass rate {r.after:.3f} < threshold {gating.threshold:g} "
                               f"(n={r.n})")
        if gated and not failing:
            worst = min(gated, key=lambda r: (r.after, r.segment))
            reasons.append(f"worst segment {worst.segment}: pass rate {worst.after:.3f} >= threshold "
                           f"{gating.threshold:g} (n={worst.n})")
    else:
        ok = overall.after >= gating.threshold
        if not ok:
            failing.append("mean")
        reasons.append(f"weighted mean pass rate {overall.after:.3f} {'>=' if ok else '<'} threshold "
                       f"{gating.threshold:g} (n={overall.n})")
        below = [r.segment for r in gated if r.after < gating.threshold]
        if below:
            reasons.append(f"not gated (aggregate=mean), below threshold: {', '.join(below)}")
    if gating.max_drop is not None:
        for r in gated:
            drop = _drop(r)
            if drop is not None and drop > gating.max_drop + 1e-12:
                if r.segment not in failing:
                    failing.append(r.segment)
                reasons.append(f"segment {r.segment}: dropped {-drop:+.3f} vs baseline, more than max_drop "
                               f"{gating.max_drop:g} (n={r.n})")
    for r in low:
        reasons.append(f"segment {r.segment}: n={r.n} < {gating.min_cases_per_segment}, low confidence, not gated")
    return Verdict(not failing, reasons, failing, [r.segment for r in low])
