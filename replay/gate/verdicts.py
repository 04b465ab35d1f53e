"""Three verdicts per segment, never a silent pass, and what the gate does with them.

- `regression`: the drop is significant (the segment's sequential exact sign test survives Holm at `alpha`) and
  the observed drop is beyond `margin`;
- `inconclusive`: the observed drop is beyond `margin` but the evidence is not enough (the report says how many
  more cases would decide it: power 80% at the observed drop and discordance, at the family-wise level);
- `ok`: the observed drop is within `margin` (an improvement, no change, or a drop too small to matter), on enough
  evidence: a segment whose test could not have found a regression whatever the candidate did is `inconclusive`,
  never `ok`, however it came out: no drop seen by a test that could not see one is absence of evidence, not
  evidence of absence (Altman & Bland 1995, BMJ 311:485). "Could not": even with every baseline pass failing at
  every look taken (p_k = 2^-b_k, spent at the look's share of alpha: Evidence.best_p), the sequential p-value stays
  above the segment's own level alpha/m (Holm's first step). Escalation then draws more cases for it. Unless the
  baseline passes so rarely (95% Wilson upper bound within `margin`) that no drop beyond the margin is possible.
  Segments inside a family are judged by their family's pooled test, so the rule applies to the family, not to them.
What alpha controls: the chance that the gate calls any segment (or family) a regression when no segment got worse.
`margin` keeps trivially small drops from blocking; it is not part of the tested hypothesis.

A locked case (replay.gate.locks) that does not keep its expected outcome is a regression of its segment and of
the candidate regardless of the statistics: a lock is a unit test, not a sample.

The gate: any regression -> exit 1; else any inconclusive -> exit 4 when `inconclusive: block`, 0 when `pass`;
else 0. An incomplete run is exit 3 whatever it shows.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from .locks import BROKEN, LockResult
from .multiplicity import holm_adjusted
from .paired import Pairs, newcombe_interval, sign_test_drop, wilson_interval
from .power import cases_needed, fewest_flips
from .sequential import sequential_p, spending_weights

__all__ = ["REGRESSION", "OK", "INCONCLUSIVE", "Evidence", "Finding", "Decision", "classify", "decide",
           "exit_code", "EXIT_PASS", "EXIT_REGRESSION", "EXIT_BAD_INPUT", "EXIT_INCOMPLETE", "EXIT_INCONCLUSIVE"]

REGRESSION, OK, INCONCLUSIVE = "regression", "ok", "inconclusive"
EXIT_PASS, EXIT_REGRESSION, EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INCONCLUSIVE = 0, 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One segment's paired tables at each look taken (cumulative), its planned look schedule (case counts) and
    its family (None without families)."""
    key: str
    looks: tuple[Pairs, ...]
    schedule: tuple[int, ...] = ()
    family: str | None = None

    @property
    def pairs(self) -> Pairs:
        return self.looks[-1] if self.looks else Pairs()

    def _weights(self) -> list[float]:
        return spending_weights(self.schedule) if len(self.schedule) >= len(self.looks) else [1.0]

    @property
    def p_value(self) -> float:
        """The sequential p-value over the looks taken (the plain exact test with one look)."""
        if not self.looks:
            return 1.0
        return sequential_p([sign_test_drop(p) for p in self.looks], self._weights())

    @property
    def best_p(self) -> float:
        """The smallest sequential p-value these looks could have given: every baseline pass failing at each look
        (2^-b_k, spent at the look's share of alpha). Above the segment's level, no outcome could have decided it."""
        if not self.looks:
            return 1.0
        return sequential_p([0.5 ** p.before_pass for p in self.looks], self._weights())

    @property
    def last_weight(self) -> float:
        """The share of alpha the segment's last planned look spends (1 without escalation)."""
        w = spending_weights(self.schedule) if len(self.schedule) > 1 else [1.0]
        return w[-1]


