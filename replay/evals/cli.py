"""`tagway eval ...`: save evaluators, run them over a dataset (full, delta, preview), show a run's results.

Exit codes: 0 every row scored (and, unless preview, the tags reconciled); 2 bad input (one line); 3 some rows
errored (listed; their tags were left as they were) or the tags could not be reconciled (another run held them).
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import orjson
import typer

from ..cli import ConfigOpt, DsnOpt
from ..gate import EXIT_BAD_INPUT

__all__ = ["eval_app", "register"]

eval_app = typer.Typer(help="Evaluators with output schemas and tag rules, run over datasets.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Entry point "tagway.cli": add `tagway eval`."""
    app.add_typer(eval_app, name="eval")


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    from ..cli import _user_errors  # noqa: PLC0415 - the replay CLI's mapping of store and input errors
    from .definition import DefinitionError  # noqa: PLC0415
    try:
        with _user_errors():
            yield
    except DefinitionError as e:
        raise _fail(str(e)) from None


def _store(dsn: Optional[str], config: Optional[Path]):
    from ..cli import _store as open_store  # noqa: PLC0415
    return open_store(dsn, config)


def _console():
    from rich.console import Console  # noqa: PLC0415
    return Console() if sys.stdout.isatty() else Console(width=200)


FormatOpt = typer.Option("table", "--format", "-f", help="table | json")
# how an evaluation reaches its judge (shared with `tagway dataset populate`, whose delta runs need the same)
GatewayOpt = typer.Option(None, "--gateway", envvar="TAGWAY_GATEWAY_URL", help="Gateway base URL (the LLM judge is "
                          "called through it).")
InProcessOpt = typer.Option(False, "--in-process", help="Run the gateway app in this process.")
ApiKeyOpt = typer.Option(None, "--api-key", help="Gateway key (env TAGWAY_API_KEY or TAGWAY_ADMIN_KEY): the admin "
                         "key or one that may set its customer.")
ConcurrencyOpt = typer.Option(8, "--concurrency", help="Judge calls in flight, 1-256.")
LockWaitOpt = typer.Option(60.0, "--lock-wait", help="Seconds to wait for another run that is reconciling the same "
                           "tags (0: fail at once).")


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "json"):
        raise _fail(f"--format {fmt!r}: use one of table, json")


def check_run_options(concurrency: int, lock_wait: float) -> None:
    if not 1 <= concurrency <= 256:
        raise _fail(f"--concurrency {concurrency}: must be between 1 and 256")
    if lock_wait < 0:
        raise _fail("--lock-wait must be >= 0")


