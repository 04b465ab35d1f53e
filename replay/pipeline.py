"""One replay, start to end: select the cases (slice or dataset), pin them, record the run, run the targets
through the gateway, aggregate, gate, escalate (draw more cases for the segments the gate cannot decide yet, look
again), record the verdict. `resume` picks a run up from ClickHouse and runs only the (candidate, case) pairs
without a result (and, by default, the errored ones again). The CLI is a thin shell over these functions.

A run is complete when every (target, case) pair has a result; with `errors: exclude` an errored result is not a
score and leaves it incomplete too.
"""
from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import orjson

from exporters.tables import fmt_usd
from exporters.vocabulary import JUDGE_SOURCE

from .datasets import (RUN_DATASET_PREFIX, append_to_run_dataset, is_file_ref, load_cases, load_dataset, save_dataset,
                       validate_run_id)
from .datasets.resolve import Resolved, resolve
from .gate import SegmentPlan, next_draws, plan
from .render import render_json
from .report import Report, aggregate, flipped_case_ids
from .run_lock import run_lock
from .runner import (GATEWAY_APP, NO_GATEWAY, WHOAMI_PATH, Answer, Caller, FatalRunError, RunOutcome, Runner, Target,
                     check_gateway, check_in_process, check_models, gateway_client, inline_prompts, models_named,
                     recorded_answer, targets_for)
from .slice import Case, EmptySliceError, SampleResult, Sampled, count_production_errors, fetch_cases, order_key, \
    sample_pool, select_slice
from .spec import ReplaySpec, SpecError, parse_spec
from .store import (RunRow, case_inputs, done_keys, get_run, read_results, recorded_calls, recorded_cost, write_results,
                    write_run)

__all__ = ["RunOptions", "RunResult", "RunExistsError", "GateState", "new_run_id", "start_run", "resume_run",
           "report_for", "spec_to_json", "check_serving"]


class RunExistsError(ValueError):
    """`start_run` was given the id of a run that is already recorded (its results would be merged in)."""


@dataclasses.dataclass
class RunOptions:
    gateway_url: str | None = None
    transport: httpx.AsyncBaseTransport | None = None
    in_process: bool = False
    app_ref: str = GATEWAY_APP
    gateway_config: Path | None = None  # in-process: the config file the gateway app is built from (else its default)
    api_key: str = ""
    progress: bool = True
    spec_dir: Path | None = None
    run_id: str | None = None
    retry_errored: bool = True  # resume: re-run the pairs whose newest result is errored, too
    backoff_base: float = 0.25
    max_cost: float | None = None  # overrides the spec's (a resume may raise the budget); total for the run
    concurrency: int | None = None
    # called with the run id once the run is stored and the gateway answered: from then on it can be resumed
    on_running: Callable[[str], None] | None = None


@dataclasses.dataclass
class RunResult:
    run_id: str
    report: Report
    outcome: RunOutcome | None
    stopped: str = ""  # why the run stopped before its end (the gateway went away): the report is of what completed

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


