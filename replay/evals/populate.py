"""Auto-population followed by evaluation (seed 002: a delta run "is started automatically when a dataset
auto-populates"): declare what a dataset takes from production and which evaluators follow, then populate it
(replay.datasets.populate) and run each evaluator in delta mode on the new version, so only the rows added since
its last run on the dataset are scored and only their tags reconciled. Nothing new: no version and no run.
"""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Sequence

from exporters import autopopulate as store_ap
from exporters.datasets import history

from ..datasets.autopopulate import AutoPopulate
from ..datasets.populate import Population, populate, require_declaration
from ..runner import FatalRunError
from .definition import DefinitionError
from .run import EvalOptions, EvalRunResult, LoadedEvaluator, _is_file, resolve_evaluators, run_evaluation

__all__ = ["declare", "evaluators_of", "ready", "judge_reachable", "Outcome", "populate_and_evaluate"]


def evaluators_of(store: Any, refs: Sequence[str]) -> list[LoadedEvaluator]:
    """The declared evaluators (saved NAME or NAME@VERSION; NAME takes its newest version at each population)."""
    files = [r for r in refs if _is_file(r)]
    if files:
        raise DefinitionError(f"--evaluator {files[0]}: name a saved evaluator (`tagway eval save {files[0]}` saves "
                              "it, then give its name)")
    return resolve_evaluators(store, refs) if refs else []


def declare(store: Any, name: str, spec: AutoPopulate | None, *, author: str) -> store_ap.Declaration:
    """Store `name`'s declaration (None: switch it off). The dataset and the evaluators must exist."""
    history(store, name)
    if spec is not None:
        evaluators_of(store, spec.evaluators)
    return store_ap.declare(store, name, spec.to_json() if spec is not None else None, author=author)


def ready(store: Any, name: str, opts: EvalOptions) -> list[LoadedEvaluator]:
    """The declared evaluators of `name`, checked before anything is added: the dataset auto-populates, its
    evaluators exist, and a judge can be reached when one of them needs it."""
    spec, _ = require_declaration(store, name)
    evaluators = evaluators_of(store, spec.evaluators)
    judged = [e.ref for e in evaluators if e.definition.is_llm]
    if judged and not (opts.gateway_url or opts.transport or opts.in_process):
        raise DefinitionError(f"no gateway for the judge of {', '.join(judged)} (declared by {name}): pass --gateway "
                              "URL (or env TAGWAY_GATEWAY_URL), or --in-process")
    return evaluators


async def judge_reachable(evaluators: Sequence[LoadedEvaluator], opts: EvalOptions) -> None:
    """Before anything is added: the gateway a declared judge calls through answers and takes the key (a version
    added and then never scored would be skipped by the next population as not new). Raises FatalRunError."""
    if not opts.gateway_url or opts.transport is not None or opts.in_process:
        return
    if not any(e.definition.is_llm for e in evaluators):
        return
    from ..runner import check_gateway, gateway_client  # noqa: PLC0415
    async with gateway_client(base_url=opts.gateway_url) as client:
        await check_gateway(client, opts.api_key, opts.gateway_url)


@dataclasses.dataclass
class Outcome:
    population: Population
    runs: list[tuple[LoadedEvaluator, EvalRunResult]] = dataclasses.field(default_factory=list)
    failed: list[tuple[LoadedEvaluator, str]] = dataclasses.field(default_factory=list)  # runs that could not go on

    @property
    def complete(self) -> bool:
        return not self.failed and all(r.exit_code == 0 for _, r in self.runs)


async def populate_and_evaluate(store: Any, name: str, opts: EvalOptions, *, lock_wait: float = 30.0) -> Outcome:
    """Populate `name`; on a new version, one delta run per declared evaluator (each its own run, so one that
    cannot go on does not hold back the others). Raises DatasetStoreError, DefinitionError (bad declaration,
    before anything is added) and TagLockBusy (another population held the dataset)."""
    evaluators = ready(store, name, opts)
    await judge_reachable(evaluators, opts)
    pop = await asyncio.to_thread(populate, store, name, lock_wait=lock_wait)
    out = Outcome(pop)
    if pop.version is None:
        return out
    for ev in evaluators:
        try:
            result = await run_evaluation(store, [ev], pop.version.ref,
                                          dataclasses.replace(opts, mode="delta", run_id=None))
            out.runs.append((ev, result))
        except (FatalRunError, DefinitionError) as e:
            out.failed.append((ev, str(e)))
    return out
