"""Paired evidence for one segment: baseline and candidate scored on the same cases.

Per case the pair (baseline passed, candidate passed) falls in one of four cells; only the discordant ones (a
pass that became a fail, or a fail that became a pass) say anything about a change. Pure functions, no I/O.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

from exporters.queries import wilson_interval

__all__ = ["Pairs", "pairs_from", "binom_sf_half", "sign_test_drop", "newcombe_interval", "wilson_interval"]


@dataclasses.dataclass(frozen=True)
class Pairs:
    """The paired 2x2 table of one segment."""
    both_pass: int = 0
    pass_fail: int = 0  # baseline passed, candidate failed: a regression flip
    fail_pass: int = 0  # baseline failed, candidate passed: an improvement flip
    both_fail: int = 0

    @property
    def n(self) -> int:
        return self.both_pass + self.pass_fail + self.fail_pass + self.both_fail

    @property
    def before_pass(self) -> int:
        return self.both_pass + self.pass_fail

    @property
    def after_pass(self) -> int:
        return self.both_pass + self.fail_pass

    @property
    def discordant(self) -> int:
        return self.pass_fail + self.fail_pass

    @property
    def drop(self) -> float:
        """before - after pass rate (> 0: the candidate is worse); 0 when there is no pair."""
        return (self.pass_fail - self.fail_pass) / self.n if self.n else 0.0

    def __add__(self, other: "Pairs") -> "Pairs":
        return Pairs(self.both_pass + other.both_pass, self.pass_fail + other.pass_fail,
                     self.fail_pass + other.fail_pass, self.both_fail + other.both_fail)


def pairs_from(outcomes: Iterable[tuple[bool, bool]]) -> Pairs:
    """(baseline passed, candidate passed) per case -> the table."""
    cells = [0, 0, 0, 0]
    for before, after in outcomes:
        cells[(0 if before else 2) + (0 if after else 1)] += 1
    return Pairs(cells[0], cells[1], cells[2], cells[3])


def binom_sf_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact to ~1e-11 relative: the terms are summed in log space from the
    tail inwards (the upper tail by symmetry when k is below the mean, so no sum cancels). Checked against exact
    integer arithmetic in the tests. This is the only special function the gate needs, so it is written here rather
    than pulling in scipy (~40 MB) for `binomtest`."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if 2 * k <= n:  # P(X >= k) = 1 - P(X <= k-1) = 1 - P(X >= n-k+1)
        return max(0.0, 1.0 - binom_sf_half(n - k + 1, n))
    log_c = math.lgamma(n + 1) - n * math.log(2.0)
    top = log_c - math.lgamma(k + 1) - math.lgamma(n - k + 1)  # the largest term of the tail (k > n/2)
    total, term, i = 0.0, 1.0, k
    while i <= n and term > 1e-17:
        total += term
        term *= (n - i) / (i + 1)  # C(n, i+1) / C(n, i)
        i += 1
    return min(1.0, math.exp(top) * total)


def sign_test_drop(p: Pairs) -> float:
    """One-sided exact McNemar test (the sign test on the discordant pairs; McNemar 1947, exact conditional form as
    in Fagerland, Lydersen & Laake 2013): given b + c discordant pairs, under "no change" the b pass->fail flips
    are Binomial(b + c, 1/2), so p = P(X >= b). Small p: more pass->fail flips than chance explains. Exact at any
    n, conservative (never above alpha), unlike the chi-square approximation at small n."""
    return binom_sf_half(p.pass_fail, p.discordant)


def newcombe_interval(p: Pairs, z: float = 1.959963984540054) -> tuple[float, float]:
    """Confidence interval for the paired difference after - before (the delta column; negative = a drop):
    Newcombe's hybrid score ("square-and-add") method 10 (Newcombe 1998, Stat Med 17:2635-2650), the Wilson
    interval of each side combined with the estimated correlation of the two sides, as recommended for paired
    proportions by Fagerland, Lydersen & Laake (2014, Stat Med 33:2850-2875). It stays inside [-1, 1] and keeps
    its coverage at small n, where the normal approximation does not."""
    n = p.n
    if n == 0:
        return -1.0, 1.0
    p1, p2 = p.before_pass / n, p.after_pass / n
    l1, u1 = wilson_interval(p.before_pass, n, z)
    l2, u2 = wilson_interval(p.after_pass, n, z)
    a, b, c, d = p.both_pass, p.pass_fail, p.fail_pass, p.both_fail
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    phi = 0.0
    if margins:
        cross = a * d - b * c
        # Newcombe's continuity-corrected estimate of the correlation (0 for a small positive cross product)
        phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / math.sqrt(margins)
    # for before - after: lower = D - sqrt(...), upper = D + sqrt(...); the delta is its negation
    d_lo = (p1 - p2) - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    d_hi = (p1 - p2) + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, -d_hi), min(1.0, -d_lo)