@dataclasses.dataclass
class GateState:
    """What the gate needs beyond the results, kept in the run's stored report so `report` and `resume` see it:
    each segment's planned looks (escalation) and the production errors the slice left out or kept."""
    plans: dict[str, SegmentPlan] = dataclasses.field(default_factory=dict)
    extra_cases: int = 0
    extra_cost: float = 0.0
    production_errors: dict[str, Any] = dataclasses.field(default_factory=dict)
    locks: dict[str, dict] = dataclasses.field(default_factory=dict)  # trace id -> {expect, note}: the dataset's locks
    # the run's cases per segment: a report lists a segment the run stopped before as not run, never leaves it out
    segments: dict[str, int] = dataclasses.field(default_factory=dict)

    def escalation_json(self) -> dict:
        return {"plans": {k: p.to_json() for k, p in sorted(self.plans.items())}, "extra_cases": self.extra_cases,
                "cost_usd": round(self.extra_cost, 10)}

    def stored_json(self) -> str:
        """What a run row holds before its first report (the report carries the same keys)."""
        return orjson.dumps({"escalation": self.escalation_json(), "production_errors": self.production_errors,
                             "locks": self.locks, "segments": self.segments}).decode()

    def next_look(self, report: Report, esc: Any, cost_per_case: float = 0.0) -> tuple[dict[str, int], str]:
        """The segments that get their next planned look and how many cases each (replay.gate.next_draws over
        every candidate's verdicts, within the case budget), or ({}, why not) when escalation stops here."""
        if report.status != "complete":
            return {}, ""
        findings = [f for c in report.candidates for f in c.findings]
        draws = next_draws(findings, self.plans, esc.max_cases - self.extra_cases, trigger=esc.trigger)
        if draws and esc.max_cost is not None and self.extra_cost + cost_per_case * sum(draws.values()) > esc.max_cost:
            return {}, (f"escalation stopped: its next look would pass escalation.max_cost ${esc.max_cost:g} "
                        f"(spent {fmt_usd(self.extra_cost, 4)})")
        return draws, ""

    def took_look(self, draws: dict[str, int], drawn: int) -> None:
        for seg in draws:
            self.plans[seg].taken += 1
        self.extra_cases += drawn

    @classmethod
    def from_report_json(cls, text: str) -> "GateState":
        d = orjson.loads(text) if text else {}
        esc = d.get("escalation") or {}
        segments = d.get("segments") if isinstance(d.get("segments"), dict) else {}
        return cls({k: SegmentPlan.from_json(v) for k, v in (esc.get("plans") or {}).items()},
                   int(esc.get("extra_cases") or 0), float(esc.get("cost_usd") or 0.0),
                   dict(d.get("production_errors") or {}), dict(d.get("locks") or {}),
                   {str(k): int(v) for k, v in segments.items() if isinstance(v, int)})


