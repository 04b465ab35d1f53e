"""`tagway replay ...`: the gateway's CLI loads `register` through the entry-point group "tagway.cli", so the
gateway never imports replay. `python -m replay` runs the same commands on their own.

Exit codes (replay.gate.verdicts): 0 gate passed, 1 a regression, 2 bad spec or input (one line, no traceback),
3 run incomplete, 4 inconclusive (with `gating.inconclusive: block`; `pass`, the default, makes an undecided
segment 0), or evaluators that could score no answer of a candidate, whatever the policy.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from .datasets import DatasetError, DatasetStoreError
from .gate import EXIT_BAD_INPUT, EXIT_INCOMPLETE
from .runner import FatalRunError, gateway_for
from .slice import EmptySliceError
from .spec import LEGACY_GATING_HELP, SpecError, apply_overrides, load_spec_data, parse_spec

__all__ = ["replay_app", "register", "main"]

replay_app = typer.Typer(help="Replay tagged slices of real traffic against candidates; report and gate per segment.",
                         no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                         rich_markup_mode=None)  # plain help: rich's panels cut long names at 80 columns
dataset_app = typer.Typer(help="Pinned datasets: a slice frozen as trace ids.", no_args_is_help=True,
                          rich_markup_mode=None)
replay_app.add_typer(dataset_app, name="dataset")


def register(app: typer.Typer) -> None:
    """Entry point "tagway.cli": add the `replay` sub-app to the gateway's CLI."""
    app.add_typer(replay_app, name="replay")


def main() -> None:
    """`python -m replay run ...`: the replay commands without the gateway's CLI."""
    replay_app(prog_name="tagway replay")


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _stopped(e: Exception, run_id: str | None) -> typer.Exit:
    """Exit 3 for a run stopped midway by its store going away: what it stored stays, resume finishes it (a gateway
    gone midway is reported: RunResult.stopped)."""
    finish = f": `tagway replay resume {run_id}` finishes the run" if run_id else ""
    return _fail(f"{e}; what was stored is kept{finish}", EXIT_INCOMPLETE)


@contextlib.contextmanager
def _user_errors(run_id: str | None = None) -> Iterator[None]:
    """Bad input becomes one line on stderr and exit 2, never a traceback. `run_id`: the run a command works on,
    named in how to finish it when the store goes away midway."""
    from exporters.discovery import DiscoveryError
    from exporters.dsn import DsnConfigError
    from exporters.remote_store import StoreGoneError
    from exporters.store import StoreError, StoreLockedError
    from .pipeline import RunExistsError
    try:
        yield
    except StoreGoneError as e:
        raise _stopped(e, run_id) from None
    except DiscoveryError as e:
        raise _fail(str(e)) from None
    except StoreLockedError as e:
        raise _fail(f"{e}. The gateway probably holds it: point replay at a ClickHouse server DSN (--dsn / "
                    "TAGWAY_DSN), or stop the gateway and use --in-process") from None
    except DsnConfigError as e:
        raise _fail(f"config: {e}") from None
    except (SpecError, EmptySliceError, DatasetError, DatasetStoreError, FatalRunError, StoreError,
            RunExistsError) as e:
        raise _fail(str(e)) from None


def _store(dsn: Optional[str], config: Optional[Path], *, create: bool = False, gateway: Optional[str] = None,
           api_key: str = ""):
    """The store the gateway writes to: --dsn > $TAGWAY_DSN > the gateway config (--config / $TAGWAY_CONFIG) >
    with --gateway, the store that gateway names to the admin key > ./tagway-data/clickhouse (exporters.dsn, the
    same resolution as `tagway stats`). `create`: an embedded store that is not there yet is made (for what brings
    its own cases: a run on a dataset file, an import); a command that reads one refuses it
    (exporters.store_access.open_store)."""
    from exporters.dsn import resolve_dsn
    from exporters.remote_store import GatewayStuckError
    from exporters.schema import migrate
    from exporters.store_access import open_store
    from .runner import store_dsn_for
    target = store_dsn_for(resolve_dsn(dsn, config), gateway, api_key)
    try:
        store = open_store(target, create=create)  # through the gateway when one serves it
    except GatewayStuckError as e:  # before anything ran: not the "stopped midway" of _stopped
        raise _fail(str(e), EXIT_INCOMPLETE) from None
    migrate(store)
    return store


def _api_key(flag: Optional[str]) -> str:
    return flag or os.environ.get("TAGWAY_API_KEY") or os.environ.get("TAGWAY_ADMIN_KEY") or ""


def _check_output(fmt: str, out: Optional[Path]) -> None:
    """--format and --out are checked before the store is opened or any call is paid for."""
    from .datasets import check_writable
    from .render import FORMATS
    if fmt not in FORMATS:
        raise SpecError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if out is not None:
        try:
            check_writable(out, "--out")
        except DatasetError as e:
            raise SpecError(str(e)) from None


def _gate_flags(alpha: Optional[float], margin: Optional[float], inconclusive: Optional[str],
                errors: Optional[str]) -> dict:
    return {"alpha": alpha, "margin": margin, "inconclusive": inconclusive, "errors": errors}


