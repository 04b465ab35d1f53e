"""`tagway tags add|remove|list|audit TARGET`: a person's side of applied tags, on the store the gateway writes
(directly, or through the running gateway that holds the embedded store). Changes are audited as
`human:cli:<login>` (or `human:<--actor>`); tag rules reconcile the same tags on their next full run (seed 002).

TARGET is `message:<trace id>` (or the bare trace id) or `session:<customer>/<session id>`.
"""
from __future__ import annotations

import datetime as dt
import getpass
import re
from typing import Annotated, Optional

import typer
from rich.table import Table

from exporters import tagstate as ts
from exporters.store import Store

from .stats_cli import ConfigOpt, DsnOpt, JsonOpt, _CliError, _console, _json_out, _run, _text, _with_store

__all__ = ["register", "tags_app"]

tags_app = typer.Typer(no_args_is_help=True, help="Applied tags on messages and sessions: add, remove, list, audit.")
TargetArg = Annotated[str, typer.Argument(help="message:<trace id> (or a trace id) or session:<customer>/<session id>")]
TagArg = Annotated[str, typer.Argument(help="A tag name: 1-64 of [a-z0-9_.:-].")]
ActorOpt = Annotated[Optional[str], typer.Option("--actor", help="Who is acting, for the audit log (default "
                                                 "cli:<login>).")]
_ACTOR_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


def _target(raw: str) -> ts.Target:
    try:
        return ts.parse_target(raw)
    except ts.TagInputError as e:
        raise _CliError(e.message) from None


def _existing(store: Store, target: ts.Target, database: str) -> str:
    customer = ts.target_customer(store, target, database=database)
    if customer is None:
        raise _CliError(f"no {'call' if target.kind == ts.MESSAGE else 'session'} {target} in the store")
    return customer


def _actor(actor: str | None) -> str:
    if actor is None:
        try:
            actor = f"cli:{getpass.getuser()}"
        except (KeyError, OSError):
            actor = "cli"
    if not _ACTOR_RE.match(actor):
        raise _CliError(f"--actor {actor[:40]!r}: 1-64 of [A-Za-z0-9_.:@-]")
    return f"human:{actor}"


def _change(target_raw: str, tag: str, action: str, actor: str | None, dsn: str | None, config: str | None) -> None:
    def body() -> None:
        target = _target(target_raw)
        try:
            ts.validate_tag_name(tag)
        except ts.TagInputError as e:
            raise _CliError(e.message) from None
        who = _actor(actor)

        def work(store: Store, resolved: str, database: str) -> None:
            customer = _existing(store, target, database)
            try:
                event = ts.human_change(store, target, tag, action, who, customer, database=database)
            except ts.TagInputError as e:
                raise _CliError(e.message) from None
            except ts.TagLockBusy as e:
                raise _CliError(str(e), 3) from None
            verb = "added" if action == "apply" else "removed"
            typer.echo(f"{verb} {tag} {'to' if action == 'apply' else 'from'} {target} (as {who})" if event else
                       f"{target} already carries {tag}: nothing changed")

        _with_store(dsn, config, work)

    _run(body)


@tags_app.command("add")
def add_command(target: TargetArg, tag: TagArg, actor: ActorOpt = None, dsn: DsnOpt = None,
                config: ConfigOpt = None) -> None:
    """Add a tag to a message or session (audited)."""
    _change(target, tag, "apply", actor, dsn, config)


@tags_app.command("remove")
def remove_command(target: TargetArg, tag: TagArg, actor: ActorOpt = None, dsn: DsnOpt = None,
                   config: ConfigOpt = None) -> None:
    """Remove a tag from a message or session (audited); a tag that is not there is an error."""
    _change(target, tag, "remove", actor, dsn, config)


@tags_app.command("list")
def list_command(target: TargetArg, as_json: JsonOpt = False, dsn: DsnOpt = None, config: ConfigOpt = None) -> None:
    """The tags a message or session carries now, and who applied each."""
    def body() -> None:
        t = _target(target)

        def work(store: Store, resolved: str, database: str) -> None:
            _existing(store, t, database)
            tags = ts.tags_of(store, t, database=database)
            if as_json:
                _json_out({"target": str(t), "tags": [{"tag": k, **v} for k, v in sorted(tags.items())]})
                return
            if not tags:
                typer.echo(f"{t} carries no tag")
            for k, v in sorted(tags.items()):
                typer.echo(f"{k}\t{v['actor']}\t{v['run_id']}")

        _with_store(dsn, config, work)

    _run(body)


@tags_app.command("audit")
def audit_command(target: TargetArg, as_json: JsonOpt = False, dsn: DsnOpt = None, config: ConfigOpt = None) -> None:
    """Every change of a target's tags, oldest first: time, tag, action, actor, run and mode, the field value."""
    def body() -> None:
        t = _target(target)

        def work(store: Store, resolved: str, database: str) -> None:
            rows = ts.audit(store, t, database=database)
            if as_json:
                _json_out({"target": str(t), "events": rows})
                return
            table = Table(title=_text(f"tag audit of {t}"), title_justify="left", header_style="bold", pad_edge=False)
            for col in ("time (UTC)", "tag", "action", "actor", "run", "mode", "value"):
                table.add_column(col)
            for r in rows:
                when = dt.datetime.fromtimestamp(r["event_time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
                value = f"{r['field']}={r['field_value']}" if r["field"] else ""
                table.add_row(*(_text(x) for x in (when[:-3], r["tag"], r["action"], r["actor"], r["run_id"],
                                                   r["mode"], value)))
            _console().print(table)
            if not rows:
                typer.echo(f"no tag change recorded for {t}")

        _with_store(dsn, config, work)

    _run(body)


def register(app: typer.Typer) -> None:
    app.add_typer(tags_app, name="tags")