def _per_segment(cases: list[Case]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in cases:
        out[c.segment] = out.get(c.segment, 0) + 1
    return out


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def spec_to_json(spec: ReplaySpec) -> str:
    return spec.model_dump_json(by_alias=True, exclude_none=True)


def _select(store: Any, spec: ReplaySpec) -> tuple[list[Case], dict[str, int], list[str], SampleResult | None,
                                                  Resolved | None]:
    if spec.slice is not None:
        cases, sampled = select_slice(store, spec.slice)
        return cases, sampled.skipped, sampled.notes, sampled, None
    found = resolve(store, spec.dataset or "")
    if not found.cases:
        raise EmptySliceError(f"dataset {spec.dataset!r} has no replayable case "
                              f"({'; '.join(f'{n} {r}' for r, n in found.skipped.items()) or 'empty'})")
    notes = [f"dataset {found.dataset_id}"] if found.dataset_id != spec.dataset else []
    return found.cases, found.skipped, notes, None, found


def _initial_state(store: Any, spec: ReplaySpec, sampled: SampleResult | None) -> GateState:
    state = GateState()
    if spec.slice is None or sampled is None:
        return state
    state.production_errors = {"count": count_production_errors(store, spec.slice),
                               "included": spec.slice.status != "ok"}
    esc = spec.gating.escalation
    if spec.escalates:
        state.plans = plan(sampled.selected, sampled.available, max_per_segment=esc.max_per_segment,
                           extra_looks=esc.looks)
    return state


async def _check_gateway(opts: RunOptions, spec: ReplaySpec) -> Caller | None:
    """A gateway given by URL answers and takes the key before the run stores anything (runner.check_gateway), and
    says which key it is; an in-process one can be built and is not refused for a gateway serving its store (None:
    the run's gateway is this process's own app, built from a config its user holds, so its key guards nothing)."""
    if opts.in_process:
        check_in_process(opts.app_ref, opts.gateway_config)
        return None
    if opts.transport is not None:
        return None  # a given transport: the caller's
    if not opts.gateway_url:
        raise FatalRunError(NO_GATEWAY)
    async with gateway_client(base_url=opts.gateway_url, timeout=min(spec.timeout, 10.0), concurrency=1) as client:
        who = await check_gateway(client, opts.api_key, opts.gateway_url)
        await check_models(client, opts.api_key, models_named(spec))
    return who


async def check_serving(spec: ReplaySpec, gateway_url: str, api_key: str) -> None:
    """What `run` checks before it stores anything, for `plan`: the gateway at `gateway_url` answers, takes the
    key, and serves every model the spec calls by name (its candidates, a re-run baseline, the LLM judges) to it.
    Raises FatalRunError (one line)."""
    await _check_gateway(RunOptions(gateway_url=gateway_url, api_key=api_key), spec)


def _resume_refusal(run: RunRow, who: Caller | None, *, asked: bool = True) -> str | None:
    """Why this key may not resume `run` (None: it may): only the key that started it, or the admin key. A resume
    sends the run's cases (its customers' prompts) with this key and writes the answers into the run. `asked`: the
    gateway was asked whose key this is (False only in-process or with a given transport, where the key guards
    nothing); `who` None after asking means it did not say (a 5xx, a timeout, a proxy that strips /v1/tagway/*)."""
    if not asked or (who is not None and (who.admin or (run.key_id and who.key_id == run.key_id))):
        return None
    if who is None:
        if not run.key_id:
            return None  # nothing to check against: a run that recorded no key, as before keys were recorded
        # an unknown key is refused: letting it through let any key that may mark replay calls resume another's run
        return (f"run {run.run_id} was started with key {run.key_id!r}, and the gateway could not say whose key this "
                f"is ({WHOAMI_PATH} did not answer): resume it with that key or the admin key through a gateway "
                "that answers it")
    if run.key_id:
        return (f"run {run.run_id} was started with key {run.key_id!r}, not this one ({who.key_id!r}): resume it "
                "with that key or the admin key")
    return (f"run {run.run_id} recorded no key (started in-process, or before tagway recorded it): resume it with "
            "the admin key")


def _load_evaluators(spec: ReplaySpec, source: str, opts: RunOptions, hint: str = "") -> None:
    """Import the spec's `python` evaluators before the run is stored or a call paid for: one that cannot be loaded
    failed every case once the whole run had been paid (replay.evaluators.load_python_evaluators). The caller puts
    their directory on sys.path (the CLI: beside the spec, and the working directory)."""
    from .evaluators import EvaluatorError, load_python_evaluators
    try:
        load_python_evaluators(spec.evaluators)
    except EvaluatorError as e:
        where = f"{opts.spec_dir} and the working directory" if opts.spec_dir else "the working directory"
        raise SpecError(f"{source}: evaluators: {e} (looked in {where}{hint})") from None


async def start_run(store: Any, spec: ReplaySpec, opts: RunOptions) -> RunResult:
    run_id = validate_run_id(opts.run_id or new_run_id())
    with run_lock(run_id):  # a resume of this run, while it runs, is refused (replay/run_lock.py)
        return await _start_run(store, spec, opts, run_id)


async def _start_run(store: Any, spec: ReplaySpec, opts: RunOptions, run_id: str) -> RunResult:
    if get_run(store, run_id) is not None:
        raise RunExistsError(f"run {run_id} exists; use tagway replay resume {run_id}")
    targets = targets_for(spec, opts.spec_dir)  # prompt files read (and refused) before the run is stored
    _load_evaluators(spec, "spec", opts)
    who = await _check_gateway(opts, spec)
    cases, skipped, notes, sampled, found = _select(store, spec)
    if found is None:
        dataset_id = RUN_DATASET_PREFIX + run_id
        save_dataset(store, dataset_id, [Sampled(c.case_id, c.segment) for c in cases],
                     description=f"cases of replay run {run_id}")
    else:
        dataset_id = found.dataset_id  # the exact version ('refunds' -> 'refunds@3'), so resume and reports agree
    # the spec stored holds its prompt files' text as read now: a resume (from another directory, another checkout,
    # after the file was edited) sends the run's own prompts, and the run's id names no local path
    run = RunRow(run_id, "running", spec_to_json(inline_prompts(spec, targets)), dataset_id, spec.judge_version,
                 [c.name for c in spec.candidates], list(spec.segment_by), len(cases), key_id=who.key_id if who else "")
    state = _initial_state(store, spec, sampled)
    state.segments = _per_segment(cases)
    if found is not None:
        state.locks = {t: lk.to_json() for t, lk in found.locks.items()}
    write_run(store, dataclasses.replace(run, report_json=state.stored_json()))
    if opts.on_running is not None:
        opts.on_running(run_id)
    return await _execute(store, spec, run, cases, targets, opts, skip=set(), skipped=skipped, notes=notes,
                          state=state, sampled=sampled)


async def resume_run(store: Any, run_id: str, opts: RunOptions) -> RunResult:
    with run_lock(run_id):  # one process at a time per run: two resumes paid for every case twice
        return await _resume_run(store, run_id, opts)


async def _resume_run(store: Any, run_id: str, opts: RunOptions) -> RunResult:
    run = get_run(store, run_id)
    if run is None:
        raise SpecError(f"no replay run {run_id!r}")
    spec = parse_spec(run.spec, f"run {run_id} spec", stored=True)
    targets = targets_for(spec, opts.spec_dir)
    # as `replay run`: an evaluator that cannot be loaded is one line before any call (it errored every case)
    _load_evaluators(spec, f"run {run_id} spec", opts, hint=": --spec-dir DIR names where they live")
    refusal = _resume_refusal(run, await _check_gateway(opts, spec),
                              asked=not opts.in_process and opts.transport is None)  # as _check_gateway skips
    if refusal:
        raise FatalRunError(refusal)
    if opts.on_running is not None:
        opts.on_running(run_id)
    if run.dataset_id == RUN_DATASET_PREFIX + run.run_id:  # the cases this run pinned: an id, whatever it looks like
        cases, skipped = load_cases(store, run.dataset_id, pinned_id=True)
    else:  # a dataset version ('refunds@3') or a file: the same cases as the run started with
        ref = run.dataset_id
        if is_file_ref(ref) and not Path(ref).is_absolute() and not Path(ref).is_file() and opts.spec_dir:
            ref = str(opts.spec_dir / ref)  # read from the working directory, as the run did; else beside the spec
        found = resolve(store, ref)
        cases, skipped = found.cases, found.skipped
    skip = done_keys(store, run_id, include_errored=not opts.retry_errored)
    state = GateState.from_report_json(run.report_json)
    state.segments = _per_segment(cases)  # escalated cases included (they are pinned to the run's dataset)
    sampled = None
    if spec.escalates and state.plans:
        sampled, _ = sample_pool(store, spec.slice)  # where further looks draw from
    names = {t.name for t in targets if not t.logged}  # a logged baseline's rows are kept too, but never replayed
    kept = sum(1 for candidate, _ in skip if candidate in names)
    notes = [f"resumed: {kept} replayed result(s) kept from before"]
    recorded = _paid_answers(store, run, cases, targets, skip)
    if recorded:
        notes.append(f"{len(recorded)} call(s) answered before the stop, whose results were not stored, scored from "
                     "the gateway's record without calling again")
    # a killed CLI never wrote what it spent: the gateway's record of the run's calls says it
    spent = max(run.cost_usd, recorded_cost(store, run_id))
    return await _execute(store, spec, dataclasses.replace(run, n_cases=len(cases)), cases, targets, opts, skip=skip,
                          skipped=skipped, notes=notes, spent_before=spent, state=state, sampled=sampled,
                          recorded=recorded)


def _paid_answers(store: Any, run: RunRow, cases: list[Case], targets: list[Target],
                  skip: set[tuple[str, str]]) -> dict[tuple[str, str], Answer]:
    """The answers a stopped run's calls got that no stored result holds (the CLI stopped before writing them),
    from the gateway's record: for calling targets, where the record is what the same request got and the client
    saw (runner.recorded_answer), made with the run's key (or the admin key) when it
    recorded one."""
    by_case = {c.case_id: c for c in cases}
    calling = {t.name: t for t in targets if not t.logged}
    out: dict[tuple[str, str], Answer] = {}
    for call in recorded_calls(store, run.run_id, run.key_id):
        key = (call["candidate"], call["case_id"])
        target, case = calling.get(key[0]), by_case.get(key[1])
        if target is None or case is None or key in skip:
            continue
        answer = recorded_answer(call, case, target)
        if answer is not None:
            out[key] = answer
    return out


async def _execute(store: Any, spec: ReplaySpec, run: RunRow, cases: list[Case], targets: list[Target],
                   opts: RunOptions, *,
                   skip: set[tuple[str, str]], skipped: dict[str, int], notes: list[str], state: GateState,
                   sampled: SampleResult | None, spent_before: float = 0.0,
                   recorded: dict[tuple[str, str], Answer] | None = None) -> RunResult:
    outcome: RunOutcome | None = None
    runner: Runner | None = None
    status = "incomplete"
    stopped = stop_reason = ""
    n_cases = len(cases)
    # the judge calls of this run's earlier sessions (a resume): this session's own are counted as they are paid,
    # and the record alone lags this session's last batch
    judge_before = recorded_cost(store, run.run_id, (JUDGE_SOURCE,))
    try:
        async with gateway_client(base_url=opts.gateway_url, transport=opts.transport, in_process=opts.in_process,
                                  app_ref=opts.app_ref, app_config=opts.gateway_config, timeout=spec.timeout,
                                  concurrency=opts.concurrency or spec.concurrency) as client:  # as the runner's
            runner = Runner(client, spec, run_id=run.run_id, api_key=opts.api_key, dataset_id=run.dataset_id,
                            sink=lambda rows: write_results(store, rows), progress=opts.progress,
                            backoff_base=opts.backoff_base, spent_before=spent_before, max_cost=opts.max_cost,
                            concurrency=opts.concurrency)
            outcome = await runner.run(cases, targets, skip, recorded)
            if sampled is not None and state.plans and outcome.complete:
                outcome, n_cases = await _escalate(store, spec, run, runner, targets, sampled, state, outcome,
                                                   [c.case_id for c in cases])
        status = "complete" if outcome.complete else "incomplete"
        if outcome.stop_reason:
            notes = [*notes, outcome.stop_reason]
        if not outcome.complete:  # the runner's stop reason: its budget (an escalation's own stop leaves it complete)
            stop_reason = outcome.stop_reason
    except FatalRunError as e:
        if not e.unreachable:  # a wrong model or key: the caller's to say
            raise
        # the gateway went away: what completed is stored and reported (incomplete), resume runs the rest
        stopped = str(e)
        notes = [*notes, f"stopped: {stopped}; `tagway replay resume {run.run_id}` runs the rest"]
    finally:
        # even a crash or Ctrl-C leaves a consistent run row: incomplete, with what is in replay_results and what
        # the calls made so far cost (a resume's budget starts from it)
        report = report_for(store, run.run_id, spec, status=status, n_cases=n_cases, skipped=skipped, notes=notes,
                            state=state, dataset=run.dataset_id, stop_reason=stop_reason,
                            judge_spent=judge_before + (runner.judge_spent if runner is not None else 0.0))
        spent = runner.spent if runner is not None else spent_before
        write_run(store, dataclasses.replace(run, status=report.status, verdict=report.verdict, n_cases=n_cases,
                                             report_json=render_json(report), cost_usd=spent,
                                             finished_at=time.time()))
    return RunResult(run.run_id, report, outcome, stopped)


async def _escalate(store: Any, spec: ReplaySpec, run: RunRow, runner: Runner, targets: list[Target],
                    sampled: SampleResult, state: GateState, outcome: RunOutcome,
                    case_ids: list[str]) -> tuple[RunOutcome, int]:
    """Look, decide, draw the next planned look for the segments that go on, run it, look again; until no segment
    goes on, the case budget or the escalation's cost budget is spent, or a run stops. Returns the merged outcome
    and the run's case count."""
    esc = spec.gating.escalation
    # every call the run pinned, including any its content query skipped, so none is drawn twice
    drawn = set(case_ids) | {p.trace_id for p in load_dataset(store, run.dataset_id, validate=False)}
    while True:
        report = report_for(store, run.run_id, spec, status="complete", n_cases=len(drawn), state=state,
                            with_inputs=False)
        draws, why = state.next_look(report, esc, runner.spent / max(len(drawn), 1))
        if why:
            outcome.stop_reason = why
        if not draws:
            break
        picked = sampled.next_picks(draws, drawn)
        state.took_look(draws, len(picked))
        if not picked:
            break
        append_to_run_dataset(store, run.dataset_id, picked, len(drawn), f"escalation of replay run {run.run_id}")
        drawn |= {p.trace_id for p in picked}
        write_run(store, dataclasses.replace(run, n_cases=len(drawn), report_json=state.stored_json()))
        new_cases, _ = fetch_cases(store, picked)
        for c in new_cases:  # the cases a run holds, per segment (fetched: a call without content is no case)
            state.segments[c.segment] = state.segments.get(c.segment, 0) + 1
        before = runner.spent
        more = await runner.run(new_cases, targets, set())
        state.extra_cost += runner.spent - before
        outcome = RunOutcome(outcome.results + more.results, runner.spent, more.complete, more.stop_reason,
                             more.pending, outcome.errored + more.errored)
        if not more.complete:
            break
    return outcome, len(drawn)


def report_for(store: Any, run_id: str, spec: ReplaySpec, *, status: str, n_cases: int = 0,
               skipped: dict[str, int] | None = None, notes: list[str] | None = None,
               state: GateState | None = None, with_inputs: bool = True, dataset: str = "",
               judge_spent: float = 0.0, stop_reason: str = "", running: bool = False) -> Report:
    """Aggregate what replay_results holds for the run (this session's results and any earlier ones), with the
    flipped cases' inputs from llm_calls, and what its judge calls cost (the gateway's record, or `judge_spent`
    when this session knows more: its last calls reach the record a batch later). `running`: the run is still
    running (`status` incomplete): what has no result is not run yet, not stopped before."""
    state = state or GateState()
    results = read_results(store, run_id)
    inputs = case_inputs(store, flipped_case_ids(results), run_id=run_id) if with_inputs else {}
    seed = spec.slice.sampling.seed if spec.slice is not None else 0
    models = {c.name: c.model for c in spec.candidates}
    return aggregate(results, spec.gating, run_id=run_id, status=status, segment_by=spec.segment_by,
                     baseline_mode=spec.baseline.mode, models=models, n_cases=n_cases, skipped=skipped,
                     notes=notes or [], plans=state.plans, order=lambda cid: order_key(seed, cid),
                     family_of=spec.family_of, inputs=inputs, production_errors=state.production_errors,
                     escalation=state.escalation_json() if state.plans else {}, dataset=dataset,
                     locks=state.locks, segments=state.segments, stop_reason=stop_reason, running=running,
                     judge_cost_usd=max(recorded_cost(store, run_id, (JUDGE_SOURCE,)), judge_spent))
