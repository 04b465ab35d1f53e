"""Family-wise control across the segments of one report: the chance that the gate blocks on any segment that did
not drop stays at most alpha, however many segments there are.

Holm (1979, "A simple sequentially rejective multiple test procedure", Scand J Statist 6:65-70) by default: sort the
m p-values, reject while p_(i) <= alpha / (m - i + 1). It controls the family-wise error rate under any dependence
between segments (they share a model change, so independence cannot be assumed; Hochberg and Hommel need
positive dependence), it is uniformly more powerful than Bonferroni, and the gate's question, "is any segment worse",
is a family-wise one (a false-discovery-rate method would let a share of blocks be false).

Families (seed 001: "at some point you cluster segments into families and gate on those"): Holm across the
families first, each family tested on its pooled cases; then, within each family that dropped, Holm across its
segments to name which. A segment is only called a regression inside a family that is; the gate's block decision is
then controlled at alpha at the family level (a hierarchical procedure: the within-family claims are conditional on
the family's and are there to point at the wound).
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["holm", "holm_adjusted"]


def holm_adjusted(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values: reject H_i at family-wise level alpha iff adjusted_i <= alpha. Ties keep their
    order by name, so the result is deterministic."""
    order = sorted(p_values, key=lambda k: (p_values[k], k))
    m = len(order)
    out: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def holm(p_values: Mapping[str, float], alpha: float) -> set[str]:
    """The hypotheses Holm's step-down procedure rejects at family-wise level alpha."""
    return {k for k, adj in holm_adjusted(p_values).items() if adj <= alpha}

