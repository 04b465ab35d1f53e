"""How many cases a paired test needs: the report's "cases needed" for an inconclusive segment and `tagway replay
plan`'s detectable drops.

Sample size of the one-sided McNemar test (Connor 1987, "Sample size for testing differences in proportions for
the paired-sample design", Biometrics 43:207-211): with discordance probability psi = P(pass->fail) + P(fail->pass)
and drop delta = P(pass->fail) - P(fail->pass),
    n = (z_(1-alpha) * sqrt(psi) + z_(1-beta) * sqrt(psi - delta**2))**2 / delta**2.
For planning, where nothing is known about how baseline and candidate outcomes correlate, psi comes from the pass
rates under independence (p0 + p1 - 2 p0 p1, p1 = p0 - delta): correlated outcomes (the usual case: hard cases
stay hard) discord less, so the figures are conservative.
"""
from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["POWER", "fewest_flips", "cases_needed", "independent_discordance", "detectable_drop"]

POWER = 0.8
_N = NormalDist()


def fewest_flips(alpha: float) -> int:
    """The fewest pass->fail flips on which the exact sign test can reject at level alpha: with d flips and none the
    other way p = 2^-d, so d >= log2(1/alpha)."""
    return max(1, math.ceil(math.log2(1 / alpha) - 1e-9)) if 0 < alpha < 1 else 1


def cases_needed(delta: float, psi: float, alpha: float, power: float = POWER) -> int | None:
    """Pairs needed to detect a drop `delta` with discordance `psi` at one-sided level alpha with `power`. None when
    there is no drop to detect (delta <= 0)."""
    if delta <= 0:
        return None
    psi = min(1.0, max(psi, delta))  # at least the flips the drop itself needs
    za, zb = _N.inv_cdf(1 - alpha), _N.inv_cdf(power)
    n = (za * math.sqrt(psi) + zb * math.sqrt(max(psi - delta * delta, 0.0))) ** 2 / (delta * delta)
    # The gate's test is the exact sign test, which cannot reject on fewer than `fewest_flips` discordant pairs (all of
    # them pass->fail: p = 2^-d): the normal approximation asks for less at small n (every case flipped at alpha
    # 0.0167: it said 5 cases, the exact test needs 6), so the expected discordant pairs must reach that many.
    return max(1, math.ceil(n), math.ceil(fewest_flips(alpha) / psi - 1e-9))


def independent_discordance(p0: float, delta: float) -> float:
    """psi when baseline (pass rate p0) and candidate (p0 - delta) outcomes are independent."""
    p1 = max(0.0, p0 - delta)
    return p0 + p1 - 2 * p0 * p1


def detectable_drop(n: int, p0: float, alpha: float, power: float = POWER) -> float | None:
    """The smallest drop from pass rate p0 that n pairs detect with `power` (independent outcomes); None when even
    a drop to 0 is out of reach."""
    if n <= 0:
        return None
    lo, hi = 1e-6, p0
    need = cases_needed(hi, independent_discordance(p0, hi), alpha, power)
    if need is None or need > n:
        return None
    for _ in range(60):
        mid = (lo + hi) / 2
        need = cases_needed(mid, independent_discordance(p0, mid), alpha, power)
        if need is not None and need <= n:
            hi = mid
        else:
            lo = mid
    return hi
