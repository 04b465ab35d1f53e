"""replay.gate, the gate's statistics: the exact tests against exact arithmetic, the interval against its published
formula and its coverage, Holm, the look schedule and spending, the power formula, the three verdicts, families,
escalation planning, the exit codes, and a reduced run of bench/gate_sim.py (the real gate code on simulated
outcomes)."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from replay.gate import (EXIT_INCOMPLETE, EXIT_INCONCLUSIVE, EXIT_PASS, EXIT_REGRESSION, INCONCLUSIVE, OK, REGRESSION,
                         Evidence, Pairs, SegmentPlan, binom_sf_half, cases_needed, decide, detectable_drop,
                         exit_code, holm, holm_adjusted, look_schedule, newcombe_interval, next_draws, pairs_from,
                         plan, sequential_p, sign_test_drop, spending_weights)


def exact_sf(k: int, n: int) -> Fraction:
    return Fraction(sum(math.comb(n, i) for i in range(max(k, 0), n + 1)), 2 ** n)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 20, 47, 100, 333, 2000])
def test_binomial_tail_matches_exact_arithmetic(n):
    for k in range(-1, n + 2, max(1, n // 40)):
        want = exact_sf(k, n)
        got = binom_sf_half(k, n)
        assert got == pytest.approx(float(want), rel=1e-10, abs=1e-300), (k, n)


def test_sign_test_on_the_discordant_pairs():
    assert sign_test_drop(Pairs(36, 7, 0, 4)) == pytest.approx(1 / 128)  # seed 001: 7 flips down, none up
    assert sign_test_drop(Pairs(10, 5, 5, 10)) == pytest.approx(float(exact_sf(5, 10)))  # 0.623: no evidence
    assert sign_test_drop(Pairs(10, 0, 6, 4)) == 1.0  # only improvements
    assert sign_test_drop(Pairs(30, 0, 0, 0)) == 1.0  # no discordant pair: nothing to test


def test_pairs_from_outcomes():
    p = pairs_from([(True, True), (True, False), (True, False), (False, True), (False, False)])
    assert (p.both_pass, p.pass_fail, p.fail_pass, p.both_fail, p.n) == (1, 2, 1, 1, 5)
    assert (p.before_pass, p.after_pass, p.discordant) == (3, 2, 3) and p.drop == pytest.approx(0.2)


def test_newcombe_interval_worked_examples():
    """Fagerland, Lydersen & Laake's paired examples, computed with Newcombe's method 10 as their R package
    `contingencytables` (Newcombe_square_and_add_CI_paired_2x2) computes it; our interval is for after - before."""
    lo, hi = newcombe_interval(Pairs(1, 1, 7, 12))  # Bentur et al. 2009: before 2/21, after 8/21
    assert (round(lo, 4), round(hi, 4)) == (0.0256, 0.5069)
    lo, hi = newcombe_interval(Pairs(59, 6, 16, 80))  # Cavo et al. 2012: before 65/161, after 75/161
    assert (round(lo, 4), round(hi, 4)) == (0.0046, 0.1186)
    assert newcombe_interval(Pairs()) == (-1.0, 1.0)
    lo, hi = newcombe_interval(Pairs(0, 30, 0, 0))  # every case flipped down
    assert lo >= -1.0 and hi < 0


def test_newcombe_interval_keeps_its_coverage_at_small_n():
    """95% intervals at n = 30 and a pass rate of 0.87 on both sides (correlated by per-case difficulty): the
    normal approximation undercovers here; method 10 should not."""
    rng = random.Random(5)
    hits, reps = 0, 1500
    for _ in range(reps):
        q = [rng.betavariate(3.5, 0.52) for _ in range(30)]
        p = pairs_from((rng.random() < x, rng.random() < x) for x in q)
        lo, hi = newcombe_interval(p)
        hits += lo <= 0.0 <= hi
    assert hits / reps >= 0.93


def test_holm_adjusted_p_values_and_rejections():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    adj = holm_adjusted(p)
    assert adj == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert holm(p, 0.05) == {"d", "a"}
    assert holm({"x": 0.2}, 0.05) == set() and holm({}, 0.05) == set()


def test_look_schedule_and_spending():
    assert look_schedule(47, 200, 2) == [47, 97, 200]
    assert look_schedule(30, 30, 2) == [30] and look_schedule(47, 500, 0) == [47]
    w = spending_weights([47, 97, 200])
    assert sum(w) == pytest.approx(1.0) and w[0] == pytest.approx((47 / 200) ** 3) and w[2] > 0.88
    assert spending_weights([30]) == [1.0]
    # one look: the plain exact test; several: each look's p divided by its share of alpha, the best kept
    assert sequential_p([0.01], [1.0]) == 0.01
    assert sequential_p([0.001, 0.02], [0.1, 0.9]) == pytest.approx(0.01)
    assert sequential_p([0.5, 0.9], [0.1, 0.9]) == 1.0


def test_cases_needed_is_connors_formula():
    # Connor 1987: n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, one-sided alpha 0.025, power 0.8
    n = cases_needed(0.10, 0.20, 0.025)
    assert n == math.ceil((1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.19)) ** 2 / 0.01) == 155
    assert cases_needed(0.0, 0.2, 0.05) is None
    assert cases_needed(0.149, 0.279, 0.05 / 40) > cases_needed(0.149, 0.279, 0.05)
    d30, d200 = detectable_drop(30, 0.87, 0.05 / 40), detectable_drop(200, 0.87, 0.05 / 40)
    assert d30 > d200 > 0 and detectable_drop(3, 0.87, 0.05 / 40) is None


@pytest.mark.parametrize("alpha", [0.05, 0.05 / 3, 0.01, 0.05 / 40, 0.001])
def test_cases_needed_never_asks_for_fewer_pairs_than_the_exact_test_can_reject_on(alpha):
    """Every case flipped (drop 1, discordance 1): the exact sign test rejects once 2^-n <= alpha, so that many cases
    are needed; Connor's normal approximation alone said fewer (5 instead of 6 at alpha 0.05/3), and the report
    promised "~3 more" where 4 were needed."""
    exact = next(n for n in range(1, 100) if binom_sf_half(n, n) <= alpha)
    assert cases_needed(1.0, 1.0, alpha) == exact
    for psi in (0.5, 0.25):  # the expected discordant pairs reach that many at least
        assert cases_needed(psi, psi, alpha) * psi >= exact


def ev(key: str, *looks: Pairs, schedule=(), family=None) -> Evidence:
    return Evidence(key, tuple(looks), tuple(schedule) or (looks[-1].n,), family)


def test_three_verdicts():
    d = decide([ev("dropped", Pairs(10, 10, 0, 0)), ev("noisy", Pairs(20, 3, 0, 7)), ev("fine", Pairs(25, 1, 3, 1)),
                ev("empty", Pairs())], alpha=0.05, margin=0.05)
    v = {f.key: f for f in d.segments}
    assert v["dropped"].verdict == REGRESSION and v["dropped"].p_adjusted == pytest.approx(4 * 0.5 ** 10)
    assert v["noisy"].verdict == INCONCLUSIVE and v["noisy"].more_cases > 0  # 0.1 drop, p = 1/8
    assert v["fine"].verdict == OK and v["empty"].verdict == INCONCLUSIVE and v["empty"].why == "no scored case"
    assert d.status == REGRESSION
    # a significant drop within the margin is ok: alpha says "real", the margin says "matters"
    small = decide([ev("big", Pairs(900, 30, 0, 70))], alpha=0.05, margin=0.05)
    assert small.segments[0].p_value < 1e-8 and small.segments[0].verdict == OK


def test_a_segment_too_thin_for_its_test_is_inconclusive_never_ok():
    """Minimum power: with 4 segments each is tested at 0.05/4 = 0.0125 at best, and the exact test needs 7 flips for
    that (2^-7 = 0.0078; 2^-6 = 0.0156 is not enough). A segment with fewer baseline passes could not have been
    called a regression whatever the candidate did, so no drop seen there passes nothing."""
    d = decide([ev("six", Pairs(6, 0, 0, 0)), ev("seven", Pairs(7, 0, 0, 0)), ev("improved", Pairs(3, 0, 5, 2)),
                ev("floor", Pairs(0, 0, 0, 40))], alpha=0.05, margin=0.05)
    v = {f.key: f for f in d.segments}
    assert v["seven"].verdict == OK and v["six"].verdict == INCONCLUSIVE and d.status == INCONCLUSIVE
    assert v["seven"].why.startswith("change +0.000 within margin")  # not "-0.000" (a drop of 0.0 negated)
    assert v["six"].why.startswith("too few cases to tell: the baseline passed 6 of 6") and "it takes 7" in v["six"].why
    assert "~1 more case(s)" in v["six"].why and v["six"].more_cases == 1 and v["six"].too_few
    assert v["improved"].verdict == INCONCLUSIVE and "~14 more" in v["improved"].why  # 3 of 10 pass: 7 at 30% = 24
    assert v["floor"].verdict == INCONCLUSIVE and "passed none of its 40" in v["floor"].why
    assert v["floor"].more_cases is None and not v["seven"].too_few
    # the boundary follows the segment's share of alpha: one segment alone is tested at 0.05, which 5 flips reach
    assert decide([ev("five", Pairs(5, 0, 0, 0))], alpha=0.05, margin=0.05).status == OK
    assert decide([ev("four", Pairs(4, 0, 0, 0))], alpha=0.05, margin=0.05).status == INCONCLUSIVE
    # escalation: a first look of 15 (of 15 -> 55 -> 200 planned) spends (15/200)^3 of alpha, so even 13 of 13
    # passes failing (p = 2^-13 / 0.00042 = 0.29) could not decide it: inconclusive, and escalation goes on
    early = decide([Evidence(f"s{i}", (Pairs(13, 0, 0, 2),), (15, 55, 200)) for i in range(40)], alpha=0.05,
                   margin=0.05)
    assert {f.verdict for f in early.segments} == {INCONCLUSIVE} and early.segments[0].too_few
    assert "p=0.29" in early.segments[0].why
    # a baseline that passes (almost) nothing cannot drop beyond the margin: ok however few flips it allows
    floor = decide([ev("broken", Pairs(0, 0, 0, 100)), ev("fixed", Pairs(0, 0, 100, 0)),
                    ev("rare", Pairs(1, 0, 0, 199))], alpha=0.05, margin=0.05)
    assert {f.key: f.verdict for f in floor.segments} == {"broken": OK, "fixed": OK, "rare": OK}
    # a thin segment inside a family is judged by its family's pooled test; a thin family is inconclusive
    fam = decide([ev("f/a", Pairs(3, 0, 0, 0), family="f"), ev("f/b", Pairs(30, 0, 0, 0), family="f"),
                  ev("g/a", Pairs(4, 0, 0, 0), family="g")], alpha=0.05, margin=0.05)
    assert {f.key: f.verdict for f in fam.families} == {"f": OK, "g": INCONCLUSIVE}
    assert {f.key: f.verdict for f in fam.segments} == {"f/a": OK, "f/b": OK, "g/a": OK}


def test_families_gate_first_then_name_segments_within():
    segs = [ev("ent/acme", Pairs(10, 10, 0, 0), family="ent"), ev("ent/globex", Pairs(18, 1, 0, 1), family="ent"),
            ev("smb/a", Pairs(20, 3, 0, 7), family="smb"), ev("smb/b", Pairs(28, 0, 1, 1), family="smb")]
    d = decide(segs, alpha=0.05, margin=0.05)
    fam = {f.key: f for f in d.families}
    seg = {f.key: f for f in d.segments}
    assert fam["ent"].verdict == REGRESSION and fam["ent"].pairs.n == 40 and fam["smb"].verdict == OK
    assert seg["ent/acme"].verdict == REGRESSION and seg["ent/globex"].verdict == OK
    # smb/a dropped 0.1 but its family did not: inconclusive, never a regression outside a regressed family
    assert seg["smb/a"].verdict == INCONCLUSIVE and seg["smb/a"].family == "smb"
    held = decide([ev("f/x", Pairs(0, 12, 0, 0), family="f"), ev("f/y", Pairs(0, 0, 12, 0), family="f")],
                  alpha=0.05, margin=0.05)
    x = next(f for f in held.segments if f.key == "f/x")
    assert held.families[0].verdict == OK and x.verdict == INCONCLUSIVE
    assert "significant within its family" in x.why and "family as a whole did not drop" in x.why


def test_exit_codes():
    assert exit_code(OK, complete=True, inconclusive_blocks=True) == EXIT_PASS == 0
    assert exit_code(REGRESSION, complete=True, inconclusive_blocks=False) == EXIT_REGRESSION == 1
    assert exit_code(INCONCLUSIVE, complete=True, inconclusive_blocks=True) == EXIT_INCONCLUSIVE == 4
    assert exit_code(INCONCLUSIVE, complete=True, inconclusive_blocks=False) == EXIT_PASS
    assert exit_code(REGRESSION, complete=False, inconclusive_blocks=True) == EXIT_INCOMPLETE == 3


def test_escalation_draws_whole_planned_looks_within_the_budget():
    plans = plan({"a": 47, "b": 30, "c": 30, "d": 30}, {"a": 200, "b": 30, "c": 500, "d": 500}, max_per_segment=200,
                 extra_looks=2)
    assert plans["a"].schedule == [47, 97, 200] and plans["b"].schedule == [30]  # b has nothing more to draw
    assert plans["c"].schedule == [30, 83, 230]
    d = decide([ev("a", Pairs(36, 7, 0, 4), schedule=plans["a"].schedule),
                ev("b", Pairs(20, 3, 0, 7)), ev("c", Pairs(25, 2, 0, 3), schedule=plans["c"].schedule),
                ev("d", Pairs(26, 1, 0, 3), schedule=plans["d"].schedule)], alpha=0.05, margin=0.05)
    verdicts = {f.key: f.verdict for f in d.segments}
    assert verdicts == {"a": INCONCLUSIVE, "b": INCONCLUSIVE, "c": INCONCLUSIVE, "d": OK}
    # a (smallest p) first; b has no look left; d is ok but shows a drop: `drop` goes on, `inconclusive` does not
    assert next_draws(d.segments, plans, 1000) == {"a": 50, "c": 53, "d": 53}
    assert next_draws(d.segments, plans, 1000, trigger="inconclusive") == {"a": 50, "c": 53}
    assert next_draws(d.segments, plans, 60) == {"a": 50}  # c's whole look does not fit: not drawn at all
    assert next_draws(d.segments, plans, 0) == {}
    plans["a"].taken = 3
    assert "a" not in next_draws(d.segments, plans, 1000)  # its last look is taken
    assert SegmentPlan.from_json(plans["a"].to_json()) == plans["a"]


def test_reduced_simulation_of_the_real_gate():
    """bench/gate_sim.py with 60 runs (the bench runs 1,000): the real aggregation, verdicts and escalation on
    simulated outcomes. A/A false blocks stay rare; seed 001's drop is found when production has 200 cases."""
    from bench.gate_sim import Scenario, simulate
    aa = simulate(Scenario(runs=60, seed_case=False, escalate=True), seed=1)
    assert aa.block_rate <= 0.10
    seed = simulate(Scenario(runs=60, seed_case=True, escalate=True), seed=2)
    assert seed.block_rate >= 0.65 and seed.extra_cases > 0
    off = simulate(Scenario(runs=60, seed_case=True, escalate=False), seed=2)
    assert off.block_rate < seed.block_rate and off.extra_cases == 0
