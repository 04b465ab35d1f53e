"""exporters.dsn: the one DSN resolution of `tagway replay` and `tagway stats`, checked against the gateway's own
(a store the gateway writes is the store the tools open)."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from exporters.dsn import STORAGE_KEYS, DsnConfigError, ResolvedDsn, default_dsn, embedded_dsn, resolve_dsn
from gateway import stats_cli
from gateway.config import StorageConfig, load_config
from replay.cli import replay_app

ENV = ("TAGWAY_DSN", "TAGWAY_CONFIG", "TAGWAY_STORAGE__DSN", "TAGWAY_STORAGE__DATA_DIR", "TAGWAY_STORAGE__DATABASE")


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_the_default_is_the_gateway_default_store_under_the_current_directory(clean_env, tmp_path):
    expected = f"chdb://{tmp_path / 'tagway-data' / 'clickhouse'}"
    assert default_dsn() == expected
    assert resolve_dsn() == ResolvedDsn(expected, "", "default")
    assert StorageConfig().resolved_dsn() == expected == load_config(None).storage.resolved_dsn()
    assert stats_cli.default_dsn() == expected and stats_cli.resolve_dsn() == (expected, "")
    assert embedded_dsn("/srv/tw") == "chdb:///srv/tw/clickhouse"


def test_precedence_flag_env_config_default(clean_env, tmp_path):
    cfg = tmp_path / "conf" / "tagway.yaml"
    cfg.parent.mkdir()
    cfg.write_text("storage:\n  data_dir: data\n  database: tw\n")
    from_config = f"chdb://{tmp_path / 'conf' / 'data' / 'clickhouse'}"  # relative to the config file
    assert resolve_dsn(config=str(cfg)) == ResolvedDsn(from_config, "tw", "config")
    clean_env.setenv("TAGWAY_CONFIG", str(cfg))
    assert resolve_dsn().dsn == from_config
    clean_env.setenv("TAGWAY_DSN", "http://u:p@h:8123/db")
    assert resolve_dsn() == ResolvedDsn("http://u:p@h:8123/db", "", "env")
    assert resolve_dsn("chdb:///flag") == ResolvedDsn("chdb:///flag", "", "flag")


@pytest.mark.parametrize("yaml_text,env", [
    ("storage:\n  data_dir: d1\n", {}),
    ("storage:\n  data_dir: d1\n", {"TAGWAY_STORAGE__DSN": "chdb:///from-env"}),
    ("storage:\n  data_dir: d1\n", {"TAGWAY_STORAGE__DATA_DIR": "env-dir"}),
    ("storage:\n  dsn: chdb:///from-yaml\n", {"TAGWAY_STORAGE__DATA_DIR": "env-dir"}),
    ("storage:\n  dsn: chdb:///from-yaml\n", {"TAGWAY_STORAGE__DSN": "chdb:///from-env"}),
    ("server:\n  port: 4001\n", {"TAGWAY_STORAGE__DATA_DIR": "env-dir", "TAGWAY_STORAGE__DATABASE": "db1"}),
    (None, {"TAGWAY_STORAGE__DSN": "chdb:///from-env"}),
    (None, {"TAGWAY_STORAGE__DATA_DIR": "/abs/dir"}),
    ("", {}),
])
def test_same_store_as_the_gateway(clean_env, tmp_path, yaml_text, env):
    """Whatever the config file and the TAGWAY_STORAGE__* overrides, the tools open the gateway's store."""
    path = None
    if yaml_text is not None:
        cfg = tmp_path / "sub" / "tagway.yaml"
        cfg.parent.mkdir()
        cfg.write_text(yaml_text)
        path = str(cfg)
    for k, v in env.items():
        clean_env.setenv(k, v)
    gw = load_config(path).storage
    assert resolve_dsn(config=path) == ResolvedDsn(gw.resolved_dsn(), gw.database,
                                                   "config" if path else "env")


def test_storage_keys_match_the_gateway_config():
    assert STORAGE_KEYS == set(StorageConfig.model_fields)


@pytest.mark.parametrize("text,message", [
    ("storage:\n  nope: 1\n", "storage.nope: unknown setting"),
    ("storage: 3\n", "storage: must be a mapping"),
    ("storage:\n  dsn: [1]\n", "storage.dsn: must be a string"),
    ("- a\n", "the top level must be a mapping"),
    ("storage: [unclosed\n", "invalid YAML at line"),
])
def test_bad_config_is_one_clear_error(clean_env, tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(DsnConfigError, match=message.replace("[", r"\[")):
        resolve_dsn(config=str(cfg))
    with pytest.raises(DsnConfigError, match="does not exist"):
        resolve_dsn(config=str(tmp_path / "missing.yaml"))


def test_replay_opens_the_resolved_store_not_the_filesystem_root(clean_env, tmp_path):
    """Before: `chdb:///./tagway-data` (/tagway-data). Now `dataset list` with no DSN opens ./tagway-data/clickhouse,
    once `tagway db migrate` (the one command that creates a store) made it (subprocesses: this test process
    already holds the session's chDB store)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    store = tmp_path / "tagway-data" / "clickhouse"

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)

    out = run("replay", "dataset", "list")
    assert out.returncode == 2 and out.stderr.strip() == \
        f"error: no tagway store at {store}: start the gateway once (or run `tagway db migrate`), or pass --dsn / " \
        "--config" and not store.exists(), out.stderr
    assert run("gateway.cli", "db", "migrate").returncode == 0 and store.is_dir()
    out = run("replay", "dataset", "list")
    assert out.returncode == 0, out.stderr
    assert (store / "tagway.lock").exists()


def test_replay_config_errors_are_one_line(clean_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  dsn: [1]\n")
    res = CliRunner().invoke(replay_app, ["dataset", "list", "--config", str(bad)])
    assert res.exit_code == 2 and res.output.strip() == "error: config: storage.dsn: must be a string"
