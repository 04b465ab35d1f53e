"""One replay, start to end: select the cases (slice or dataset), pin them, record the run, run the targets
through the gateway, aggregate, gate, record the verdict. `resume` picks a run up from ClickHouse and runs only
the (candidate, case) pairs without a score (no result yet, or an errored one). The CLI is a thin shell over these
three functions.

A run is complete when every (target, case) pair has a score: pairs not run (budget, Ctrl-C) and errored results
(the gateway failed after its retries, an evaluator or the judge failed) leave it incomplete.
"""
from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from .datasets import RUN_DATASET_PREFIX, is_file_ref, load_cases, save_dataset, validate_run_id
from .report import Report, aggregate, render_json
from .runner import GATEWAY_APP, RunOutcome, Runner, gateway_client, targets_for
from .slice import Case, EmptySliceError, Sampled, select_slice
from .spec import ReplaySpec, SpecError, parse_spec
from .store import RunRow, done_keys, get_run, read_results, write_results, write_run

__all__ = ["RunOptions", "RunResult", "RunExistsError", "new_run_id", "start_run", "resume_run", "report_for",
           "spec_to_json"]


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


@dataclasses.dataclass
class RunResult:
    run_id: str
    report: Report
    outcome: RunOutcome | None

    @property
    def exit_code(self) -> int:
        if self.report.status != "complete":
            return 3
        return 0 if self.report.passed else 1


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def spec_to_json(spec: ReplaySpec) -> str:
    return spec.model_dump_json(by_alias=True, exclude_none=True)


def _select(store: Any, spec: ReplaySpec) -> tuple[list[Case], dict[str, int], list[str]]:
    if spec.slice is not None:
        cases, sampled = select_slice(store, spec.slice)
        return cases, sampled.skipped, sampled.notes
    cases, skipped = load_cases(store, spec.dataset or "")
    if not cases:
        raise EmptySliceError(f"dataset {spec.dataset!r} has no replayable case "
                              f"({'; '.join(f'{n} {r}' for r, n in skipped.items()) or 'empty'})")
    return cases, skipped, []


async def start_run(store: Any, spec: ReplaySpec, opts: RunOptions) -> RunResult:
    run_id = validate_run_id(opts.run_id or new_run_id())
    if get_run(store, run_id) is not None:
        raise RunExistsError(f"run {run_id} exists; use tagway replay resume {run_id}")
    cases, skipped, notes = _select(store, spec)
    if spec.slice is not None:
        dataset_id = RUN_DATASET_PREFIX + run_id
        save_dataset(store, dataset_id, [Sampled(c.case_id, c.segment) for c in cases],
                              description=f"cases of replay run {run_id}")
    else:
        dataset_id = spec.dataset or ""
    run = RunRow(run_id, "running", spec_to_json(spec), dataset_id, spec.judge_version,
                 [c.name for c in spec.candidates], list(spec.segment_by), len(cases))
    write_run(store, run)
    return await _execute(store, spec, run, cases, opts, skip=set(), skipped=skipped, notes=notes)


async def resume_run(store: Any, run_id: str, opts: RunOptions) -> RunResult:
    run = get_run(store, run_id)
    if run is None:
        raise SpecError(f"no replay run {run_id!r}")
    spec = parse_spec(run.spec, f"run {run_id} spec")
    if run.dataset_id == RUN_DATASET_PREFIX + run.run_id:  # the cases this run pinned: an id, whatever it looks like
        cases, skipped = load_cases(store, run.dataset_id, pinned_id=True)
    else:
        if is_file_ref(run.dataset_id) and opts.spec_dir and not Path(run.dataset_id).is_absolute():
            ref = str(opts.spec_dir / run.dataset_id)
        else:
            ref = run.dataset_id
        cases, skipped = load_cases(store, ref)
    skip = done_keys(store, run_id, include_errored=not opts.retry_errored)
    return await _execute(store, spec, run, cases, opts, skip=skip, skipped=skipped,
                          notes=[f"resumed: {len(skip)} result(s) kept from before"],
                          spent_before=run.cost_usd)


async def _execute(store: Any, spec: ReplaySpec, run: RunRow, cases: list[Case], opts: RunOptions, *,
                   skip: set[tuple[str, str]], skipped: dict[str, int], notes: list[str],
                   spent_before: float = 0.0) -> RunResult:
    targets = targets_for(spec, opts.spec_dir)
    outcome: RunOutcome | None = None
    runner: Runner | None = None
    status = "incomplete"
    try:
        async with gateway_client(base_url=opts.gateway_url, transport=opts.transport, in_process=opts.in_process,
                                  app_ref=opts.app_ref, app_config=opts.gateway_config, timeout=spec.timeout,
                                  concurrency=spec.concurrency) as client:
            runner = Runner(client, spec, run_id=run.run_id, api_key=opts.api_key, dataset_id=run.dataset_id,
                            sink=lambda rows: write_results(store, rows), progress=opts.progress,
                            backoff_base=opts.backoff_base, spent_before=spent_before, max_cost=opts.max_cost,
                            concurrency=opts.concurrency)
            outcome = await runner.run(cases, targets, skip)
        status = "complete" if outcome.complete else "incomplete"
        if outcome.stop_reason:
            notes = [*notes, outcome.stop_reason]
    finally:
        # even a crash or Ctrl-C leaves a consistent run row: incomplete, with what is in replay_results and what
        # the calls made so far cost (a resume's budget starts from it)
        report = report_for(store, run.run_id, spec, status=status, n_cases=len(cases), skipped=skipped, notes=notes)
        spent = runner.spent if runner is not None else spent_before
        write_run(store, dataclasses.replace(run, status=report.status, verdict=report.verdict,
                                             report_json=render_json(report), cost_usd=spent,
                                             finished_at=time.time()))
    return RunResult(run.run_id, report, outcome)


def report_for(store: Any, run_id: str, spec: ReplaySpec, *, status: str, n_cases: int = 0,
               skipped: dict[str, int] | None = None, notes: list[str] | None = None) -> Report:
    """Aggregate what replay_results holds for the run (this session's results and any earlier ones)."""
    models = {c.name: c.model for c in spec.candidates}
    return aggregate(read_results(store, run_id), spec.gating, run_id=run_id, status=status,
                     segment_by=spec.segment_by, baseline_mode=spec.baseline.mode, models=models, n_cases=n_cases,
                     skipped=skipped, notes=notes or [])
