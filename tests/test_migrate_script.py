"""`tagway db migrate --print [--pending]`: the script a DBA runs by hand migrates the store as `db migrate` would,
the rows that mark each migration applied included, so a gateway whose ClickHouse user may not run DDL records."""
from __future__ import annotations

import yaml
from typer.testing import CliRunner

from exporters.schema import MIGRATIONS, applied_versions, migrate
from exporters.store import connect
from gateway.cli import app as cli

runner = CliRunner()


def _config(tmp_path) -> str:
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")}}))
    return str(path)


def _run_by_hand(store, script: str) -> int:
    """Each statement of a printed script, as a DBA's client would send it."""
    statements = [s.strip().removesuffix(";") for s in script.split(";\n\n") if s.strip()]
    for sql in statements:
        store.command(sql)
    return len(statements)


def test_the_printed_script_run_by_hand_leaves_nothing_pending(tmp_path):
    config = _config(tmp_path)
    res = runner.invoke(cli, ["db", "migrate", "--print", "--config", config])
    assert res.exit_code == 0, res.output
    store = connect(f"chdb://{tmp_path / 'data' / 'clickhouse'}")
    try:
        assert _run_by_hand(store, res.stdout) > len(MIGRATIONS)
        assert applied_versions(store) == {v for v, _, _ in MIGRATIONS}  # before: the rows were not printed
        assert migrate(store) == []  # a gateway starting on it has nothing to do (no DDL)
    finally:
        store.close()


def test_print_pending_prints_only_what_this_store_lacks(tmp_path):
    config = _config(tmp_path)
    last = MIGRATIONS[-1][0]
    store = connect(f"chdb://{tmp_path / 'data' / 'clickhouse'}")
    try:
        migrate(store, upto=MIGRATIONS[-2][0])  # a store one release behind
    finally:
        store.close()
    res = runner.invoke(cli, ["db", "migrate", "--print", "--pending", "--config", config])
    assert res.exit_code == 0, res.output
    assert f"VALUES ({last}, " in res.stdout and f"VALUES ({MIGRATIONS[-2][0]}, " not in res.stdout
    store = connect(f"chdb://{tmp_path / 'data' / 'clickhouse'}")
    try:
        _run_by_hand(store, res.stdout)
        assert migrate(store) == []
    finally:
        store.close()
    again = runner.invoke(cli, ["db", "migrate", "--print", "--pending", "--config", config])
    assert (again.exit_code, again.stdout) == (0, "-- schema is up to date\n")
    alone = runner.invoke(cli, ["db", "migrate", "--pending", "--config", config])
    assert alone.exit_code == 2 and alone.stderr == ("error: --pending goes with --print (a plain `db migrate` "
                                                     "applies what is pending)\n")
