"""`tagway dataset auto-populate` (declare what a dataset takes from production and which evaluators follow) and
`tagway dataset populate` (add what is new, then the delta runs), on the `tagway dataset` app (replay.datasets.cli).

Exit codes of populate: 0 every population (and its runs) went through, also when nothing was new; 2 bad input
(one line); 3 a delta run left rows errored or tags unreconciled, could not go on, or another population held the
dataset past --lock-wait.
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from exporters import datasets as core

from ..evals.cli import ApiKeyOpt, ConcurrencyOpt, GatewayOpt, InProcessOpt, check_run_options
from ..evals.cli import _errors as eval_errors
from .cli_common import AuthorOpt, ConfigOpt, DsnOpt, JsonOpt, _author, _errors, _json_out, _open, _when, dataset_app

__all__ = ["auto_populate_cmd", "populate_cmd", "watch"]

EXIT_INCOMPLETE = 3


def _describe(spec: Any) -> str:
    parts = [f"where {', '.join(spec.where)}" if spec.where else "all production calls",
             f"sample {spec.sample:g}"]
    if spec.max is not None:
        parts.append(f"max {spec.max} per population")
    if spec.since:
        parts.append(f"first population from {spec.since} before the declaration")
    parts.append(f"evaluators {', '.join(spec.evaluators)}" if spec.evaluators else "no evaluator")
    return "; ".join(parts)


@dataset_app.command("auto-populate")
def auto_populate_cmd(
    name: str = typer.Argument(..., help="The dataset (it must exist: tagway dataset add)."),
    where: Optional[List[str]] = typer.Option(None, "--where", help="key=value / key!=value, as tagway stats "
                                              "(repeatable); only ok calls unless one names status."),
    since: Optional[str] = typer.Option(None, "--since", help="The first population also takes what was recorded "
                                        "this long before the declaration (e.g. 7d); default: from it on."),
    sample: Optional[float] = typer.Option(None, "--sample", help="Share of the new matching traces to add, 0-1 "
                                           "(by trace id hash: the same ones every time). Default 1."),
    max_: Optional[int] = typer.Option(None, "--max", help="At most this many added per population."),
    evaluator: Optional[List[str]] = typer.Option(None, "--evaluator", "-e", help="A saved evaluator (NAME or "
                                                  "NAME@VERSION) run in delta mode on each new version; repeatable."),
    off: bool = typer.Option(False, "--off", help="Stop auto-populating NAME."),
    as_json: bool = JsonOpt, author: Optional[str] = AuthorOpt,
    dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Declare what NAME takes from production at each `tagway dataset populate`: a filter, a sampling rate, a cap,
    and the evaluators that follow in delta mode. Replaces the previous declaration; without options, shows it."""
    from exporters.autopopulate import last_population
    from ..evals.populate import declare
    from .autopopulate import declaration, stored
    declaring = bool(where or evaluator) or any(v is not None for v in (since, sample, max_))
    with _errors(), eval_errors():
        core.validate_name(name)
        if off and declaring:
            raise core.DatasetStoreError("--off stops auto-population: give it alone")
        spec = declaration(where or [], since, 1.0 if sample is None else sample, max_, evaluator or []) \
            if declaring else None
        store, _ = _open(dsn, config)
        if declaring or off:
            declare(store, name, spec, author=_author(author))
        else:
            core.history(store, name)
        found = stored(store, name)
        last = last_population(store, name)
    doc = {"dataset": name, "auto_populate": found[0].to_json() if found else None,
           "last_population": last.__dict__ if last else None}
    if as_json:
        return _json_out(doc)
    if found is None:
        typer.echo(f"{name} does not auto-populate" + (" (switched off)" if off else ""))
        return
    typer.echo(f"{name} auto-populates: {_describe(found[0])}")
    if last is not None:
        made = last.dataset_version or "no new version"
        typer.echo(f"last population {_when(last.populated_at)}: {made}, {last.added} added; the next looks from "
                   f"{_when(last.watermark)}")


def _report(outcome: Any) -> int:
    pop = outcome.population
    rec = pop.record
    looked = (f"{rec.matched} matching trace(s) recorded since {_when(rec.window_from)} not in it, {rec.sampled} "
              f"sampled at {pop.spec.sample:g}")
    if pop.version is None:
        typer.echo(f"{pop.name}: nothing new ({looked}); no version, no run")
    else:
        typer.echo(f"{pop.version.ref}: auto-populate: {len(pop.added)} new traces ({looked})")
    for line in rec.notes:
        typer.echo(f"note: {line}", err=True)
    for ev, r in outcome.runs:
        s = r.run.summary
        typer.echo(f"{pop.version.ref}: delta run {r.run.run_id} with {ev.ref}: {s.get('scored', 0)} scored, "
                   f"{s.get('errored', 0)} errored, +{s.get('applied', 0)} -{s.get('removed', 0)} tag(s) "
                   f"[{r.run.status}]")
    for ev, why in outcome.failed:
        typer.echo(f"error: {pop.name}: delta run with {ev.ref} could not go on: {why}", err=True)
    return 0 if outcome.complete else EXIT_INCOMPLETE


