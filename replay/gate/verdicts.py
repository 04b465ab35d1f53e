"""Three verdicts per segment, never a silent pass, and what the gate does with them.

- `regression`: the drop is significant (the segment's sequential exact sign test survives Holm at `alpha`) and
  the observed drop is beyond `margin`;
- `inconclusive`: the observed drop is beyond `margin` but the evidence is not enough (the report says how many
  more cases would decide it: power 80% at the observed drop and discordance, at the family-wise level);
- `ok`: the observed drop is within `margin` (an improvement, no change, or a drop too small to matter), on enough
  evidence: a segment whose test could not have found a regression whatever the candidate did (fewer baseline
  passes than the exact test's fewest flips at the segment's share alpha/m of the level: with b passes all failing,
  p = 2^-b) is `inconclusive`, never `ok`, however it came out: no drop seen by a test that could not see one is
  absence of evidence, not evidence of absence (Altman & Bland 1995, BMJ 311:485).
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
from .paired import Pairs, newcombe_interval, sign_test_drop
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

    @property
    def p_value(self) -> float:
        """The sequential p-value over the looks taken (the plain exact test with one look)."""
        if not self.looks:
            return 1.0
        weights = spending_weights(self.schedule) if len(self.schedule) >= len(self.looks) else [1.0]
        return sequential_p([sign_test_drop(p) for p in self.looks], weights)


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


def powerless(pairs: Pairs, alpha_each: float) -> bool:
    """The segment's exact test could not reject at alpha_each even if every baseline pass had failed (p = 2^-b)."""
    return pairs.n > 0 and pairs.before_pass < fewest_flips(alpha_each)


def _finding(key: str, pairs: Pairs, p: float, adj: float, rejected: bool, alpha_each: float, margin: float, *,
             family: str | None = None, looks: int = 1, may_regress: bool = True, min_power: bool = True) -> Finding:
    verdict = classify(pairs, rejected and may_regress, margin)
    if verdict == OK and min_power and powerless(pairs, alpha_each):
        more = _judgeable_at(pairs, alpha_each)
        return Finding(key, INCONCLUSIVE, pairs, p, adj, newcombe_interval(pairs), more and more - pairs.n, family,
                       looks, _too_few(pairs, alpha_each, more), too_few=True)
    more = None
    if verdict == INCONCLUSIVE and pairs.n:
        need = cases_needed(pairs.drop, pairs.discordant / pairs.n, alpha_each)
        more = None if need is None else max(need - pairs.n, 1)
    why = _why(verdict, pairs, adj, margin, held_back=rejected and not may_regress)
    return Finding(key, verdict, pairs, p, adj, newcombe_interval(pairs), more, family, looks, why)


def _judgeable_at(pairs: Pairs, alpha_each: float) -> int | None:
    """The cases at which, at the segment's baseline pass rate, the test could call a regression at all."""
    b = pairs.before_pass
    return math.ceil(fewest_flips(alpha_each) * pairs.n / b) if b else None


def _too_few(pairs: Pairs, alpha_each: float, judgeable_at: int | None) -> str:
    flips = f"{pairs.pass_fail} pass->fail, {pairs.fail_pass} fail->pass of {pairs.n}"
    b = pairs.before_pass
    if judgeable_at is None:
        return f"too few cases to tell: the baseline passed none of its {pairs.n}, so no drop can show here ({flips})"
    return (f"too few cases to tell: the baseline passed {b} of {pairs.n}; even if all {b} failed, p={0.5 ** b:.2g} "
            f"would not reach the segment's level {alpha_each:.2g} (it takes {fewest_flips(alpha_each)}; "
            f"~{judgeable_at - pairs.n} more case(s) at this pass rate) ({flips})")


def _why(verdict: str, pairs: Pairs, adj: float, margin: float, *, held_back: bool = False) -> str:
    flips = f"{pairs.pass_fail} pass->fail, {pairs.fail_pass} fail->pass of {pairs.n}"
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
                         looks=len(e.looks)) for e in evidence]
        return Decision(segs, [], alpha, margin)
    # families: each on the pooled cases of its segments' first look (the planned sample; escalation draws are
    # chosen by segment verdicts, which would bias a pooled fixed-size test)
    pooled = {f: sum((e.looks[0] if e.looks else Pairs() for e in members), Pairs()) for f, members in fams.items()}
    fam_p = {f: sign_test_drop(p) for f, p in pooled.items()}
    fam_adj = holm_adjusted(fam_p)
    families = [_finding(f, pooled[f], fam_p[f], fam_adj[f], fam_adj[f] <= alpha, alpha / len(fams), margin)
                for f in sorted(fams)]
    dropped = {f.key for f in families if f.verdict == REGRESSION}
    segs = []
    for f in sorted(fams):
        members = fams[f]
        adj = holm_adjusted({e.key: e.p_value for e in members})
        for e in members:
            segs.append(_finding(e.key, e.pairs, e.p_value, adj[e.key], adj[e.key] <= alpha, alpha / len(members),
                                 margin, family=f, looks=len(e.looks), may_regress=f in dropped, min_power=False))
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