@eval_app.command("save")
def save_cmd(file: Path = typer.Argument(..., help="An evaluator definition (YAML)."),
             dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """Validate a definition (its tag rules against its output schema) and store it: a new version when it
    changed."""
    from exporters.evals import save_evaluator  # noqa: PLC0415
    from .definition import load_definition  # noqa: PLC0415
    with _errors():
        d = load_definition(file)
        store = _store(dsn, config)
        version, created = save_evaluator(store, d.name, d.to_json(), d.content_hash())
    typer.echo(f"{'saved' if created else 'unchanged:'} evaluator {d.name} version {version} ({d.mode} mode, "
               f"{len(d.rules)} tag rule(s))")


@eval_app.command("list")
def list_cmd(dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """The saved evaluators (newest version of each)."""
    from exporters.evals import list_evaluators  # noqa: PLC0415
    with _errors():
        rows = list_evaluators(_store(dsn, config))
    if not rows:
        typer.echo("no evaluator saved (`tagway eval save FILE`)")
    for r in rows:
        d = orjson.loads(r["definition_json"])
        rules = ", ".join(f"{x['field']}->{x['tag']}" for x in d.get("tag_rules", []))
        typer.echo(f"{r['name']}@{r['version']}\t{d.get('mode', 'message')}\t{d.get('type', 'llm_judge')}\t"
                   f"{rules or 'no tag rules'}")


@eval_app.command("show")
def show_cmd(ref: str = typer.Argument(..., help="NAME or NAME@VERSION."),
             dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """A saved definition, as stored (JSON)."""
    from exporters.evals import get_evaluator  # noqa: PLC0415
    from .definition import DefinitionError, parse_ref  # noqa: PLC0415
    with _errors():
        name, version = parse_ref(ref)
        found = get_evaluator(_store(dsn, config), name, version)
        if found is None:
            raise DefinitionError(f"no evaluator {ref!r}")
    sys.stdout.write(orjson.dumps({"version": found[0], **orjson.loads(found[1])},
                                  option=orjson.OPT_INDENT_2).decode() + "\n")


@eval_app.command("run")
def run_cmd(
    evaluator: List[str] = typer.Option(..., "--evaluator", "-e", help="A saved NAME[@VERSION] or a YAML file "
                                        "(saved first); repeatable."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="A dataset (NAME: its latest version, or NAME@N), a "
                                "pinned dataset id or a JSONL file of cases."),
    mode: str = typer.Option("full", "--mode", "-m", help="full: every row | delta: rows not covered yet | "
                             "preview: score, touch no tag."),
    fmt: str = FormatOpt,
    gateway: Optional[str] = GatewayOpt,
    in_process: bool = InProcessOpt,
    api_key: Optional[str] = ApiKeyOpt,
    concurrency: int = ConcurrencyOpt,
    lock_wait: float = LockWaitOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Choose the run id."),
    dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Score a dataset's rows (or sessions) with the evaluators; unless --mode preview, reconcile the tags their
    rules name (seed 002): applied where a rule is met, removed where it no longer is."""
    from exporters.tagstate import run_events  # noqa: PLC0415
    from ..cli import _api_key  # noqa: PLC0415
    from ..datasets import validate_run_id  # noqa: PLC0415
    from .report import print_report, report_json  # noqa: PLC0415
    from ..runner import gateway_for  # noqa: PLC0415
    from .run import MODES, EvalOptions, resolve_evaluators, run_evaluation  # noqa: PLC0415
    with _errors():
        _check_format(fmt)
        if mode not in MODES:
            raise _fail(f"--mode {mode!r}: use one of {', '.join(MODES)}")
        check_run_options(concurrency, lock_wait)
        if run_id is not None:
            validate_run_id(run_id)
        store = _store(dsn, config)
        evaluators = resolve_evaluators(store, evaluator)
        opts = EvalOptions(mode=mode, gateway_url=gateway_for(gateway, store, in_process=in_process),
                           in_process=in_process, gateway_config=config,
                           api_key=_api_key(api_key), concurrency=concurrency, lock_wait=lock_wait, run_id=run_id)
        result = asyncio.run(run_evaluation(store, evaluators, dataset, opts))
        events = run_events(store, result.run.run_id)
    if fmt == "json":
        sys.stdout.write(orjson.dumps(report_json(result.run, result.results, events),
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_report(result.run, result.results, events, _console())
    raise typer.Exit(result.exit_code)


@eval_app.command("results")
def results_cmd(run_id: str = typer.Argument(...), fmt: str = FormatOpt,
                dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt) -> None:
    """A stored run's results with the Applied Tags column and the tag changes it made."""
    from exporters.evals import get_run, read_results  # noqa: PLC0415
    from exporters.tagstate import run_events  # noqa: PLC0415
    from .definition import DefinitionError  # noqa: PLC0415
    from .report import print_report, report_json  # noqa: PLC0415
    with _errors():
        _check_format(fmt)
        store = _store(dsn, config)
        run = get_run(store, run_id)
        if run is None:
            raise DefinitionError(f"no evaluation run {run_id!r}")
        results, events = read_results(store, run_id), run_events(store, run_id)
    if fmt == "json":
        sys.stdout.write(orjson.dumps(report_json(run, results, events), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print_report(run, results, events, _console())


@eval_app.command("runs")
def runs_cmd(limit: int = typer.Option(20, "--limit"), dsn: Optional[str] = DsnOpt,
             config: Optional[Path] = ConfigOpt) -> None:
    """The latest evaluation runs."""
    from exporters.evals import list_runs  # noqa: PLC0415
    with _errors():
        runs = list_runs(_store(dsn, config), limit=max(1, min(limit, 1000)))
    for r in runs:
        s = r.summary
        typer.echo(f"{r.run_id}\t{r.mode}\t{r.status}\t{r.dataset}\t{','.join(r.evaluators)}\t"
                   f"scored {s.get('scored', 0)} errored {s.get('errored', 0)} +{s.get('applied', 0)} "
                   f"-{s.get('removed', 0)}")