@dataclasses.dataclass
class Finding:
    """The verdict on one hypothesis (a segment, or a family of segments)."""
    key: str
    verdict: str
    pairs: Pairs
    p_value: float  # the test's own p-value (sequential over the looks)
    p_adjusted: float  # Holm-adjusted within its group; the verdict compares it with alpha
    delta_ci: tuple[float, float]  # 95% Newcombe interval of after - before
    more_cases: int | None = None  # inconclusive: more pairs that would decide it (80% power at the observed drop)
    family: str | None = None
    looks: int = 1
    why: str = ""
    too_few: bool = False  # inconclusive because the test could not have called a regression here (see above)


@dataclasses.dataclass
class Decision:
    segments: list[Finding]
    families: list[Finding]
    alpha: float
    margin: float
    locks: list[LockResult] = dataclasses.field(default_factory=list)

    @property
    def broken_locks(self) -> list[LockResult]:
        return [lk for lk in self.locks if lk.state == BROKEN]

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in [*self.families, *self.segments] if f.verdict == REGRESSION]

    @property
    def inconclusive(self) -> list[Finding]:
        return [f for f in [*self.families, *self.segments] if f.verdict == INCONCLUSIVE]

    @property
    def status(self) -> str:
        return REGRESSION if self.regressions or self.broken_locks else INCONCLUSIVE if self.inconclusive else OK


def classify(pairs: Pairs, rejected: bool, margin: float) -> str:
    if pairs.n == 0:
        return INCONCLUSIVE  # nothing scored: no evidence either way
    if pairs.drop <= margin + 1e-12:
        return OK
    return REGRESSION if rejected else INCONCLUSIVE


def at_the_floor(pairs: Pairs, margin: float) -> bool:
    """The baseline passes so rarely (its 95% Wilson upper bound within `margin`) that no drop beyond the margin is
    possible: nothing to lose, however few cases decided it."""
    return pairs.n > 0 and wilson_interval(pairs.before_pass, pairs.n)[1] <= margin


def _finding(key: str, pairs: Pairs, p: float, adj: float, rejected: bool, alpha_each: float, margin: float, *,
             family: str | None = None, looks: int = 1, may_regress: bool = True, best_p: float | None = None,
             last_weight: float = 1.0) -> Finding:
    """`best_p`: the smallest p-value the segment's looks could have given (Evidence.best_p); None where the
    min-power rule does not apply (segments judged by their family's test)."""
    verdict = classify(pairs, rejected and may_regress, margin)
    if verdict == OK and best_p is not None and pairs.n and best_p > alpha_each and not at_the_floor(pairs, margin):
        more = _judgeable_at(pairs, alpha_each * last_weight)
        return Finding(key, INCONCLUSIVE, pairs, p, adj, newcombe_interval(pairs), more and more - pairs.n, family,
                       looks, _too_few(pairs, best_p, alpha_each, alpha_each * last_weight, more), too_few=True)
    more = None
    if verdict == INCONCLUSIVE and pairs.n:
        need = cases_needed(pairs.drop, pairs.discordant / pairs.n, alpha_each)
        more = None if need is None else max(need - pairs.n, 1)
    why = _why(verdict, pairs, adj, margin, held_back=rejected and not may_regress)
    return Finding(key, verdict, pairs, p, adj, newcombe_interval(pairs), more, family, looks, why)


def _flips(pairs: Pairs) -> str:
    return f"{pairs.pass_fail} pass->fail, {pairs.fail_pass} fail->pass of {pairs.n}"


def _judgeable_at(pairs: Pairs, level: float) -> int | None:
    """The cases at which, at the segment's baseline pass rate, the test could call a regression at `level` at
    all (its last planned look's share of the segment's alpha)."""
    b = pairs.before_pass
    return max(math.ceil(fewest_flips(level) * pairs.n / b), pairs.n + 1) if b else None


def _too_few(pairs: Pairs, best_p: float, alpha_each: float, level: float, judgeable_at: int | None) -> str:
    flips = _flips(pairs)
    b = pairs.before_pass
    if judgeable_at is None:
        hi = wilson_interval(0, pairs.n)[1]
        return (f"too few cases to tell: the baseline passed none of its {pairs.n}, and so few say little (its pass "
                f"rate may be up to {hi:.0%}) ({flips})")
    return (f"too few cases to tell: the baseline passed {b} of {pairs.n}; even if all {b} failed, p={best_p:.2g} "
            f"would not reach the segment's own level {alpha_each:.2g} (alpha/m, Holm's first step; it takes "
            f"{fewest_flips(level)} baseline passes; ~{judgeable_at - pairs.n} more case(s) at this pass rate) "
            f"({flips})")


