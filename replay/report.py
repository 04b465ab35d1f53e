"""The per-segment report, pure: case results -> for each candidate, the paired table of every segment (baseline and
candidate on the same cases), its verdict from the gate (replay.gate), the flipped cases that point at the wound,
and the run's verdict and exit code. Rendering lives in replay.render.

Errors are outcomes: with `errors: fail` (the default) an errored result (the call failed after its retries, an
evaluator or the judge could not decide, the production call itself errored) is a failed case, shown in its own
column; with `errors: exclude` the pair is left out of the test and the run stays incomplete until `tagway replay
resume` scores it. A candidate that errored on every case fails the gate whatever the statistics say; when every
call was answered and only the evaluators failed, that is no evidence about the candidate: inconclusive, and blocking.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Sequence

from exporters.tables import fmt_usd

from .gate import (EXIT_PASS, INCONCLUSIVE, OK, REGRESSION, Decision, Evidence, Finding, LockResult, Pairs, SegmentPlan,
                   check_locks, decide, exit_code, newcombe_interval, pairs_from, wilson_interval)

__all__ = ["Flip", "SegmentRow", "CandidateReport", "Report", "aggregate", "pair_outcome", "BASELINE", "ERRORED",
           "NOT_RUN", "excerpt", "flipped_case_ids"]

BASELINE = "baseline"
ERRORED = "errored"
NOT_RUN = "not run"  # a segment's verdict when none of its cases ran for the candidate (the run stopped first)
UNSCORED = "evaluators could not score"  # a candidate whose every answer no evaluator could score: no evidence
MAX_FLIPS = 20  # flipped cases kept per segment (the count says how many there were)


@dataclasses.dataclass
class Flip:
    """One case whose outcome changed: where to look (trace id), what was asked, what each side answered, why."""
    case_id: str
    direction: str  # "pass->fail" | "fail->pass"
    input: str = ""
    baseline: str = ""
    candidate: str = ""
    reasons: str = ""  # the failing side's evaluator reasons (or its error)


@dataclasses.dataclass
class SegmentRow:
    segment: str
    n: int  # pairs in the test (both sides scored; errors counted as failures unless `errors: exclude`)
    before_pass: int = 0
    after_pass: int = 0
    before: float | None = None
    after: float | None = None
    before_ci: tuple[float, float] | None = None  # 95% Wilson
    after_ci: tuple[float, float] | None = None
    delta: float | None = None  # after - before
    delta_ci: tuple[float, float] | None = None  # 95% Newcombe (paired)
    pass_fail: int = 0  # flips that made the candidate worse
    fail_pass: int = 0
    errored: int = 0  # candidate results that errored (failures under errors: fail, else left out)
    before_errored: int = 0
    excluded: int = 0  # pairs left out (errors: exclude, or one side not run yet)
    not_run: int = 0  # the segment's cases of the run without a result of the candidate (the run stopped first)
    not_run_yet: bool = False  # the run is still running: its not_run cases are to come, the run did not stop
    verdict: str = OK  # regression | ok | inconclusive ("" for the overall row)
    p_value: float | None = None
    p_adjusted: float | None = None
    more_cases: int | None = None  # inconclusive: pairs more that would decide it at 80% power (too_few: judge it)
    looks: int = 1
    family: str | None = None
    why: str = ""
    too_few: bool = False  # inconclusive because its test could not have called a regression (replay.gate.verdicts)
    flips: list[Flip] = dataclasses.field(default_factory=list)
    flips_total: int = 0


@dataclasses.dataclass
class CandidateReport:
    candidate: str
    model: str
    rows: list[SegmentRow]
    overall: SegmentRow  # all segments pooled (the seed's "mean (weighted)" row), for reading, not gated
    families: list[SegmentRow]
    status: str  # regression | inconclusive | ok
    reasons: list[str]
    cost_usd: float = 0.0
    findings: list[Finding] = dataclasses.field(default_factory=list, repr=False)  # the gate's, for escalation
    locks: list[LockResult] = dataclasses.field(default_factory=list)  # the dataset's locked cases, checked


@dataclasses.dataclass
class Report:
    run_id: str
    status: str  # complete | incomplete | running
    segment_by: list[str]
    gating: dict[str, Any]
    baseline_mode: str
    candidates: list[CandidateReport]
    verdict: str  # passed | regression | inconclusive | incomplete (nothing found in a run not finished)
    exit_code: int
    reasons: list[str]
    n_cases: int = 0
    errored: int = 0  # results without a score, all targets
    baseline_cost_usd: float = 0.0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    production_errors: dict[str, Any] = dataclasses.field(default_factory=dict)  # {count, included}
    escalation: dict[str, Any] = dataclasses.field(default_factory=dict)  # {plans, extra_cases, cost_usd}
    dataset: str = ""  # the exact dataset version (or file, or pinned id) the run replayed
    locks: dict[str, dict] = dataclasses.field(default_factory=dict)  # trace id -> {expect, note}
    judge_cost_usd: float = 0.0  # the LLM judge's calls: in the run's spend (and max_cost), in no candidate's cost
    segments: dict[str, int] = dataclasses.field(default_factory=dict)  # cases per segment the run holds
    stop_reason: str = ""  # why the run stopped before its end (its budget): the runner's line

    @property
    def passed(self) -> bool:
        return self.exit_code == EXIT_PASS

    @property
    def rerun_baseline_cost_usd(self) -> float:
        """What re-running the baseline cost; a logged baseline's cost is production's, not the run's."""
        return self.baseline_cost_usd if self.baseline_mode == "rerun" else 0.0

    @property
    def run_cost_usd(self) -> float:
        """What the run's scored calls cost: the candidates', a re-run baseline's and the LLM judge's."""
        return sum(c.cost_usd for c in self.candidates) + self.rerun_baseline_cost_usd + self.judge_cost_usd

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        d["run_cost_usd"] = self.run_cost_usd
        for c in d["candidates"]:
            del c["findings"]
        return d


