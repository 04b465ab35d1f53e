"""How often the gate blocks, measured on the REAL gate code: simulated case outcomes go through
replay.report.aggregate (pairing, errors, looks, the exact tests, Holm, verdicts, exit codes) and escalation goes
through replay.gate.plan and the pipeline's GateState.next_look / took_look, exactly as `tagway replay run` calls
them; only the model calls are simulated.

    python bench/gate_sim.py                 # every scenario, 1,000 runs each (a few minutes on one core)
    python bench/gate_sim.py --runs 200      # quicker, noisier

Scenarios (issue 10): A/A, candidate = baseline, 40 segments x 30 cases at a pass rate of 0.87, outcomes independent
or correlated through per-case difficulty (each case's pass probability drawn from Beta(0.87 k, 0.13 k), k = 2, the
same for both sides); thin, 40 segments x 5 cases (too few for the exact test to call any of them, so each
is inconclusive until escalation draws enough); seed 001's case, one segment of 47 cases going 0.915 -> 0.766 and 39 unchanged, with
production holding 200 cases of every segment, escalation on and off. "block" = a non-zero exit code.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.queries import wilson_interval  # noqa: E402
from replay.gate import plan  # noqa: E402
from replay.pipeline import GateState  # noqa: E402
from replay.report import aggregate  # noqa: E402
from replay.spec import Gating  # noqa: E402

DIFFICULTY_K = 2.0  # Beta concentration of per-case pass probabilities: smaller = harder/easier cases differ more


@dataclasses.dataclass
class Scenario:
    runs: int = 1000
    segments: int = 40
    cases: int = 30
    p: float = 0.87
    difficulty: bool = False
    seed_case: bool = False  # segment 0: 47 cases, 0.915 -> 0.766 (seed 001)
    escalate: bool = True
    production: int = 200  # cases production holds per segment
    alpha: float = 0.05
    margin: float = 0.05
    inconclusive: str = "pass"
    trigger: str = "drop"
    max_cases: int = 2000
    max_per_segment: int = 200
    looks: int = 2

    def gating(self) -> Gating:
        return Gating(alpha=self.alpha, margin=self.margin, inconclusive=self.inconclusive,
                      escalation={"enabled": self.escalate, "max_cases": self.max_cases, "looks": self.looks,
                                  "max_per_segment": self.max_per_segment, "trigger": self.trigger})


@dataclasses.dataclass
class Outcome:
    runs: int
    blocks: int
    regressions: int
    inconclusive: int
    extra_cases: float  # mean cases escalation drew per run
    seconds: float

    @property
    def block_rate(self) -> float:
        return self.blocks / self.runs

    def line(self, name: str) -> str:
        lo, hi = wilson_interval(self.blocks, self.runs)
        return (f"{name:<62} block {self.block_rate:6.1%} (95% CI {lo:.1%}-{hi:.1%})  regression "
                f"{self.regressions / self.runs:6.1%}  inconclusive {self.inconclusive / self.runs:6.1%}  "
                f"extra cases {self.extra_cases:7.0f}/run  [{self.seconds:.0f} s]")


def _segment_truth(sc: Scenario, i: int) -> tuple[float, float, int]:
    if sc.seed_case and i == 0:
        return 0.915, 0.766, 47
    return sc.p, sc.p, sc.cases


def _pool(sc: Scenario, rng: random.Random, before: float, after: float, n: int) -> list[tuple[bool, bool]]:
    """(baseline passed, candidate passed) for the n cases production holds, in the sampler's order."""
    out = []
    for _ in range(n):
        if sc.difficulty:
            q = rng.betavariate(before * DIFFICULTY_K, (1 - before) * DIFFICULTY_K)
            out.append((rng.random() < q, rng.random() < q * after / before))
        else:
            out.append((rng.random() < before, rng.random() < after))
    return out


class SimResult:
    """What aggregate reads of a replay_results row (replay.store.ResultRow), without its other columns."""
    __slots__ = ("candidate", "case_id", "segment", "status", "error", "output", "evaluations", "cost_usd")

    def __init__(self, candidate: str, case_id: str, segment: str, passed: bool) -> None:
        self.candidate, self.case_id, self.segment = candidate, case_id, segment
        self.status = "passed" if passed else "failed"
        self.error, self.output, self.evaluations, self.cost_usd = "", "", [], 0.0