def _parse_with_flags(data: dict, source: str, flags: dict[str, tuple[str, object]], stored: bool = False) -> Any:
    """The spec with the flags applied, validated; an error in a value a flag gave names the flag, not the file
    (`--alpha 0.9: Input should be less than 0.5`, not `replay.yaml: gating.alpha: ...`). `flags`: spec field ->
    (flag, the value given or None)."""
    with _flag_errors(source, flags):
        return parse_spec(data, source, stored=stored)


@contextlib.contextmanager
def _flag_errors(source: str, flags: dict[str, tuple[str, object]]) -> Iterator[None]:
    """A SpecError `<source>: <field>[.<more>]: <what>` about a field a flag gave becomes `<flag> <value>: <what>`:
    the value is the flag's, not the file's (`--since 7x`, not `replay.yaml: slice.since`)."""
    try:
        yield
    except SpecError as e:
        text, prefix = str(e), f"{source}: "
        if text.startswith(prefix):
            where, _, what = text[len(prefix):].partition(": ")
            for field, (flag, value) in flags.items():
                if value is not None and (where == field or where.startswith(field + ".")):
                    raise SpecError(f"{flag} {_flag_value(value)}: {what}") from None
        raise


def _flag_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return repr(value) if value == "" or (isinstance(value, str) and value != value.strip()) else str(value)


def _slice_flags(*, customer: object = None, intent: object = None, since: object = None,
                 segment_by: object = None, limit: object = None) -> dict[str, tuple[str, object]]:
    """The slice flags of run, plan and dataset save (--tag is checked as it is read: replay.spec)."""
    return {"slice.customer": ("--customer", customer or None), "slice.intent": ("--intent", intent or None),
            "slice.since": ("--since", since), "slice.segment_by": ("--segment-by", segment_by),
            "slice.limit": ("--limit", limit)}


def _run_flags(*, alpha: object, margin: object, inconclusive: object, errors: object, max_cases: object,
               max_cost: object, concurrency: object, limit: object, since: object = None, segment_by: object = None,
               customer: object = None, intent: object = None) -> dict[str, tuple[str, object]]:
    return {"gating.alpha": ("--alpha", alpha), "gating.margin": ("--margin", margin),
            "gating.inconclusive": ("--inconclusive", inconclusive), "gating.errors": ("--errors", errors),
            "gating.escalation.max_cases": ("--escalation-max-cases", max_cases), "max_cost": ("--max-cost", max_cost),
            "concurrency": ("--concurrency", concurrency),
            **_slice_flags(customer=customer, intent=intent, since=since, segment_by=segment_by, limit=limit)}


def _no_old_flags(**given: object) -> None:
    old = {"gate_aggregate": "--gate-aggregate", "threshold": "--threshold", "max_drop": "--max-drop",
           "min_cases": "--min-cases-per-segment"}
    used = [old[k] for k, v in given.items() if v is not None]
    if used:
        hint = " (--margin replaces --max-drop)" if "--max-drop" in used else ""
        raise SpecError(f"{', '.join(used)}: no longer used{hint}: {LEGACY_GATING_HELP}")


def _check_limits(max_cost: Optional[float], concurrency: Optional[int]) -> None:
    """The bounds the spec puts on the same settings (`run` gets them through the spec)."""
    if max_cost is not None and not max_cost > 0:
        raise SpecError(f"--max-cost {max_cost:g}: must be a USD amount > 0")
    if concurrency is not None and not 1 <= concurrency <= 1024:
        raise SpecError(f"--concurrency {concurrency}: must be between 1 and 1024")


def _emit(report, fmt: str, out: Optional[Path], dashboard_url: Optional[str] = None, stopped: str = "",
          table: bool = True) -> None:
    """The report in `fmt` to stdout, or to `out` with one line saying so on stderr. `table`: with --out, the terminal
    table is printed too (run and resume: a CI log shows the run; `report --out` only writes the file)."""
    from rich.console import Console
    from .render import render, render_terminal
    text = "" if out is None and fmt == "table" else render(report, fmt, dashboard_url=dashboard_url)
    if text and not text.endswith("\n"):
        text += "\n"  # a file (or a CI log) `cat` shows whole, not run into the next line
    if out is not None:
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise _fail(f"cannot write the report to {out}: {e.strerror or e} (the run is stored: "
                        f"`tagway replay report {report.run_id} --out FILE` writes it again)") from None
        if table:
            render_terminal(report, _console(Console))
        typer.echo(f"report written to {out}", err=True)
    elif fmt == "table":
        render_terminal(report, _console(Console))
    else:
        sys.stdout.write(text)
    if report.status != "complete":
        typer.echo(_incomplete_line(report, stopped), err=True)


def _console(console_cls):
    """The terminal's width on a terminal; 160 columns in CI logs and pipes, which do not wrap (Rich would squeeze
    the table into 80)."""
    return console_cls() if sys.stdout.isatty() else console_cls(width=160)


def _incomplete_line(report, stopped: str = "") -> str:
    """What exit 3 means for this run and what finishes it (`stopped`: why the run stopped midway)."""
    rid = report.run_id
    if stopped:
        return (f"error: {stopped}; the report is of what completed: `tagway replay resume {rid}` runs the rest "
                "once the gateway answers again")
    if report.errored and report.gating.get("errors") == "exclude":
        return (f"run {rid} incomplete: {report.errored} errored case result(s) not counted; "
                f"`tagway replay resume {rid}` retries them")
    return f"run {rid} incomplete: `tagway replay resume {rid}` runs the rest (--max-cost raises the budget)"


