"""`tagway replay plan`, pure: before paying for a run, what the gate can see in each segment. Per segment: the
cases production holds, the cases the spec's sampling would draw, the smallest drop the gate detects with 80% power
at its family-wise level (with the sample alone, and with escalation up to its per-segment budget), and the cases a
target drop needs; the suggested coverage a dataset can adopt.

Assumptions, stated in the output: a baseline pass rate (default 0.9) and independent baseline/candidate outcomes,
which is conservative (correlated outcomes discord less; replay.gate.power). The level is alpha / m for m segments
(Holm's first step, the hardest), times the last look's share of alpha under escalation.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .gate import POWER, cases_needed, detectable_drop, independent_discordance, look_schedule, spending_weights

__all__ = ["PlanRow", "Plan", "plan_segments"]


@dataclasses.dataclass
class PlanRow:
    segment: str
    available: int  # replayable calls in production for the slice
    sampled: int  # what the spec's sampling draws at first
    detectable: float | None  # smallest drop found with 80% power on the sample (None: not even a drop to 0)
    detectable_escalated: float | None  # ... with escalation's budget for the segment
    needed: int | None  # cases the target drop needs
    suggested: int  # coverage to adopt: min(needed, available)
    short: bool  # production holds fewer cases than the target drop needs


@dataclasses.dataclass
class Plan:
    rows: list[PlanRow]
    alpha: float
    level: float  # the per-segment level the figures use
    pass_rate: float
    target_drop: float
    power: float = POWER

    def coverage(self) -> dict[str, int]:
        return {r.segment: r.suggested for r in self.rows}


def plan_segments(available: Mapping[str, int], sampled: Mapping[str, int], *, alpha: float, pass_rate: float,
                  target_drop: float, escalation_per_segment: int = 0, extra_looks: int = 2) -> Plan:
    m = max(len(available), 1)
    level = alpha / m
    psi = independent_discordance(pass_rate, target_drop)
    need = cases_needed(target_drop, psi, level)
    rows = []
    for seg in sorted(available):
        n_avail, n1 = int(available[seg]), int(sampled.get(seg, 0))
        n_max = min(n_avail, n1 + escalation_per_segment) if escalation_per_segment else n1
        weight = spending_weights(look_schedule(n1, n_max, extra_looks))[-1] if n_max > n1 else 1.0
        rows.append(PlanRow(seg, n_avail, n1, detectable_drop(n1, pass_rate, level),
                            detectable_drop(n_max, pass_rate, level * weight) if n_max > n1 else None,
                            need, min(need or 0, n_avail), need is not None and need > n_avail))
    return Plan(rows, alpha, level, pass_rate, target_drop)
