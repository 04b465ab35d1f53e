"""Escalation, pure: which inconclusive segments get more cases, and how many, at the next look.

Every segment's looks are planned when its first sample is drawn (`plan`): from its first count to
min(production available, first + max_per_segment), geometric over `looks` more looks (sequential.look_schedule).
After each look, `next_draws` gives the segments that still have a planned look the cases that look needs, the
strongest evidence first (smallest sequential p-value), while the case budget lasts; a look is drawn whole or not
at all, so every look that happens is one that was planned (what the sequential p-value's validity needs). Which
segments go on (`trigger`): `inconclusive` ones only, or (`drop`, the default) also those that show any drop at all:
a truly regressed 47-case segment looks fine by chance at its first look ~10% of the time, and stopping it there
cost ~6 points of power in bench/gate_sim.py (83% -> 78% on seed 001's case); going on costs cases, never alpha
(stopping rules do not enter the p-value).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from .sequential import look_schedule
from .verdicts import INCONCLUSIVE, OK, Finding

__all__ = ["SegmentPlan", "TRIGGERS", "plan", "next_draws"]


@dataclasses.dataclass
class SegmentPlan:
    schedule: list[int]  # planned case counts of every look
    taken: int = 1  # looks taken so far (the first sample is look 1)

    @property
    def drawn(self) -> int:
        return self.schedule[self.taken - 1]

    @property
    def next_size(self) -> int | None:
        return self.schedule[self.taken] if self.taken < len(self.schedule) else None

    def to_json(self) -> dict:
        return {"schedule": list(self.schedule), "taken": self.taken}

    @classmethod
    def from_json(cls, d: Mapping) -> "SegmentPlan":
        return cls([int(x) for x in d["schedule"]], int(d.get("taken", 1)))


def plan(first: Mapping[str, int], available: Mapping[str, int], *, max_per_segment: int,
         extra_looks: int) -> dict[str, SegmentPlan]:
    """The look schedule of every segment, fixed before any outcome is seen."""
    out = {}
    for seg, n1 in first.items():
        n_max = min(int(available.get(seg, n1)), n1 + max_per_segment)
        out[seg] = SegmentPlan(look_schedule(n1, max(n_max, n1), extra_looks))
    return out


TRIGGERS = ("drop", "inconclusive")


def _goes_on(f: Finding, trigger: str) -> bool:
    return f.verdict == INCONCLUSIVE or (trigger == "drop" and f.verdict == OK and f.pairs.drop > 0)


def next_draws(findings: Iterable[Finding], plans: Mapping[str, SegmentPlan], budget_cases: int, *,
               trigger: str = "drop") -> dict[str, int]:
    """segment -> cases to draw now (to reach its next planned look), smallest p-value first, within
    `budget_cases`. Empty when nothing is left to draw or the budget is spent. Regressions are decided: no more."""
    wanted = {}
    for f in findings:
        p = plans.get(f.key)
        if _goes_on(f, trigger) and p is not None and p.next_size is not None:
            # several candidates: a segment goes on when any does, ranked by its strongest evidence
            prev = wanted.get(f.key)
            wanted[f.key] = (min(f.p_value, prev[0]) if prev else f.p_value, p.next_size - p.drawn)
    out: dict[str, int] = {}
    left = budget_cases
    for seg in sorted(wanted, key=lambda s: (wanted[s][0], s)):
        need = wanted[seg][1]
        if 0 < need <= left:
            out[seg] = need
            left -= need
    return out
