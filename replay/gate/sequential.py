"""Escalation without losing alpha: a segment may be looked at again after more cases are drawn, so the test must
account for every look it could have stopped at.

Method (cite: Lan & DeMets 1983, "Discrete sequential boundaries for clinical trials", Biometrika 70:659-663, for
alpha spending; Kim & DeMets 1987, Biometrika 74:149-154, for the power family alpha * t**rho, rho = 3 close to
O'Brien-Fleming): a segment's looks are planned before any outcome is seen, at case counts n_1 < ... < n_K = N
(geometric from the first sample to N = min(production available, n_1 + per-segment budget)). Look k may spend
alpha * w_k with w_k = t_k**rho - t_(k-1)**rho, t_k = n_k / N. The exact one-sided sign test at look k has p-value
p_k, and the segment's sequential p-value is min_k p_k / w_k over the looks taken. By the union bound (Bonferroni
over the planned looks, the conservative form of alpha spending) P(min_k p_k / w_k <= u) <= u * sum(w_k) <= u under
"no drop", whatever the data decide about going on: stopping early (ok, budget spent) only drops terms. It is a
valid p-value, so Holm's procedure applies to it unchanged. With no escalation (one look, N = n_1) w_1 = 1 and it is
the plain exact test. rho = 3 keeps most alpha for the last look: at 47 -> 200 cases the first look gets 1.3%.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["RHO", "look_schedule", "spending_weights", "sequential_p"]

RHO = 3.0


def look_schedule(first: int, n_max: int, extra_looks: int) -> list[int]:
    """Planned case counts of each look: the first sample, then `extra_looks` more, geometric up to n_max (each
    look at least one case more than the last). One look when nothing more can be drawn."""
    first = max(int(first), 0)
    if n_max <= first or extra_looks <= 0 or first == 0:
        return [first]
    ratio = n_max / first
    out = [first]
    for k in range(1, extra_looks + 1):
        n = n_max if k == extra_looks else int(round(first * ratio ** (k / extra_looks)))
        if n > out[-1]:
            out.append(min(n, n_max))
    if out[-1] != n_max:
        out.append(n_max)
    return out


def spending_weights(schedule: Sequence[int], rho: float = RHO) -> list[float]:
    """The share of alpha each planned look may spend: t_k**rho - t_(k-1)**rho with t_k = n_k / n_K (sums to 1)."""
    last = schedule[-1] if schedule else 0
    if last <= 0:
        return [1.0] * len(schedule)
    out, prev = [], 0.0
    for n in schedule:
        t = (n / last) ** rho
        out.append(t - prev)
        prev = t
    return out


def sequential_p(p_values: Sequence[float], weights: Sequence[float]) -> float:
    """min over the looks taken of p_k / w_k, capped at 1 (see the module docstring for why it is valid)."""
    best = 1.0
    for p, w in zip(p_values, weights):
        if w > 0:
            best = min(best, p / w)
    return 1.0 if math.isnan(best) else min(1.0, best)