GatewayOpt = typer.Option(None, "--gateway", envvar="TAGWAY_GATEWAY_URL", help="Gateway base URL.")
InProcessOpt = typer.Option(False, "--in-process", help="Run the gateway app in this process (gateway.app:create_app).")
DsnOpt = typer.Option(None, "--dsn", help="ClickHouse DSN (default: env TAGWAY_DSN, else the gateway config's "
                      "storage, else the embedded store ./tagway-data/clickhouse).")
ConfigOpt = typer.Option(None, "--config", "-c", help="Gateway config file whose storage to open (env TAGWAY_CONFIG).")
KeyOpt = typer.Option(None, "--api-key", help="Gateway key (env TAGWAY_API_KEY or TAGWAY_ADMIN_KEY).")
FormatOpt = typer.Option("table", "--format", "-f", help="table | md | github | json | html")
AlphaOpt = typer.Option(None, "--alpha", help="Chance the gate calls any segment a regression when none got worse, "
                        "in (0, 0.5) (default 0.05).")
MarginOpt = typer.Option(None, "--margin", help="The drop a segment may show before it counts (default 0.05).")
InconclusiveOpt = typer.Option(None, "--inconclusive",
                               help="pass: exit 0, the inconclusive segments listed (default) | block: exit 4.")
ErrorsOpt = typer.Option(None, "--errors", help="fail: an errored result is a failed case (default) | exclude.")
# the flags of the gate the paired gate replaced: hidden, and a clear error when used
_OLD = {"hidden": True}
OutOpt = typer.Option(None, "--out", "-o", help="Write the report in --format to this file.")


@replay_app.command("run")
def run_cmd(
    spec: Path = typer.Option(..., "--spec", "-s", help="Replay spec YAML."),
    customer: Optional[List[str]] = typer.Option(None, "--customer"),
    intent: Optional[List[str]] = typer.Option(None, "--intent"),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="key=value, repeatable."),
    since: Optional[str] = typer.Option(None, "--since", help="e.g. 7d, 24h."),
    segment_by: Optional[str] = typer.Option(None, "--segment-by", help="e.g. customer or customer,intent"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Replay a pinned dataset (id or JSONL file)."),
    candidate_model: Optional[List[str]] = typer.Option(None, "--candidate-model"),
    alpha: Optional[float] = AlphaOpt, margin: Optional[float] = MarginOpt,
    inconclusive: Optional[str] = InconclusiveOpt, errors: Optional[str] = ErrorsOpt,
    escalate: Optional[bool] = typer.Option(None, "--escalate/--no-escalate", help="Draw more production cases "
                                            "for the segments the first sample cannot decide (gating.escalation)."),
    escalation_max_cases: Optional[int] = typer.Option(None, "--escalation-max-cases",
                                                       help="Extra cases escalation may draw in all."),
    gate_aggregate: Optional[str] = typer.Option(None, "--gate-aggregate", **_OLD),
    threshold: Optional[float] = typer.Option(None, "--threshold", **_OLD),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", **_OLD),
    min_cases: Optional[int] = typer.Option(None, "--min-cases-per-segment", **_OLD),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="USD budget for the run."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency"),
    fmt: str = FormatOpt, out: Optional[Path] = OutOpt, gateway: Optional[str] = GatewayOpt,
    in_process: bool = InProcessOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
    api_key: Optional[str] = KeyOpt,
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Choose the run id (default: time + random); a new "
                                         "one: an existing run is continued with `resume`."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    dashboard_url: Optional[str] = typer.Option(None, "--dashboard-url", help="--format github: link the run page "
                                                "of the dashboard at this base URL."),
) -> None:
    """Select a slice (or dataset), replay it against the candidates through the gateway, report and gate."""
    from exporters.remote_store import StoreGoneError
    from .datasets import validate_run_id
    from .evaluators import EvaluatorError, load_python_evaluators
    from .pipeline import RunOptions, new_run_id, start_run
    with _user_errors():
        _check_output(fmt, out)
        _no_old_flags(gate_aggregate=gate_aggregate, threshold=threshold, max_drop=max_drop, min_cases=min_cases)
        if run_id is not None:
            validate_run_id(run_id)
        data = apply_overrides(load_spec_data(spec), customer=customer, intent=intent, tags=tag, since=since,
                               segment_by=segment_by, limit=limit, dataset=dataset, candidate_models=candidate_model,
                               gating=_gate_flags(alpha, margin, inconclusive, errors),
                               escalation={"enabled": escalate, "max_cases": escalation_max_cases},
                               max_cost=max_cost, concurrency=concurrency)
        spec_dir = spec.resolve().parent
        parsed = _parse_with_flags(data, str(spec), _run_flags(
            alpha=alpha, margin=margin, inconclusive=inconclusive, errors=errors, max_cases=escalation_max_cases,
            max_cost=max_cost, concurrency=concurrency, limit=limit, since=since, segment_by=segment_by,
            customer=customer, intent=intent))
        sys.path[:0] = [str(spec_dir), os.getcwd()]  # `python` evaluators: module:function beside the spec
        try:
            load_python_evaluators(parsed.evaluators)
        except EvaluatorError as e:
            raise SpecError(f"{spec}: evaluators: {e} (looked in {spec_dir} and the working directory)") from None
        # a run may bring its own cases (a JSONL dataset)
        store = _store(dsn, config, create=True, gateway=None if in_process else gateway, api_key=_api_key(api_key))
        gateway = gateway_for(gateway, store, in_process=in_process)
        rid = run_id or new_run_id()
        stored: list[str] = []

        def announce(run: str) -> None:  # once the run is stored: an id that `resume` and `report` know
            stored.append(run)
            typer.echo(f"replay run {run}", err=True)

        opts = RunOptions(gateway_url=gateway, in_process=in_process, api_key=_api_key(api_key), progress=progress,
                          spec_dir=spec_dir, run_id=rid, gateway_config=config, on_running=announce)
        try:
            result = asyncio.run(start_run(store, parsed, opts))
        except KeyboardInterrupt:
            if not stored:
                raise _fail("interrupted before the run was stored; nothing to resume", EXIT_INCOMPLETE) from None
            raise _fail(f"interrupted; resume with: tagway replay resume {rid}", EXIT_INCOMPLETE) from None
        except StoreGoneError as e:
            raise _stopped(e, rid if stored else None) from None
        _emit(result.report, fmt, out, dashboard_url, result.stopped)  # a gateway gone midway: what completed
    raise typer.Exit(result.exit_code)


