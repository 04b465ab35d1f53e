"""`tagway db migrate --print [--pending]`: the script a DBA runs by hand migrates the store as `db migrate` would,
the rows that mark each migration applied included, so a gateway whose ClickHouse user may not run DDL records.
Each test works in a database of its own inside the session's one embedded store (tests/chdb_fixture.py)."""
from __future__ import annotations

import uuid

import yaml
from typer.testing import CliRunner

from exporters.schema import MIGRATIONS, applied_versions, migrate
from gateway.cli import app as cli
from gateway.config import GatewayConfig

runner = CliRunner()


def _config(tmp_path, dsn: str) -> tuple[str, object]:
    storage = {"dsn": dsn, "database": f"hand_{uuid.uuid4().hex[:10]}"}
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({"storage": storage}))
    return str(path), GatewayConfig(storage=storage).schema_settings()


def _run_by_hand(store, script: str) -> int:
    """Each statement of a printed script, as a DBA's client would send it."""
    statements = [s.strip().removesuffix(";") for s in script.split(";\n\n") if s.strip()]
    for sql in statements:
        store.command(sql)
    return len(statements)


def test_the_printed_script_run_by_hand_leaves_nothing_pending(tmp_path, chdb_store, chdb_dsn):
    config, settings = _config(tmp_path, chdb_dsn)
    res = runner.invoke(cli, ["db", "migrate", "--print", "--config", config])
    assert res.exit_code == 0, res.output
    assert _run_by_hand(chdb_store, res.stdout) > len(MIGRATIONS)
    assert applied_versions(chdb_store, settings) == {v for v, _, _ in MIGRATIONS}  # the rows were not printed
    assert migrate(chdb_store, settings) == []  # a gateway starting on it has nothing to do (no DDL)


def test_print_pending_prints_only_what_this_store_lacks(tmp_path, chdb_store, chdb_dsn):
    config, settings = _config(tmp_path, chdb_dsn)
    last, before = MIGRATIONS[-1][0], MIGRATIONS[-2][0]
    migrate(chdb_store, settings, upto=before)  # a store one release behind
    res = runner.invoke(cli, ["db", "migrate", "--print", "--pending", "--config", config])
    assert res.exit_code == 0, res.output
    assert f"VALUES ({last}, " in res.stdout and f"VALUES ({before}, " not in res.stdout
    _run_by_hand(chdb_store, res.stdout)
    assert migrate(chdb_store, settings) == []
    again = runner.invoke(cli, ["db", "migrate", "--print", "--pending", "--config", config])
    assert (again.exit_code, again.stdout) == (0, "-- schema is up to date\n")
    alone = runner.invoke(cli, ["db", "migrate", "--pending", "--config", config])
    assert alone.exit_code == 2 and alone.stderr == ("error: --pending goes with --print (a plain `db migrate` "
                                                     "applies what is pending)\n")