def _results(seg: str, pool: list[tuple[bool, bool]], start: int, stop: int) -> list[SimResult]:
    rows = []
    for i in range(start, stop):
        cid = f"{seg}-{i:05d}"  # sorts in draw order: the report's look cuts follow the sampler's order
        b, c = pool[i]
        rows += (SimResult("baseline", cid, seg, b), SimResult("cand", cid, seg, c))
    return rows


def one_run(sc: Scenario, gating: Gating, rng: random.Random) -> tuple[int, str, int]:
    """One gate run: (exit code, verdict, extra cases drawn)."""
    pools, first = {}, {}
    for i in range(sc.segments):
        before, after, n1 = _segment_truth(sc, i)
        seg = f"s{i:02d}"
        pools[seg] = _pool(sc, rng, before, after, max(sc.production, n1) if sc.escalate else n1)
        first[seg] = n1
    results = [r for seg, n1 in first.items() for r in _results(seg, pools[seg], 0, n1)]
    state = GateState()
    if sc.escalate:
        state.plans = plan(first, {s: len(p) for s, p in pools.items()}, max_per_segment=sc.max_per_segment,
                           extra_looks=sc.looks)
    drawn = dict(first)
    while True:
        report = aggregate(results, gating, plans=state.plans, segment_by=["segment"])
        draws, _ = state.next_look(report, gating.escalation) if sc.escalate else ({}, "")
        if not draws:
            return report.exit_code, report.verdict, state.extra_cases
        got = 0
        for seg, k in draws.items():
            stop = min(drawn[seg] + k, len(pools[seg]))
            results += _results(seg, pools[seg], drawn[seg], stop)
            got += stop - drawn[seg]
            drawn[seg] = stop
        state.took_look(draws, got)


def simulate(sc: Scenario, seed: int = 0) -> Outcome:
    rng = random.Random(seed)
    gating = sc.gating()
    t0 = time.perf_counter()
    blocks = regressions = inconclusive = extra = 0
    for _ in range(sc.runs):
        code, verdict, n_extra = one_run(sc, gating, rng)
        blocks += code != 0
        regressions += verdict == "regression"
        inconclusive += verdict == "inconclusive"
        extra += n_extra
    return Outcome(sc.runs, blocks, regressions, inconclusive, extra / sc.runs, time.perf_counter() - t0)


SCENARIOS = [
    ("A/A independent, recommended gate (escalation on, inconclusive: pass)", dict()),
    ("A/A difficulty, recommended gate", dict(difficulty=True)),
    ("A/A independent, escalation off, inconclusive: pass", dict(escalate=False)),
    ("A/A difficulty, escalation off, inconclusive: pass", dict(difficulty=True, escalate=False)),
    ("A/A independent, escalation on, inconclusive: block", dict(inconclusive="block")),
    ("A/A independent, escalation off, inconclusive: block", dict(escalate=False, inconclusive="block")),
    ("A/A thin: 40 x 5 cases, recommended gate (production 200)", dict(cases=5)),
    ("A/A thin: 40 x 5 cases, escalation off, inconclusive: pass", dict(cases=5, escalate=False)),
    ("seed 001 independent, recommended gate (production 200)", dict(seed_case=True)),
    ("seed 001 difficulty, recommended gate (production 200)", dict(seed_case=True, difficulty=True)),
    ("seed 001 independent, recommended gate (production 400)", dict(seed_case=True, production=400)),
    ("seed 001 independent, escalation on, trigger: inconclusive", dict(seed_case=True, trigger="inconclusive")),
    ("seed 001 independent, escalation off", dict(seed_case=True, escalate=False)),
    ("seed 001 difficulty, escalation off", dict(seed_case=True, difficulty=True, escalate=False)),
    ("seed 001 independent, escalation off, inconclusive: block", dict(seed_case=True, escalate=False,
                                                                        inconclusive="block")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--only", default="", help="run the scenarios whose name contains this")
    args = ap.parse_args()
    print(f"gate simulation: {args.runs} runs per scenario, seed {args.seed}; alpha 0.05, margin 0.05, escalation "
          "2 looks up to 200 cases per segment, 2,000 in all (the defaults)")
    for name, over in SCENARIOS:
        if args.only and args.only not in name:
            continue
        out = simulate(Scenario(runs=args.runs, **over), seed=args.seed + zlib.crc32(name.encode()))
        print(out.line(name), flush=True)


if __name__ == "__main__":
    main()