def _outcome_json(outcome: Any) -> dict:
    pop = outcome.population
    return {"dataset": pop.name, "version": pop.version.ref if pop.version else None, "added": pop.added,
            **{k: v for k, v in pop.record.__dict__.items() if k not in ("name", "dataset_version", "added")},
            "runs": [{"evaluator": ev.ref, "run_id": r.run.run_id, "status": r.run.status, "summary": r.run.summary}
                     for ev, r in outcome.runs],
            "failed": [{"evaluator": ev.ref, "error": why} for ev, why in outcome.failed]}


def watch(once: Callable[[], int], every: float, stop: threading.Event) -> int:
    """Run `once` now and every `every` seconds until `stop` is set; the worst exit code seen."""
    worst = 0
    while True:
        worst = max(worst, once())
        if stop.wait(every):
            return worst


@dataset_app.command("populate")
def populate_cmd(
    name: Optional[str] = typer.Argument(None, help="The dataset (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Every dataset that auto-populates."),
    every: Optional[float] = typer.Option(None, "--watch", metavar="SECONDS", help="Populate again every SECONDS "
                                          "until interrupted."),
    gateway: Optional[str] = GatewayOpt, in_process: bool = InProcessOpt, api_key: Optional[str] = ApiKeyOpt,
    concurrency: int = ConcurrencyOpt,
    lock_wait: float = typer.Option(60.0, "--lock-wait", help="Seconds to wait for another population of the same "
                                    "dataset, or a run reconciling the same tags."),
    as_json: bool = JsonOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Add the matching production traces recorded since the last population (sampled; never one the dataset held)
    as a new version, then run the declared evaluators in delta mode on it. Nothing new: no version, no run."""
    from exporters.autopopulate import declarations
    from exporters.tagstate import TagLockBusy
    from ..cli import _api_key
    from ..evals.definition import DefinitionError
    from ..evals.populate import judge_reachable, populate_and_evaluate, ready
    from ..runner import FatalRunError
    from ..evals.run import EvalOptions
    from ..runner import gateway_for
    from ..spec import SpecError
    with _errors(), eval_errors():
        if bool(name) == all_:
            raise core.DatasetStoreError("give a dataset NAME or --all")
        if every is not None and not every > 0:
            raise core.DatasetStoreError(f"--watch {every:g}: seconds between populations, more than 0")
        check_run_options(concurrency, lock_wait)
        store, _ = _open(dsn, config)
        opts = EvalOptions(gateway_url=gateway_for(gateway, store, in_process=in_process), in_process=in_process,
                           gateway_config=config,
                           api_key=_api_key(api_key), concurrency=concurrency, lock_wait=lock_wait)
        if name:  # bad input (a judge's gateway unreachable or refusing the key too): exit 2 before anything is added
            asyncio.run(judge_reachable(ready(store, name, opts), opts))

    def once() -> int:
        names = [name] if name else [d.name for d in declarations(store)]
        if not names:
            typer.echo("no dataset auto-populates (tagway dataset auto-populate NAME --where ... --sample RATE)")
        code, docs = 0, []
        for n in names:
            try:
                outcome = asyncio.run(populate_and_evaluate(store, n, opts, lock_wait=lock_wait))
            except TagLockBusy as e:
                typer.echo(f"error: {n}: not populated: {e}", err=True)
                code = EXIT_INCOMPLETE
                continue
            except (core.DatasetStoreError, DefinitionError, SpecError, FatalRunError) as e:
                # a declaration changed under us, or (--all) a judge's gateway refused before anything was added
                typer.echo(f"error: {n}: {e}", err=True)
                code = EXIT_INCOMPLETE
                continue
            if as_json:
                docs.append(_outcome_json(outcome))
                code = max(code, 0 if outcome.complete else EXIT_INCOMPLETE)
            else:
                code = max(code, _report(outcome))
        if as_json:
            _json_out(docs)
        return code

    with _errors(), eval_errors():  # the store failing: one line
        if every is None:
            raise typer.Exit(once())
        try:
            code = watch(once, every, threading.Event())
        except KeyboardInterrupt:
            typer.echo("stopped", err=True)
            code = 0
    raise typer.Exit(code)