def excerpt(text: str, limit: int = 160) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def _reasons_of(r: Any) -> str:
    if r.status == ERRORED:
        return f"error: {r.error}"
    failed = [f"{e.get('name')}: {e.get('reason')}" for e in (r.evaluations or []) if not e.get("passed")]
    return "; ".join(failed) or "failed"


def _answer(r: Any) -> str:
    return f"[error] {excerpt(r.error, 120)}" if r.status == ERRORED else excerpt(r.output)


def _outcome(r: Any, errors: str) -> bool | None:
    """passed -> True, failed -> False, errored -> False (errors: fail) or None (left out)."""
    if r.status == ERRORED:
        return None if errors == "exclude" else False
    return r.status == "passed"


def pair_outcome(base: Any | None, cand: Any, errors: str) -> tuple[bool, bool] | None:
    """(baseline passed, candidate passed) of one case, or None when the pair is left out of the test (no baseline
    result yet, or an errored side with `errors: exclude`)."""
    ob = None if base is None else _outcome(base, errors)
    oc = _outcome(cand, errors)
    return None if ob is None or oc is None else (ob, oc)


def _row(segment: str, pairs: Pairs) -> SegmentRow:
    row = SegmentRow(segment, pairs.n, pairs.before_pass, pairs.after_pass, pass_fail=pairs.pass_fail,
                     fail_pass=pairs.fail_pass)
    if pairs.n:
        row.before, row.after = pairs.before_pass / pairs.n, pairs.after_pass / pairs.n
        row.before_ci = wilson_interval(pairs.before_pass, pairs.n)
        row.after_ci = wilson_interval(pairs.after_pass, pairs.n)
        row.delta, row.delta_ci = row.after - row.before, newcombe_interval(pairs)
    return row


