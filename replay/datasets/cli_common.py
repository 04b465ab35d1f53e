"""What the `tagway dataset` commands share: the command group, common options, error handling and output helpers
(replay/datasets/cli.py and populate_cli.py both build on it)."""
from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import orjson
import typer

from exporters import datasets as core

from ..cli import ConfigOpt, DsnOpt, _fail, _user_errors

__all__ = ["dataset_app", "AuthorOpt", "MessageOpt", "JsonOpt", "ConfigOpt", "DsnOpt", "_errors", "_author", "_open",
           "_when", "_json_out"]

dataset_app = typer.Typer(help="Versioned datasets: the product's memory (cases from production traces, locks, "
                          "labels, coverage targets, difficulty).", no_args_is_help=True)

AuthorOpt = typer.Option(None, "--author", help="Who makes the change (default $TAGWAY_AUTHOR, else your login).")
MessageOpt = typer.Option("", "--message", "-m", help="What the change is for (kept in the log).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")



@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """A change that changes nothing is said and exits 0 (no version made); bad input is one line and exit 2."""
    from exporters.vocabulary import QueryInputError
    with _user_errors():
        try:
            yield
        except core.NoChange as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(0) from None
        except QueryInputError as e:
            raise _fail(e.message) from None


def _author(flag: Optional[str]) -> str:
    if flag:
        return flag
    if os.environ.get("TAGWAY_AUTHOR"):
        return os.environ["TAGWAY_AUTHOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _open(dsn: Optional[str], config: Optional[Path], *, create: bool = False) -> tuple[Any, str]:
    from exporters.dsn import resolve_dsn
    from ..cli import _store
    return _store(dsn, config, create=create), resolve_dsn(dsn, config).database


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _json_out(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