def _why(verdict: str, pairs: Pairs, adj: float, margin: float, *, held_back: bool = False) -> str:
    flips = _flips(pairs)
    if pairs.n == 0:
        return "no scored case"
    if verdict == REGRESSION:
        return f"dropped {pairs.drop:.3f} > margin {margin:g}, significant (adjusted p={adj:.2g}; {flips})"
    if verdict == INCONCLUSIVE and held_back:
        return (f"dropped {pairs.drop:.3f} > margin {margin:g}, significant within its family (adjusted "
                f"p={adj:.2g}; {flips}) but the family as a whole did not drop")
    if verdict == INCONCLUSIVE:
        return f"dropped {pairs.drop:.3f} > margin {margin:g}, not significant (adjusted p={adj:.2g}; {flips})"
    return f"change {round(-pairs.drop, 3) + 0.0:+.3f} within margin {margin:g} ({flips})"  # + 0.0: no "-0.000"


def decide(evidence: Sequence[Evidence], *, alpha: float, margin: float,
           locks: Sequence[LockResult] = ()) -> Decision:
    """Verdicts for every segment (and family, when segments carry one), then the locks: a segment holding a
    broken lock is a regression whatever its statistics. Pure."""
    decision = _decide(evidence, alpha=alpha, margin=margin)
    decision.locks = list(locks)
    broken: dict[str, list[LockResult]] = {}
    for lk in decision.broken_locks:
        broken.setdefault(lk.segment, []).append(lk)
    for f in decision.segments:
        if f.key in broken:
            f.verdict = REGRESSION
            f.why = (f"{len(broken[f.key])} locked case(s) broke (a lock is a unit test, not a sample): "
                     + "; ".join(lk.describe() for lk in broken[f.key][:3]) + f"; statistics: {f.why}")
    return decision


def _decide(evidence: Sequence[Evidence], *, alpha: float, margin: float) -> Decision:
    fams: dict[str, list[Evidence]] = {}
    for e in evidence:
        if e.family is not None:
            fams.setdefault(e.family, []).append(e)
    if not fams:
        adj = holm_adjusted({e.key: e.p_value for e in evidence})
        m = max(len(evidence), 1)
        segs = [_finding(e.key, e.pairs, e.p_value, adj[e.key], adj[e.key] <= alpha, alpha / m, margin,
                         looks=len(e.looks), best_p=e.best_p, last_weight=e.last_weight) for e in evidence]
        return Decision(segs, [], alpha, margin)
    # families: each on the pooled cases of its segments' first look (the planned sample; escalation draws are
    # chosen by segment verdicts, which would bias a pooled fixed-size test)
    pooled = {f: sum((e.looks[0] if e.looks else Pairs() for e in members), Pairs()) for f, members in fams.items()}
    fam_p = {f: sign_test_drop(p) for f, p in pooled.items()}
    fam_adj = holm_adjusted(fam_p)
    families = [_finding(f, pooled[f], fam_p[f], fam_adj[f], fam_adj[f] <= alpha, alpha / len(fams), margin,
                         best_p=0.5 ** pooled[f].before_pass) for f in sorted(fams)]
    dropped = {f.key for f in families if f.verdict == REGRESSION}
    segs = []
    for f in sorted(fams):
        members = fams[f]
        adj = holm_adjusted({e.key: e.p_value for e in members})
        for e in members:
            segs.append(_finding(e.key, e.pairs, e.p_value, adj[e.key], adj[e.key] <= alpha, alpha / len(members),
                                 margin, family=f, looks=len(e.looks), may_regress=f in dropped))
    segs.sort(key=lambda s: s.key)
    return Decision(segs, families, alpha, margin)


def exit_code(status: str, *, complete: bool, inconclusive_blocks: bool) -> int:
    if not complete:
        return EXIT_INCOMPLETE
    if status == REGRESSION:
        return EXIT_REGRESSION
    if status == INCONCLUSIVE and inconclusive_blocks:
        return EXIT_INCONCLUSIVE
    return EXIT_PASS