@replay_app.command("resume")
def resume_cmd(
    run_id: str = typer.Argument(..., help="The run to finish."),
    retry_errored: bool = typer.Option(True, "--retry-errored/--no-retry-errored",
                                       help="Re-run the cases whose result is errored (default), or keep them."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="New total USD budget for the run (> 0)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="1-1024."),
    fmt: str = FormatOpt, out: Optional[Path] = OutOpt, gateway: Optional[str] = GatewayOpt,
    in_process: bool = InProcessOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
    api_key: Optional[str] = KeyOpt,
    spec_dir: Optional[Path] = typer.Option(None, "--spec-dir", help="Where prompt files / python evaluators live."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Re-run the (candidate, case) pairs of RUN_ID without a score: not run yet, or errored."""
    from .pipeline import RunOptions, resume_run
    from .shadow import SHADOW_RUN_PREFIX
    with _user_errors(run_id):
        if run_id.startswith(SHADOW_RUN_PREFIX):
            raise SpecError(f"run {run_id} scored recorded shadow calls: there is nothing to re-run (`tagway replay "
                            "report --shadow` builds a new report)")
        _check_output(fmt, out)
        _check_limits(max_cost, concurrency)
        store = _store(dsn, config, gateway=None if in_process else gateway, api_key=_api_key(api_key))
        gateway = gateway_for(gateway, store, in_process=in_process)
        base = (spec_dir or Path.cwd()).resolve()
        sys.path[:0] = [str(base), os.getcwd()]  # `python` evaluators, as `run` finds them (resume_run loads them)
        opts = RunOptions(gateway_url=gateway, in_process=in_process, api_key=_api_key(api_key), progress=progress,
                          spec_dir=base, retry_errored=retry_errored, max_cost=max_cost, concurrency=concurrency,
                          gateway_config=config)
        try:
            result = asyncio.run(resume_run(store, run_id, opts))
        except KeyboardInterrupt:
            raise _fail(f"interrupted; resume again with: tagway replay resume {run_id}", EXIT_INCOMPLETE) from None
        _emit(result.report, fmt, out, stopped=result.stopped)
    raise typer.Exit(result.exit_code)


@replay_app.command("report")
def report_cmd(
    run_id: Optional[str] = typer.Argument(None, help="The run (omit with --shadow)."),
    shadow: bool = typer.Option(False, "--shadow", help="Gate the shadow traffic the gateway recorded (config "
                                "`shadow:`): each shadow answer paired with the live answer; stored as a new run."),
    since: Optional[str] = typer.Option(None, "--since", help="--shadow: the window back from now (default 24h)."),
    spec: Optional[Path] = typer.Option(None, "--spec", "-s", help="--shadow: a replay spec whose evaluators, "
                                        "gating and slice.segment_by apply (default: the shadow rule's evaluators "
                                        "in the gateway config)."),
    candidate: Optional[List[str]] = typer.Option(None, "--candidate", help="--shadow: only these shadow models."),
    segment_by: Optional[str] = typer.Option(None, "--segment-by", help="--shadow: e.g. customer or customer,intent"),
    dashboard_url: Optional[str] = typer.Option(None, "--dashboard-url", help="--format github: link the run page "
                                                "of the dashboard at this base URL."),
    gateway: Optional[str] = GatewayOpt, api_key: Optional[str] = KeyOpt,
    fmt: str = FormatOpt, out: Optional[Path] = OutOpt, dsn: Optional[str] = DsnOpt,
    config: Optional[Path] = ConfigOpt,
    alpha: Optional[float] = AlphaOpt, margin: Optional[float] = MarginOpt,
    inconclusive: Optional[str] = InconclusiveOpt, errors: Optional[str] = ErrorsOpt,
    gate_aggregate: Optional[str] = typer.Option(None, "--gate-aggregate", **_OLD),
    threshold: Optional[float] = typer.Option(None, "--threshold", **_OLD),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", **_OLD),
    min_cases: Optional[int] = typer.Option(None, "--min-cases-per-segment", **_OLD),
) -> None:
    """Rebuild the report of a run from ClickHouse (optionally re-gated with another alpha, margin, ...), or, with
    --shadow, build one from the shadow traffic of a window."""
    from .pipeline import GateState, report_for
    from .store import get_run
    with _user_errors():
        _check_output(fmt, out)
        _no_old_flags(gate_aggregate=gate_aggregate, threshold=threshold, max_drop=max_drop, min_cases=min_cases)
        if shadow:
            if run_id is not None:
                raise SpecError("--shadow builds a new run: give no RUN_ID (`tagway replay report RUN_ID` shows a "
                                "stored shadow run again)")
            report = _shadow_report(spec, config, since, candidate, segment_by, gateway, api_key, dsn,
                                    _gate_flags(alpha, margin, inconclusive, errors))
            typer.echo(f"shadow run {report.run_id}", err=True)
            _emit(report, fmt, out, dashboard_url, table=False)
            raise typer.Exit(report.exit_code)
        if run_id is None:
            raise SpecError("give a RUN_ID (or --shadow)")
        if any(v is not None for v in (since, spec, candidate, segment_by)):
            raise SpecError("--since, --spec, --candidate and --segment-by go with --shadow")
        store = _store(dsn, config)
        run = get_run(store, run_id)
        if run is None:
            raise SpecError(f"no replay run {run_id!r}")
        data = apply_overrides(run.spec, gating=_gate_flags(alpha, margin, inconclusive, errors))
        spec = _parse_with_flags(data, f"run {run_id} spec", _run_flags(
            alpha=alpha, margin=margin, inconclusive=inconclusive, errors=errors, max_cases=None, max_cost=None,
            concurrency=None, limit=None), stored=True)
        status = run.status if run.status in ("complete", "incomplete") else "incomplete"
        shown = _stored_report(run.report_json)
        report = report_for(store, run_id, spec, status=status, n_cases=run.n_cases,
                            skipped=shown.get("skipped") or {}, state=GateState.from_report_json(run.report_json),
                            dataset=run.dataset_id, stop_reason=shown.get("stop_reason", "") if status != "complete"
                            else "", running=run.status == "running")
        # what the run said about its cases (the floor over --limit, a resume's kept and recorded results, a shadow
        # window's dropped calls) is shown again; a note this rebuild makes itself (the judge's cost) once
        report.notes = [*(n for n in shown.get("notes") or [] if n not in report.notes
                          and not n.startswith(_JUDGE_NOTE)), *report.notes]
        _emit(report, fmt, out, dashboard_url, table=False)  # --out: the file, and one line saying so
    raise typer.Exit(report.exit_code)


_JUDGE_NOTE = "the LLM judge's calls cost "  # replay.report.aggregate's note, made again from the record


def _stored_report(report_json: str) -> dict:
    """The report the run stored when it ended (`report` rebuilds the rest from replay_results); {} for a run
    stopped before it wrote one, or one this version cannot read."""
    import orjson
    try:
        stored = orjson.loads(report_json) if report_json else {}
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(stored, dict):
        return {}
    notes, skipped, stop = stored.get("notes"), stored.get("skipped"), stored.get("stop_reason")
    return {"notes": [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else [],
            "skipped": {k: v for k, v in skipped.items() if isinstance(v, int)} if isinstance(skipped, dict) else {},
            "stop_reason": stop if isinstance(stop, str) else ""}


def _shadow_report(spec: Optional[Path], config: Optional[Path], since: Optional[str], candidates: Optional[list],
                   segment_by: Optional[str], gateway: Optional[str], api_key: Optional[str], dsn: Optional[str],
                   gating: dict):
    """--shadow: the spec (or the shadow rule's evaluators from the gateway config), the window, the run."""
    from exporters.vocabulary import QueryInputError, parse_window
    from .shadow import config_spec_data, run_shadow_report, shadow_data
    from .runner import gateway_client
    try:
        window = parse_window(since)
    except QueryInputError as e:
        raise SpecError(f"--since: {e}") from None
    if spec is not None:
        data, source = load_spec_data(spec), str(spec)
    else:
        data, source = config_spec_data(config, candidates), "the gateway config's shadow rule"
    data = apply_overrides(shadow_data(data), segment_by=segment_by, gating=gating)
    flags = {f"gating.{k}": (f"--{k}", v) for k, v in gating.items()}
    flags["slice.segment_by"] = ("--segment-by", segment_by)
    with _flag_errors(source, flags):  # the spec is parsed once the shadow models are known
        from .shadow import shadow_spec
        shadow_spec(data, source, ["-"])
    store = _store(dsn, config)
    gateway = gateway_for(gateway, store)

    async def go():
        if gateway is None:  # no call is made, unless an LLM judge asks for one
            return await run_shadow_report(store, data, source, window, candidates=candidates)
        async with gateway_client(base_url=gateway) as client:
            return await run_shadow_report(store, data, source, window, candidates=candidates, client=client,
                                           api_key=_api_key(api_key))
    return asyncio.run(go())


PlainFormatOpt = typer.Option("table", "--format", "-f", help="table | json")


def _check_plain_format(fmt: str) -> None:
    if fmt not in ("table", "json"):
        raise SpecError(f"--format {fmt!r}: use one of table, json")


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A plain rich table; every cell is Text (segment and tag values come from traffic)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    t = Table(title=Text(title), box=box.SIMPLE_HEAD, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i < 2 else "right")
    for row in rows:
        t.add_row(*(Text(x) for x in row))
    _console(Console).print(t)


def _drop(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


@replay_app.command("plan")
def plan_cmd(
    spec: Path = typer.Option(..., "--spec", "-s", help="Replay spec YAML (its slice and gating)."),
    pass_rate: float = typer.Option(0.9, "--pass-rate", help="Assumed baseline pass rate, in (0, 1]."),
    drop: float = typer.Option(0.10, "--drop", help="Target drop to detect (cases needed), in (0, pass rate]."),
    customer: Optional[List[str]] = typer.Option(None, "--customer"),
    intent: Optional[List[str]] = typer.Option(None, "--intent"),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="key=value, repeatable."),
    since: Optional[str] = typer.Option(None, "--since"),
    segment_by: Optional[str] = typer.Option(None, "--segment-by"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    fmt: str = PlainFormatOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
    gateway: Optional[str] = GatewayOpt, api_key: Optional[str] = KeyOpt,
) -> None:
    """Before a run: per segment, the cases production holds, the smallest drop the gate can detect (80% power,
    family-wise level), the cases a target drop needs, and the coverage a dataset can adopt. With a gateway
    (--gateway, or the one serving the store), the models the spec calls are checked as `run` checks them."""
    import orjson
    from .pipeline import check_serving
    from .planning import plan_segments
    from .slice import sample_pool
    with _user_errors():
        _check_plain_format(fmt)
        if not 0 < pass_rate <= 1:
            raise SpecError(f"--pass-rate {pass_rate:g}: must be in (0, 1]")
        if not 0 < drop <= pass_rate:
            raise SpecError(f"--drop {drop:g}: must be in (0, --pass-rate]")
        # the slice flags of `replay run` (a plan is of the run those flags would make)
        data = apply_overrides(load_spec_data(spec), customer=customer, intent=intent, tags=tag, since=since,
                               segment_by=segment_by, limit=limit)
        parsed = _parse_with_flags(data, str(spec), _slice_flags(customer=customer, intent=intent, since=since,
                                                                 segment_by=segment_by, limit=limit))
        if parsed.slice is None:
            raise SpecError("plan needs a spec with a slice (a dataset's coverage is fixed)")
        store = _store(dsn, config)
        where = gateway_for(gateway, store)
        if where is not None:  # a model the gateway does not serve (or a misspelt one) is what `run` would stop on
            asyncio.run(check_serving(parsed, where, _api_key(api_key)))
        sampled, matched = sample_pool(store, parsed.slice)
        if not sampled.available:
            raise EmptySliceError(f"the slice's segments have no replayable case ({matched} call(s) matched the "
                                  "filters): nothing to plan")
        esc = parsed.gating.escalation
        p = plan_segments(sampled.available, sampled.selected, alpha=parsed.gating.alpha, pass_rate=pass_rate,
                          target_drop=drop, escalation_per_segment=esc.max_per_segment if parsed.escalates else 0,
                          extra_looks=esc.looks)
    unchecked = ("note: the models the spec calls were not checked (no gateway): --gateway URL (or env "
                 "TAGWAY_GATEWAY_URL) checks them as `replay run` does")
    if fmt == "json":
        sys.stdout.write(orjson.dumps({**dataclasses.asdict(p), "coverage": p.coverage(),
                                       "models_checked": where is not None},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        if where is None:
            typer.echo(unchecked, err=True)
        return
    _print_table(f"plan: {len(p.rows)} segment(s), alpha {p.alpha:g} family-wise (level {p.level:.2g} per segment), "
                 f"pass rate {p.pass_rate:g}, power {p.power:.0%}",
                 ["segment", "in production", "sampled", "detectable drop", "with escalation",
                  f"cases for a {drop:g} drop", ""],
                 [[r.segment, str(r.available), str(r.sampled), _drop(r.detectable), _drop(r.detectable_escalated),
                   str(r.needed), "production too small" if r.short else ""] for r in p.rows])
    typer.echo(f"# suggested coverage: cases per segment to detect a {drop:g} drop (capped at what production "
               "holds)\ncoverage:")
    for seg, n in p.coverage().items():
        typer.echo(f"  {orjson.dumps(seg).decode()}: {n}")
    if where is None:
        typer.echo(unchecked, err=True)


@replay_app.command("discover")
def discover_cmd(
    run_id: str = typer.Argument(..., help="A finished (or partial) replay run."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="Which candidate (default: every one)."),
    top: int = typer.Option(15, "--top", help="How many cells to show per candidate."),
    min_cases: int = typer.Option(5, "--min-cases", help="Skip cells with fewer cases."),
    fmt: str = PlainFormatOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Rank the dimensions where a run's flips concentrate: every recorded column and tag of the original calls,
    and input/output length, latency and turn buckets, each with the gate's paired test (Holm across cells)."""
    import orjson
    from exporters.vocabulary import COLUMNS
    from .discover import describe, discover
    from .report import BASELINE, pair_outcome
    from .store import call_attributes, get_run, read_results
    with _user_errors():
        _check_plain_format(fmt)
        if top < 1 or min_cases < 1:
            raise SpecError("--top and --min-cases must be at least 1")
        store = _store(dsn, config)
        run = get_run(store, run_id)
        if run is None:
            raise SpecError(f"no replay run {run_id!r}")
        gating = parse_spec(run.spec, f"run {run_id} spec", stored=True).gating
        results = read_results(store, run_id)
        base = {r.case_id: r for r in results if r.candidate == BASELINE}
        names = sorted({r.candidate for r in results} - {BASELINE})
        if candidate is not None:
            if candidate not in names:
                raise SpecError(f"run {run_id} has no candidate {candidate!r} (it has: {', '.join(names) or 'none'})")
            names = [candidate]
        attrs = describe(call_attributes(store, base), list(COLUMNS))
        found = {}
        for name in names:
            pairs = {r.case_id: pair_outcome(base.get(r.case_id), r, gating.errors) for r in results
                     if r.candidate == name}
            outcomes = {cid: o for cid, o in pairs.items() if o is not None}
            if not outcomes:
                raise SpecError(f"run {run_id}: candidate {name} has no scored pair to discover from")
            found[name] = discover(outcomes, attrs, alpha=gating.alpha, margin=gating.margin, min_cases=min_cases)
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"run_id": run_id, "candidates": {
            k: [dataclasses.asdict(c) for c in v[:top]] for k, v in found.items()}},
            option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for name, cells in found.items():
        _print_table(f"discover {run_id}, candidate {name}: where the flips concentrate (paired sign test per cell, "
                     f"Holm across {len(cells)} cells)",
                     ["dimension", "value", "n", "before", "after", "delta", "flips", "lift", "p adj", ""],
                     [[c.dimension, c.value, str(c.n), f"{c.before:.3f}", f"{c.after:.3f}", f"{round(c.delta, 3) + 0.0:+.3f}",
                       f"↓{c.pass_fail} ↑{c.fail_pass}", f"{c.lift:.2f}", f"{c.p_adjusted:.3g}",
                       "❌ regression" if c.regression else ""] for c in cells[:top]])


@dataset_app.command("save")
def dataset_save_cmd(
    dataset_id: str = typer.Argument(..., help="New dataset id, or a .jsonl path to write the cases with content."),
    spec: Path = typer.Option(..., "--spec", "-s", help="A spec whose slice selects the cases."),
    customer: Optional[List[str]] = typer.Option(None, "--customer"),
    intent: Optional[List[str]] = typer.Option(None, "--intent"),
    tag: Optional[List[str]] = typer.Option(None, "--tag"),
    since: Optional[str] = typer.Option(None, "--since"),
    segment_by: Optional[str] = typer.Option(None, "--segment-by"),
    limit: Optional[int] = typer.Option(None, "--limit"),
    description: str = typer.Option("", "--description"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file (without it, a file that is "
                               "there, a tagway dataset or not, is left alone)."),
    dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Pin a slice: the sampled trace ids (and their segments) under an id, or the full cases in a JSONL file.
    DATASET_ID names a file only when it ends in .jsonl/.json or contains a / (write ./golden for a file)."""
    from .datasets import check_writable, is_dataset_file, is_file_ref, save_dataset, save_jsonl, validate_dataset_id
    from .slice import Sampled, select_slice
    with _user_errors():
        to_file = is_file_ref(dataset_id)
        if to_file:
            check_writable(dataset_id, "dataset file", force=force, keep_unless=is_dataset_file)
            if not force and Path(dataset_id).exists():
                # a dataset file is what runs of `--dataset FILE` replay: replacing it silently changed their cases
                raise DatasetError(f"dataset file {dataset_id}: already holds a tagway dataset; refusing to overwrite "
                                   "it (pass --force to replace it, or give another file)")
        else:
            validate_dataset_id(dataset_id)
        data = apply_overrides(load_spec_data(spec), customer=customer, intent=intent, tags=tag, since=since,
                               segment_by=segment_by, limit=limit)
        parsed = _parse_with_flags(data, str(spec), _slice_flags(customer=customer, intent=intent, since=since,
                                                                 segment_by=segment_by, limit=limit))
        if parsed.slice is None:
            raise SpecError("dataset save needs a spec with a slice")
        store = _store(dsn, config)
        cases, sampled = select_slice(store, parsed.slice)
        if to_file:
            n = save_jsonl(dataset_id, cases, force=force)
        else:
            n = save_dataset(store, dataset_id, [Sampled(c.case_id, c.segment) for c in cases], description)
        typer.echo(f"saved {n} case(s) in {len(sampled.selected)} segment(s) as {dataset_id}")
        for reason, k in sampled.skipped.items():
            typer.echo(f"skipped {k}: {reason}", err=True)


@dataset_app.command("list")
def dataset_list_cmd(dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
                     all_: bool = typer.Option(False, "--all", help="Include the datasets pinned by runs.")) -> None:
    """The saved datasets."""
    from .datasets import list_datasets
    with _user_errors():
        rows = list_datasets(_store(dsn, config), include_runs=all_)
    if not rows:
        typer.echo("no dataset")
    for r in rows:
        typer.echo(f"{r['dataset_id']}\t{r['n']} cases\t{r['segments']} segments\t{r['description']}")


def _trend_mark(t: Any) -> str:
    """Why a series is marked: a drop between runs (the columns beside it carry ❌), or only the last run's own gate
    against its baseline, said as such (a bare "regression" beside +0.000 changes read as a drop between runs)."""
    last = t.points[-1]
    if last.previous_regression or last.pinned_regression:
        return "❌ regression"
    return "❌ last run's gate: regression vs its baseline" if t.regressed else ""


@replay_app.command("trend")
def trend_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", help="The runs of this dataset: a name takes every "
                                          "version (a new version breaks the series), name@N one."),
    spec: Optional[str] = typer.Option(None, "--spec", "-s", help="The runs of this spec: its name, or its file "
                                       "(whose name: and gating alpha/margin are used)."),
    by: Optional[str] = typer.Option(None, "--by", help="Segment by customer, intent, prompt_version, model or "
                                     "tag.<key> (default: each run's own segments)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The pinned run every run is compared with "
                                           "(default: each series' first run)."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="Only this candidate."),
    limit: int = typer.Option(30, "--limit", help="The newest N runs (1-1000)."),
    alpha: Optional[float] = AlphaOpt, margin: Optional[float] = MarginOpt,
    fmt: str = PlainFormatOpt, dsn: Optional[str] = DsnOpt, config: Optional[Path] = ConfigOpt,
) -> None:
    """Per segment, the pass rate per run over time, the change against the previous run and against a pinned
    baseline run, a drop the gate's paired test calls a regression marked."""
    import orjson
    from exporters import replays
    from exporters.vocabulary import QueryInputError
    from pydantic import ValidationError
    from .spec import Gating, one_line_error
    from .trend import build_trend, sparkline, trend_json
    with _user_errors():
        _check_plain_format(fmt)
        name, gating = spec, {}
        if spec is not None and Path(spec).is_file():
            data = load_spec_data(Path(spec))
            name, gating = data.get("name"), dict(data.get("gating") or {})
            if not name:  # its gating levels still apply: to the runs of --dataset, or of the spec's own dataset
                given = dataset or (data.get("dataset") if isinstance(data.get("dataset"), str) else None)
                if not given:
                    raise SpecError(f"{spec} has no `name:`, and a spec's runs are found by the name they were run "
                                    "with: add `name: ...` to the spec (its runs from then on carry it), or give "
                                    "--dataset NAME (the runs of a dataset; the spec's alpha and margin apply)")
                name, dataset = None, given
        gating.update({k: v for k, v in {"alpha": alpha, "margin": margin}.items() if v is not None})
        with _flag_errors("gating", {"alpha": ("--alpha", alpha), "margin": ("--margin", margin)}):
            try:
                g = Gating(**{k: v for k, v in gating.items() if k in ("alpha", "margin")})
            except ValidationError as e:
                raise SpecError(one_line_error(e, "gating")) from None
        try:
            data = replays.trend(_store(dsn, config), spec=name, dataset=dataset, limit=limit, versions=True, by=by,
                                 outcomes=True)
        except QueryInputError as e:
            raise SpecError(str(e).replace("spec=NAME or dataset=ID", "--spec or --dataset")) from None
        if not data["runs"]:
            raise SpecError(f"no replay run of {'spec ' + repr(name) if name else 'dataset ' + repr(dataset)}")
        if baseline is not None and baseline not in {r["run_id"] for r in data["runs"]}:
            raise SpecError(f"--baseline {baseline!r} is not one of the trend's runs")
        if candidate is not None:
            for seg in data["segments"]:
                seg["points"] = [p for p in seg["points"] if p["candidate"] == candidate]
        trends = [t for t in build_trend(data, pinned=baseline, alpha=g.alpha, margin=g.margin) if t.points]
    if fmt == "json":
        sys.stdout.write(orjson.dumps(trend_json(trends, data, baseline), option=orjson.OPT_INDENT_2).decode() + "\n")
        return

    def pct(v: Optional[float], signed: bool = False) -> str:
        return "—" if v is None else f"{round(v, 3) + 0.0:+.3f}" if signed else f"{v:.3f}"  # never "-0.000"

    pin = f"run {baseline}" if baseline else "each series' first run"
    _print_table(f"trend of {'spec ' + name if name else 'dataset ' + str(dataset)}: {len(data['runs'])} run(s), "
                 f"oldest first; drops tested against the previous run and {pin} (paired sign test, Holm, alpha "
                 f"{g.alpha:g}, margin {g.margin:g}); | = a new dataset version",
                 ["segment", "candidate", "pass rate per run", "runs", "last", "vs previous", "vs pinned", ""],
                 [[t.segment, t.candidate, sparkline(t.points), str(len(t.points)), pct(t.points[-1].rate),
                   pct(t.points[-1].vs_previous, True) + (" ❌" if t.points[-1].previous_regression else ""),
                   pct(t.points[-1].vs_pinned, True) + (" ❌" if t.points[-1].pinned_regression else ""),
                   _trend_mark(t)] for t in trends])