def _flips(paired: list[tuple[str, tuple[bool, bool] | None]], base: Mapping[str, Any], cases: Mapping[str, Any],
           inputs: Mapping[str, str]) -> list[Flip]:
    flips = []
    for cid, o in paired:
        if o is None or o[0] == o[1]:
            continue
        b, c = base[cid], cases[cid]
        down = o[0] and not o[1]
        flips.append(Flip(cid, "pass->fail" if down else "fail->pass", excerpt(inputs.get(cid, "")), _answer(b),
                          _answer(c), _reasons_of(c if down else b)))
    flips.sort(key=lambda f: f.direction != "pass->fail")  # the wound first
    return flips


def _candidate(name: str, model: str, cases: Mapping[str, Any], base: Mapping[str, Any], gating: Any, *,
               order: Callable[[str], Any], plans: Mapping[str, SegmentPlan], family_of: Callable[[str], str | None],
               inputs: Mapping[str, str], locks: Mapping[str, Mapping[str, str]],
               planned: Mapping[str, int], running: bool = False) -> CandidateReport:
    """`planned`: the run's cases per segment; a segment none of which ran for this candidate gets a row marked
    NOT_RUN (outside the test), and every row counts its cases without a result. `running`: the run is still
    running (its cases without a result are not run yet), not stopped."""
    errors = getattr(gating, "errors", "fail")
    segments: dict[str, list[str]] = {}
    for cid, r in cases.items():
        segments.setdefault(r.segment, []).append(cid)
    evidence, rows, paired, pooled = [], {}, {}, Pairs()
    for seg in sorted(segments):
        ids = sorted(segments[seg], key=order)
        outcomes: list[tuple[bool, bool] | None] = []
        errored = before_errored = 0
        for cid in ids:
            b, c = base.get(cid), cases[cid]
            outcomes.append(pair_outcome(b, c, errors))
            errored += c.status == ERRORED
            before_errored += b is not None and b.status == ERRORED
        plan = plans.get(seg)
        cuts = plan.schedule[:plan.taken] if plan is not None else [len(ids)]
        cuts = [min(k, len(ids)) for k in cuts[:-1]] + [len(ids)]
        looks = tuple(pairs_from(o for o in outcomes[:k] if o is not None) for k in cuts)
        schedule = tuple(plan.schedule) if plan is not None else (len(ids),)
        evidence.append(Evidence(seg, looks, schedule, family_of(seg)))
        pooled = pooled + looks[-1]
        row = _row(seg, looks[-1])
        row.errored, row.before_errored = errored, before_errored
        row.excluded = sum(1 for o in outcomes if o is None)
        rows[seg], paired[seg] = row, list(zip(ids, outcomes))
    outcomes = {cid: _outcome(r, errors) for cid, r in cases.items()}
    lock_results = check_locks(locks, outcomes, {cid: r.segment for cid, r in cases.items()})
    decision = decide(evidence, alpha=gating.alpha, margin=gating.margin, locks=lock_results)
    for seg, row in rows.items():
        row.not_run = max(0, int(planned.get(seg, 0)) - len(segments[seg]))
        row.not_run_yet = running and row.not_run > 0
    for seg in set(planned) - set(rows):  # the run stopped before any of them: said, never silently missing
        k = int(planned[seg])
        why = (f"not run yet: none of its {k} case(s) has run for {name} (the run is still running)" if running
               else f"not run: the run stopped before any of its {k} case(s) ran for {name}")
        rows[seg] = SegmentRow(seg, 0, verdict=NOT_RUN, not_run=k, not_run_yet=running, why=why)
    rows = dict(sorted(rows.items()))
    for f in decision.segments:
        row = rows[f.key]
        row.verdict, row.p_value, row.p_adjusted, row.more_cases = f.verdict, f.p_value, f.p_adjusted, f.more_cases
        row.looks, row.family, row.why, row.too_few = f.looks, f.family, f.why, f.too_few
        if row.verdict != OK:  # flips are listed where they matter: regression and inconclusive segments
            flips = _flips(paired[f.key], base, cases, inputs)
            row.flips, row.flips_total = flips[:MAX_FLIPS], len(flips)
    families = []
    for f in decision.families:
        frow = _row(f.key, f.pairs)
        frow.verdict, frow.p_value, frow.p_adjusted, frow.more_cases, frow.why, frow.too_few = (
            f.verdict, f.p_value, f.p_adjusted, f.more_cases, f.why, f.too_few)
        families.append(frow)
    overall = _row("all segments (pooled)", pooled)
    overall.verdict = ""
    overall.errored = sum(r.errored for r in rows.values())
    overall.before_errored = sum(r.before_errored for r in rows.values())
    overall.excluded = sum(r.excluded for r in rows.values())
    status, reasons = _status(name, decision, list(rows.values()), cases, base, gating, running=running)
    cost = sum(float(r.cost_usd or 0) for r in cases.values())
    return CandidateReport(name, model, list(rows.values()), overall, families, status, reasons, cost,
                           [*decision.families, *decision.segments], lock_results)


