"""`tagway keys create/revoke/list` against a running gateway: printed once, stored hashed, revoked live."""
from __future__ import annotations

import time

import httpx
import yaml
from typer.testing import CliRunner

from gateway.app import TagwayApp
from gateway.cli import app as cli
from gateway.config import load_config
from tests.gateway_fixture import GatewayServer, MemoryRecorder

runner = CliRunner()


def test_create_use_revoke_list(tmp_path):
    cfg_path = tmp_path / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({"models": [{"name": "m", "provider": "mock"}],
                                        "tenants": [{"customer": "acme"}, {"customer": "globex"}]}))
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(load_config(cfg_path), recorder=recorder)).start()
    try:
        res = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "acme-ci", "--tag", "team=CX",
                                  "--config", str(cfg_path)])
        assert res.exit_code == 0, res.output
        key = res.stdout.strip().splitlines()[-1]
        assert key.startswith("tw-") and len(key) > 40
        stored = (tmp_path / "tagway.keys.yaml").read_text()
        assert key not in stored and "sha256:" in stored  # only the hash is kept

        def call() -> httpx.Response:
            return httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})

        deadline = time.monotonic() + 5
        while (r := call()).status_code == 401 and time.monotonic() < deadline:
            time.sleep(0.2)  # the running gateway picks the new key up within a second
        assert r.status_code == 200
        span = recorder.call(r.headers["x-tagway-trace-id"])
        assert span.attributes["tagway.customer"] == "acme" and span.attributes["tagway.tag.team"] == "cx"

        listing = runner.invoke(cli, ["keys", "list", "--config", str(cfg_path)])
        assert "acme-ci\tacme\tactive" in listing.stdout and key not in listing.stdout

        assert runner.invoke(cli, ["keys", "revoke", "acme-ci", "--config", str(cfg_path)]).exit_code == 0
        deadline = time.monotonic() + 5
        while (r := call()).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
    finally:
        server.stop()
        recorder.shutdown()


def test_bad_key_commands_are_one_line_and_exit_2(tmp_path):
    cfg_path = tmp_path / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({"tenants": [{"customer": "acme"}]}))
    for args in (["keys", "create", "--customer", "nobody"], ["keys", "revoke", "no-such-key"],
                 ["keys", "create", "--customer", "acme", "--tag", "novalue"]):
        res = runner.invoke(cli, [*args, "--config", str(cfg_path)])
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: a, fallbacks: [zz]}]\nbogus: 1\n")
    res = runner.invoke(cli, ["config", "check", "--config", str(bad)])
    assert res.exit_code == 2 and "bogus: unknown setting" in res.stderr and "Traceback" not in res.output


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    cfg_path = tmp_path / "etc" / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({"keys_file": "keys/k.yaml", "tenants": [{"customer": "acme"}],
                                        "storage": {"data_dir": "data", "spool_dir": "spool"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_path)
    assert cfg.keys_file == str(tmp_path / "etc" / "keys" / "k.yaml")
    assert cfg.storage.resolved_dsn() == f"chdb://{tmp_path / 'etc' / 'data' / 'clickhouse'}"
    assert cfg.storage.resolved_spool() == str(tmp_path / "etc" / "spool")
    cfg_path.write_text(yaml.safe_dump({"storage": {"dsn": "chdb://db/ch"}}))
    assert load_config(cfg_path).storage.resolved_dsn() == f"chdb://{tmp_path / 'etc' / 'db' / 'ch'}"


def test_revoking_a_key_written_in_the_config_says_where_it_is(tmp_path):
    """`keys list` shows config keys beside the keys file's; revoking one said 'no key with id ... in <keys file>'."""
    cfg_path = tmp_path / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({"tenants": [{"customer": "acme", "keys": [
        {"id": "a-inline", "hash": "sha256:" + "0" * 64}]}]}))
    res = runner.invoke(cli, ["keys", "revoke", "a-inline", "--config", str(cfg_path)])
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: key 'a-inline' is written in the config (tenants[0].keys[0]), not in the keys file: set "
        "`revoked: true` there (a running gateway reads the config only at start)")