def _status(name: str, decision: Decision, rows: list[SegmentRow], cases: Mapping[str, Any],
            base: Mapping[str, Any], gating: Any, running: bool = False) -> tuple[str, list[str]]:
    reasons = []
    if not cases:  # a run stopped (or still running) before this candidate's first call (aggregate lists it)
        why = "not run yet (the run is still running)" if running else "the run stopped before any of its calls"
        return INCONCLUSIVE, [f"candidate {name} has no result: {why}; nothing to gate on"]
    errored = [r for r in cases.values() if r.status == ERRORED]
    if cases and len(errored) == len(cases):
        first = excerpt(errored[0].error, 200)
        # Every call was answered and the evaluators could not score the baseline's answers either (a judge that
        # answers in prose): not the candidate's doing, and no evidence, which blocks whatever the inconclusive
        # policy says (see aggregate). Evaluators that score the baseline but not the candidate's answers (a
        # candidate that echoes the rubric at the judge) are the candidate's doing: a regression, below.
        unscored_base = all(base.get(cid) is None or (base[cid].status == ERRORED and base[cid].evaluations)
                            for cid in cases)
        if all(r.evaluations for r in errored) and unscored_base:
            return INCONCLUSIVE, [f"{UNSCORED}: every one of candidate {name}'s {len(cases)} case(s) was answered "
                                  f"but no evaluator could score it; fix the evaluators (first error: {first})"]
        return REGRESSION, [f"candidate {name} errored on every one of its {len(cases)} case(s), so nothing it "
                            f"answered could be scored (first error: {first})"]
    # The same, in one segment: its every case answered on both sides and scored on neither (an evaluator that
    # fails on that tenant's inputs). Counted as failures on both sides (errors: fail) it read as "the baseline
    # passed none", a segment too thin to judge, and the gate passed over a segment nobody had looked at.
    status = decision.status
    unscored = _unscored_segments(cases, base)
    if unscored:
        first = excerpt(next((r.error for r in cases.values() if r.segment in unscored and r.error), ""), 200)
        for r in rows:
            if r.segment in unscored:
                r.verdict, r.too_few, r.more_cases = INCONCLUSIVE, True, None
                r.why = f"{UNSCORED}: no evaluator could score its cases, the baseline's or candidate {name}'s"
        reasons.append(f"{UNSCORED}: segment(s) {', '.join(sorted(unscored))} of candidate {name} were answered but "
                       f"no evaluator could score them, nor the baseline there; fix the evaluators (first error: "
                       f"{first})")
        if status == OK:
            status = INCONCLUSIVE
    for lk in decision.broken_locks:
        reasons.append(f"{lk.describe()}: a regression whatever the statistics (a lock is a unit test)")
    for f in decision.families:
        if f.verdict != OK:
            reasons.append(f"family {f.key}: {f.verdict}: {f.why}")
    for r in rows:
        if r.verdict == REGRESSION:
            reasons.append(f"segment {r.segment}: regression: {r.why}")
    for r in rows:
        if r.verdict == INCONCLUSIVE:
            more = "" if r.too_few or not r.more_cases else f"; ~{r.more_cases} more case(s) would decide it (80% power)"
            if r.segment not in unscored:  # said first, above
                reasons.append(f"segment {r.segment}: inconclusive: {r.why}{more}")
    missing = [r for r in rows if r.verdict == NOT_RUN]
    if missing:
        what = f"segment(s) {', '.join(r.segment for r in missing)} ({sum(r.not_run for r in missing)} case(s))"
        why = (f"none of them has run for candidate {name} yet (the run is still running)" if running
               else f"the run stopped before any of them ran for candidate {name}")
        reasons.append(f"{NOT_RUN}{' yet' if running else ''}: {what}: {why}; the verdict says nothing about them")
    if status == OK and decision.segments:
        m = len(decision.families) or len(decision.segments)
        what = "families" if decision.families else "segments"
        reasons.append(f"no regression: {m} {what} within margin {gating.margin:g} or not significant at alpha "
                       f"{gating.alpha:g} (Holm across {what})")
    return status, reasons


def _unscored_segments(cases: Mapping[str, Any], base: Mapping[str, Any]) -> set[str]:
    """Segments whose every candidate case was answered but errored in the evaluators, and whose baseline cases
    (where there are any) were not scored either."""
    by_seg: dict[str, list[str]] = {}
    for cid, r in cases.items():
        by_seg.setdefault(r.segment, []).append(cid)
    return {seg for seg, ids in by_seg.items()
            if all(cases[c].status == ERRORED and cases[c].evaluations for c in ids)
            and all(base.get(c) is None or (base[c].status == ERRORED and base[c].evaluations) for c in ids)}


def aggregate(results: Iterable[Any], gating: Any, *, run_id: str = "", status: str = "complete",
              segment_by: Sequence[str] = (), baseline_mode: str = "logged", models: dict[str, str] | None = None,
              n_cases: int = 0, skipped: dict[str, int] | None = None, notes: Sequence[str] = (),
              plans: Mapping[str, SegmentPlan] | None = None, order: Callable[[str], Any] | None = None,
              family_of: Callable[[str], str | None] | None = None, inputs: Mapping[str, str] | None = None,
              production_errors: dict[str, Any] | None = None, escalation: dict[str, Any] | None = None,
              dataset: str = "", locks: Mapping[str, Mapping[str, str]] | None = None,
              judge_cost_usd: float = 0.0, segments: Mapping[str, int] | None = None,
              stop_reason: str = "", running: bool = False) -> Report:
    """Case results (objects with candidate, case_id, segment, status, error, output, evaluations, cost_usd) ->
    Report. The baseline's results are those of candidate "baseline"; each candidate is compared with it pairwise.
    `plans` (escalation) say which looks each segment had, `order` the cases' seeded order within a segment.
    `segments`: the run's cases per segment (a segment without a result is listed as not run; with them, a candidate
    of `models` without any result is listed too). `stop_reason`: why the run stopped before its end (its budget).
    `running`: the run (not complete) is still running: what has no result is not run yet, not stopped before.
    A candidate without any result is listed but is not gated on: a run that is not complete reads "incomplete"
    unless what did run says otherwise (a complete run has a result of every candidate)."""
    by_cand: dict[str, dict[str, Any]] = {}
    for r in results:
        by_cand.setdefault(r.candidate, {})[r.case_id] = r
    base = by_cand.pop(BASELINE, {})
    running = running and status != "complete"
    unreached: set[str] = set()  # candidates the run stopped (or is still running) before: listed, not gated on
    if segments and status != "complete":
        unreached = {name for name in models or {} if name not in by_cand}
        for name in unreached:
            by_cand[name] = {}  # stopped before its first call: its segments are listed as not run
    errors = getattr(gating, "errors", "fail")
    reports = [_candidate(name, (models or {}).get(name, ""), by_cand[name], base, gating, order=order or str,
                          plans=plans or {}, family_of=family_of or (lambda s: None), inputs=inputs or {},
                          locks=locks or {}, planned=segments or {}, running=running)
               for name in sorted(by_cand)]
    per_target = {c.candidate: c.overall.errored for c in reports}
    per_target[BASELINE] = sum(1 for r in base.values() if r.status == ERRORED)
    n_errored = sum(per_target.values())
    reasons = [f"{c.candidate}: {x}" if len(reports) > 1 else x for c in reports for x in c.reasons]
    if not reports:
        reasons.append("no candidate result: nothing to gate on")
    if n_errored:
        by = ", ".join(f"{name} {n}" for name, n in per_target.items() if n)
        if errors == "exclude":
            if status == "complete":  # the test left these pairs out: the verdict is not the run's yet
                status = "incomplete"
            reasons.append(f"{n_errored} errored result(s) ({by}) are left out (errors: exclude); `tagway replay "
                           f"resume {run_id}` retries them")
        else:
            reasons.append(f"{n_errored} errored result(s) ({by}) count as failures (errors: fail)")
    if status != "complete":
        reasons.append(f"run {status}: the verdict covers only the cases that finished")
    # a candidate not run is no evidence, and not "inconclusive" either: the run is unfinished (exit 3 all the same)
    statuses = {c.status for c in reports if c.candidate not in unreached}
    # no candidate result is no evidence either way: inconclusive (which blocks by default), never "regression"
    overall = REGRESSION if REGRESSION in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses or not reports else OK
    unscored = any(x.startswith(UNSCORED) for c in reports for x in c.reasons)
    code = exit_code(overall, complete=status == "complete",  # nothing tested never passes, whatever the policy
                     inconclusive_blocks=getattr(gating, "inconclusive", "block") == "block" or not reports
                     or unscored)
    # an incomplete run never reads as a pass: what ran found nothing, the rest is still to run
    verdict = overall if overall != OK else "passed" if status == "complete" else "incomplete"
    notes = list(notes)
    if judge_cost_usd > 0:  # the judge's calls have no result row: without this line the costs shown add up short
        notes.append(f"the LLM judge's calls cost {fmt_usd(judge_cost_usd)}: counted in the run's spend and its "
                     "max_cost, in no candidate's cost")
    return Report(run_id, status, list(segment_by), _gating_dict(gating), baseline_mode, reports, verdict, code,
                  reasons, n_cases, n_errored, sum(float(r.cost_usd or 0) for r in base.values()),
                  dict(skipped or {}), notes, dict(production_errors or {}), dict(escalation or {}), dataset,
                  {k: dict(v) for k, v in (locks or {}).items()}, judge_cost_usd, dict(segments or {}), stop_reason)


def flipped_case_ids(results: Iterable[Any]) -> set[str]:
    """The case ids whose baseline and candidate outcomes differ (for fetching their inputs), any candidate."""
    by_case: dict[str, dict[str, str]] = {}
    for r in results:
        by_case.setdefault(r.case_id, {})[r.candidate] = r.status
    out = set()
    for cid, st in by_case.items():
        b = st.get(BASELINE)
        if b is not None and any((s == "passed") != (b == "passed") for c, s in st.items() if c != BASELINE):
            out.add(cid)
    return out


def _gating_dict(g: Any) -> dict:
    if hasattr(g, "model_dump"):
        return g.model_dump()
    return {k: getattr(g, k) for k in ("alpha", "margin", "inconclusive", "errors") if hasattr(g, k)}
