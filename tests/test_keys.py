"""`tagway keys create/revoke/list` against a running gateway: printed once, stored hashed, revoked live."""
from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from gateway.app import TagwayApp
from gateway.auth import KeyRing, KeysFileError, hash_key
from gateway.cli import app as cli
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.errors import GatewayError
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


# -- the keys file: what `serve` refuses, `config check` says the same way; `keys *` read it without tracebacks -----
def _setup(tmp_path, keys_text: str, **cfg) -> tuple[str, str]:
    """A config (one mock model, tenant acme, an inline key `inline`) and its keys file holding `keys_text`."""
    cfg_path = tmp_path / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data")}, "models": [{"name": "m", "provider": "mock"}],
        "tenants": [{"customer": "acme", "keys": [{"id": "inline", "hash": "sha256:" + "1" * 64}]}], **cfg}))
    keys = tmp_path / "tagway.keys.yaml"
    keys.write_text(keys_text)
    return str(cfg_path), str(keys)


CHECK_ENV = {"TAGWAY_CONFIG": None, "TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789", "TAGWAY_STORAGE__DSN": None}
H = "sha256:" + "0" * 64


def hx(c: str) -> str:
    """Another well-formed hash (no key has it)."""
    return "sha256:" + c * 64

# case -> (keys file, the lines `serve` and `config check` print, {k} standing for the keys file's path)
BAD_KEYS_FILES = {
    "not a list": ("{a: 1}\n", ["error: {k}: expected a list of keys (as `tagway keys create` writes)"]),
    "YAML syntax": ("- [unclosed\n",
                    ["error: {k}: invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"]),
    "no hash": ("- {id: x, customer: acme}\n", ["error: {k}:1: key #1: hash: Field required"]),
    "not a mapping": ("- {id: x, customer: acme, hash: '%s'}\n- just-a-string\n" % H,
                      ["error: {k}:2: key #2: each key must be a mapping"]),
    "hash without sha256:": ("- {id: x, customer: acme, hash: nothash}\n",
                             ["error: {k}:1: key #1: hash: must be 'sha256:' and 64 hex digits, as `tagway keys "
                              "create` writes it; this key can never match"]),
    "a digest cut short": ("- {id: x, customer: acme, hash: 'sha256:00'}\n",
                           ["error: {k}:1: key #1: hash: must be 'sha256:' and 64 hex digits, as `tagway keys "
                            "create` writes it; this key can never match"]),
    "no customer": ("- {id: x, hash: '%s'}\n" % H,
                    ["error: {k}:1: key #1: customer: missing: a key in the keys file names its tenant "
                     "(customer: <name>); this key authenticates nobody"]),
    "id twice": (f"- {{id: x, customer: acme, hash: '{H}'}}\n- {{id: y, customer: acme, hash: '{hx('2')}'}}\n"
                 f"- {{id: x, customer: acme, hash: '{hx('3')}', revoked: true}}\n",
                 ["error: {k}:3: key #3: id: 'x' is already the id of key #1; give each key its own id"]),
    "id of a config key": ("- {id: inline, customer: acme, hash: '%s'}\n" % H,
                           ["error: {k}:1: key #1: id: 'inline' is also the id of a key in the config "
                            "(tenants[0].keys[0]); give each key its own id"]),
    "the same key twice": ("- {id: x, customer: acme, hash: '%s'}\n- {id: y, customer: acme, hash: '%s', "
                           "revoked: true}\n" % (H, H),
                           ["error: {k}:2: key #2: hash: the same key as key #1; keep one entry per key"]),
    "the same key as a config key": ("- {id: x, customer: acme, hash: 'sha256:%s'}\n" % ("1" * 64),
                                     ["error: {k}:1: key #1: hash: the same key as tenants[0].keys[0] in the config; "
                                      "keep one entry per key"]),
    "every bad entry, one line each": (
        "- {id: a, customer: acme, hash: nothash}\n- {id: b, customer: acme, hash: '%s', colour: red}\n"
        "- {id: a, hash: '%s'}\n" % (H, hx("4")),
        ["error: {k}:1: key #1: hash: must be 'sha256:' and 64 hex digits, as `tagway keys create` writes it; this "
         "key can never match",
         "error: {k}:2: key #2: colour: Extra inputs are not permitted",
         "error: {k}:3: key #3: customer: missing: a key in the keys file names its tenant (customer: <name>); "
         "this key authenticates nobody",
         "error: {k}:3: key #3: id: 'a' is already the id of key #1; give each key its own id"]),
}


@pytest.mark.parametrize("case", BAD_KEYS_FILES)
def test_config_check_refuses_what_serve_refuses_in_the_keys_file(tmp_path, case):
    """`config check` did not read the keys file (exit 0 on files `serve` refused), and `serve` started with entries
    that could never work: a hash without `sha256:`, no customer, an id twice (`keys revoke` would revoke one)."""
    text, expected = BAD_KEYS_FILES[case]
    cfg_path, keys = _setup(tmp_path, text)
    expected = [line.format(k=keys) for line in expected]
    for argv in (["config", "check"], ["serve", "--port", "1"]):  # serve stops before it binds
        res = runner.invoke(cli, [*argv, "--config", cfg_path], env=CHECK_ENV)
        assert res.exit_code == 2, (argv, res.output)
        assert res.stderr.splitlines() == expected, argv
        assert res.stdout == "" and "Traceback" not in res.output
    with pytest.raises(KeysFileError) as e:  # the running gateway's reload reads it the same way
        KeyRing(load_config(cfg_path))
    assert e.value.problems == [line.removeprefix("error: ") for line in expected]


def test_keys_the_cli_writes_and_sha256_hashes_pass(tmp_path):
    """No valid form is refused: keys from `tagway keys create` (revoked or not), hand-written `sha256:` hashes,
    an id reused by no one."""
    cfg_path, _ = _setup(tmp_path, "- {id: hand, customer: acme, hash: '%s', tags: {team: cx}}\n" % H)
    for args in (["--customer", "acme", "--id", "a1"], ["--customer", "acme"]):
        assert runner.invoke(cli, ["keys", "create", *args, "--config", cfg_path]).exit_code == 0
    assert runner.invoke(cli, ["keys", "revoke", "a1", "--config", cfg_path]).exit_code == 0
    res = runner.invoke(cli, ["config", "check", "--config", cfg_path], env=CHECK_ENV)
    assert res.exit_code == 0 and res.stderr == "" and res.stdout.startswith("ok: "), res.output
    assert len(KeyRing(load_config(cfg_path)).keys()) == 3  # inline, hand, the second created (a1 is revoked)


def test_a_key_of_no_tenant_is_a_config_check_warning(tmp_path):
    """A key whose customer is no tenant gets 401 "Incorrect API key provided.", which blames the client. Removing a
    tenant is how its keys are shut out (the keys file keeps their entries), and `keys create` runs before any
    tenant exists: so `serve` starts and `config check` warns, once per active key (not for revoked ones)."""
    text = (f"- {{id: ok, customer: acme, hash: '{H}'}}\n- {{id: gone, customer: nobody, hash: '{hx('5')}'}}\n"
            f"- {{id: old, customer: nobody, hash: '{hx('6')}', revoked: true}}\n")
    cfg_path, keys = _setup(tmp_path, text)
    res = runner.invoke(cli, ["config", "check", "--config", cfg_path], env=CHECK_ENV)
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [
        f"warning: {keys}:2: key #2 (gone): customer 'nobody' is not a tenant in the config: this key gets 401 "
        "\"Incorrect API key provided.\"; add the tenant (customer: nobody), or `tagway keys revoke gone`"]
    assert res.stdout.startswith("1 warning(s): ")
    assert runner.invoke(cli, ["config", "check", "--strict", "--config", cfg_path], env=CHECK_ENV).exit_code == 1
    ring = KeyRing(load_config(cfg_path))  # what serve builds: it starts
    assert [k.id for k, _ in ring.keys()] == ["inline", "ok"]


def test_a_running_gateway_keeps_its_keys_when_the_file_turns_bad(tmp_path):
    cfg_path, keys = _setup(tmp_path, f"- {{id: ok, customer: acme, hash: '{hash_key('tw-ok')}'}}\n")
    ring = KeyRing(load_config(cfg_path))
    with open(keys, "a") as f:
        f.write(f"- {{id: ok, customer: acme, hash: '{hx('7')}'}}\n")
    os.utime(keys, (time.time() + 5, time.time() + 5))
    assert ring.reload_if_changed() is False
    assert ring.authenticate("Bearer tw-ok").key_id == "ok"


@pytest.mark.parametrize("argv", [["keys", "list"], ["keys", "create", "--customer", "acme"],
                                  ["keys", "revoke", "x"]])
def test_keys_commands_on_a_keys_file_with_a_yaml_error_say_one_line(tmp_path, argv):
    """`keys list` printed PyYAML's two raw lines (`expected ',' or ']' ... in "k.keys.yaml", line 2, column 1`)
    with exit 1; every keys command says what `serve` says, exit 2, and leaves the file as it was."""
    text = "- {id: x, customer: acme, hash: '%s'}\n- [unclosed\n" % H
    cfg_path, keys = _setup(tmp_path, text)
    r = subprocess.run([sys.executable, "-m", "gateway.cli", *argv, "--config", cfg_path], capture_output=True,
                       text=True, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"error: {keys}: invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'"]
    assert r.stdout == "" and (tmp_path / "tagway.keys.yaml").read_text() == text


def test_keys_list_shows_entries_serve_would_refuse(tmp_path):
    """A file with a bad entry can still be listed (to find it) and revoked in; a number where a name belongs is
    shown, not a TypeError."""
    cfg_path, _ = _setup(tmp_path, f"- {{id: 7, customer: acme, hash: nothash}}\n- {{id: x, hash: '{H}'}}\n")
    res = runner.invoke(cli, ["keys", "list", "--config", cfg_path])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["inline\tacme\tactive\tconfig\t-", "7\tacme\tactive\tkeys file\t-",
                                       "x\t\tactive\tkeys file\t-"]
    assert runner.invoke(cli, ["keys", "revoke", "x", "--config", cfg_path]).exit_code == 0


def test_one_key_under_two_entries_of_the_config_is_refused(tmp_path):
    """The same key under two tenants: whose calls they are was the last entry's say (and a revocation of one entry
    did nothing while the other was active)."""
    key = hash_key("tw-twice-0123456789abcdefghijklmnopqrstu")
    cfg_path, _ = _setup(tmp_path, "", tenants=[{"customer": "acme", "keys": [{"id": "a1", "hash": key, "revoked": True}]},
                                               {"customer": "globex", "keys": [{"id": "g1", "hash": key}]}])
    res = runner.invoke(cli, ["config", "check", "--config", cfg_path], env=CHECK_ENV)
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [f"tagway: config error: {cfg_path}: tenants[1] (globex).keys[0]: key 'g1' is "
                                       "the same key as tenants[0].keys[0] ('a1') (keep one entry per key)"]


def test_a_keys_file_the_gateway_cannot_load_still_revokes(tmp_path):
    """A hand-edited entry makes the file unloadable (the gateway keeps its keys): a revocation written in it
    applies all the same, instead of waiting until the unrelated entry is fixed."""
    cfg_path, keys = _setup(tmp_path, f"- {{id: ok, customer: acme, hash: '{hash_key('tw-ok')}'}}\n"
                                      f"- {{id: other, customer: acme, hash: '{hash_key('tw-other')}'}}\n")
    ring = KeyRing(load_config(cfg_path))
    with open(keys, "w") as f:
        f.write(f"- {{id: ok, customer: acme, hash: '{hash_key('tw-ok')}', revoked: true}}\n"
                f"- {{id: other, customer: acme, hash: '{hash_key('tw-other')}'}}\n"
                f"- {{id: broken, hash: '{hx('9')}'}}\n")  # no customer: the file cannot be loaded
    os.utime(keys, (time.time() + 5, time.time() + 5))
    assert ring.reload_if_changed() is False
    with pytest.raises(GatewayError) as e:
        ring.authenticate("Bearer tw-ok")
    assert e.value.code == "revoked_api_key"
    assert ring.authenticate("Bearer tw-other").key_id == "other"  # the rest as they were


def test_keys_create_refuses_the_id_of_a_key_in_the_config(tmp_path):
    """The file would then hold an id the gateway refuses, and every later revocation in it would wait on that."""
    cfg_path, keys = _setup(tmp_path, "")
    res = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "inline", "--config", cfg_path])
    assert res.exit_code == 2 and res.stderr.splitlines() == [
        "error: a key with id 'inline' is written in the config; give the new key another --id"], res.output
    assert open(keys).read() == ""


def test_a_hash_with_capital_digits_is_the_same_hash_and_an_admin_hash_of_another_form_is_refused(tmp_path):
    """A hand-pasted digest in capitals authenticates its key; an admin_key_hash that no key could match (a pasted
    key, a cut digest) used to leave the gateway with no admin at all, silently."""
    upper = hash_key("tw-upper").replace("sha256:", "SHA256:").upper()
    cfg_path, _ = _setup(tmp_path, f"- {{id: up, customer: acme, hash: ' {upper} '}}\n")
    assert KeyRing(load_config(cfg_path)).authenticate("Bearer tw-upper").key_id == "up"
    assert KeyRing(GatewayConfig(admin_key_hash=hash_key("tw-adm").upper().replace("SHA", "sha"))).authenticate(
        "Bearer tw-adm").is_admin
    for bad in ("tw-the-key-itself", "sha256:00", "sha256:" + "g" * 64):
        cfg_path, _ = _setup(tmp_path, "", admin_key_hash=bad)
        with pytest.raises(ConfigError) as e:
            load_config(cfg_path)
        assert e.value.problems == [f"{cfg_path}: admin_key_hash: must be 'sha256:' and 64 hex digits, as `tagway "
                                    "keys admin` prints it (no admin key could ever match this one)"]
        res = runner.invoke(cli, ["config", "check", "--config", cfg_path], env=CHECK_ENV)
        assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1 and "admin_key_hash: must be" in res.stderr


# -- `keys create/revoke` at the same time; the running gateway's view of a broken or vanished keys file -----------
def _cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})


def test_keys_create_and_revoke_at_the_same_time_lose_nothing(tmp_path):
    """Eight `keys create` and a `keys revoke` at once each read, changed and rewrote the file through the same
    `<file>.tmp`: keys printed as created were missing from the file (they could never work), keys nobody saw were
    in it, runs failed naming `<file>.tmp`, and a revocation said `revoked` but the key stayed active."""
    cfg_path, keys = _setup(tmp_path, "")
    os.remove(keys)  # the first `keys create` makes it (0600)
    first = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "victim", "--config", cfg_path])
    assert first.exit_code == 0, first.output
    victim = first.stdout.strip().splitlines()[-1]
    # a file of a thousand keys, as a gateway in use has: reading and rewriting it takes a moment, as it does there
    before = yaml.safe_load(Path(keys).read_text()) + [{"id": f"old-{i}", "customer": "acme", "hash": hash_key(f"tw-old-{i}"),
                                            "revoked": False, "tags": {}} for i in range(1000)]
    with open(keys, "w") as f:
        yaml.safe_dump(before, f, sort_keys=False)
    procs = [_cli("keys", "create", "--customer", "acme", "--config", cfg_path) for _ in range(8)]
    procs.append(_cli("keys", "revoke", "victim", "--config", cfg_path))
    outs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for rc, out, err in outs:
        assert rc == 0 and "Traceback" not in err, err
    assert outs[-1][1] == "revoked victim\n"
    created = {}  # id -> key, as each run printed them
    for _, out, err in outs[:-1]:
        assert "store this key now" in err
        kid = next(line for line in err.splitlines() if line.startswith("key id: ")).removeprefix("key id: ")
        created[kid] = out.strip()
    assert len(created) == 8
    entries = yaml.safe_load(Path(keys).read_text())
    assert sorted(e["id"] for e in entries) == sorted([e["id"] for e in before] + [*created])  # all, nothing else
    assert {e["id"]: e["revoked"] for e in entries} == {**{e["id"]: False for e in before},
                                                        **{k: False for k in created}, "victim": True}
    ring = KeyRing(load_config(cfg_path))
    for kid, key in created.items():
        assert ring.authenticate(f"Bearer {key}").key_id == kid
    with pytest.raises(GatewayError) as e:
        ring.authenticate(f"Bearer {victim}")
    assert e.value.code == "revoked_api_key"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys + ".lock").st_mode) == 0o600


def test_keys_create_keeps_the_files_mode_and_its_errors_name_the_keys_file(tmp_path):
    """The file was made 0600 on every write (a group-readable file the gateway's group reads turned unreadable),
    and a failure to write it said `[Errno 2] No such file or directory: '<file>.tmp'`."""
    cfg_path, keys = _setup(tmp_path, "")
    os.chmod(keys, 0o640)
    assert runner.invoke(cli, ["keys", "create", "--customer", "acme", "--config", cfg_path]).exit_code == 0
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o640
    assert runner.invoke(cli, ["keys", "revoke", yaml.safe_load(Path(keys).read_text())[0]["id"],
                               "--config", cfg_path]).exit_code == 0
    assert stat.S_IMODE(os.stat(keys).st_mode) == 0o640
    nowhere = tmp_path / "missing" / "k.yaml"
    res = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--config", cfg_path],
                        env={"TAGWAY_KEYS_FILE": str(nowhere)})
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [f"error: {nowhere}: cannot write the keys file: no directory "
                                       f"{tmp_path / 'missing'}"]


def _said(caplog) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tagway.auth"]


def _touch(path: str, ahead: float) -> None:
    os.utime(path, (time.time() + ahead, time.time() + ahead))


def test_a_keys_file_that_cannot_be_loaded_is_logged_once_per_change(tmp_path, caplog):
    """The watcher retried a broken file every second and logged the same ERROR each time (3,600 lines an hour);
    now once per change of the file, and once more when it loads again."""
    caplog.set_level(logging.INFO, logger="tagway.auth")
    ok = f"- {{id: ok, customer: acme, hash: '{hash_key('tw-ok')}'}}\n"
    cfg_path, keys = _setup(tmp_path, ok)
    ring = KeyRing(load_config(cfg_path))
    with open(keys, "a") as f:
        f.write(f"- {{id: broken, hash: '{hx('9')}'}}\n")  # no customer
    _touch(keys, 5)
    for _ in range(5):  # five ticks of the watcher
        assert ring.reload_if_changed() is False
    problem = (f"{keys}:2: key #2: customer: missing: a key in the keys file names its tenant (customer: <name>); "
               "this key authenticates nobody")
    error = ("ERROR", f"cannot load the keys file {keys} (keeping the previous keys; said again only when the file "
                      f"changes): {problem}")
    assert _said(caplog) == [error]
    assert ring.authenticate("Bearer tw-ok").key_id == "ok"

    with open(keys, "a") as f:  # changed, still broken: said again, once
        f.write(f"- {{id: new, customer: acme, hash: '{hash_key('tw-new')}'}}\n")
    _touch(keys, 10)
    for _ in range(3):
        assert ring.reload_if_changed() is False
    assert _said(caplog) == [error, error]

    with open(keys, "w") as f:  # fixed
        f.write(ok + f"- {{id: new, customer: acme, hash: '{hash_key('tw-new')}'}}\n")
    _touch(keys, 15)
    assert ring.reload_if_changed() is True
    assert ring.reload_if_changed() is False
    assert _said(caplog) == [error, error, ("WARNING", f"the keys file {keys} loads again: 2 active key(s) from it")]
    assert ring.authenticate("Bearer tw-new").key_id == "new"


def test_a_keys_file_that_goes_away_is_said_once(tmp_path, caplog):
    """A keys file moved away or deleted under a running gateway took every key in it out of service with no log
    line at all; now one WARNING naming the file, until it is back (said too)."""
    caplog.set_level(logging.INFO, logger="tagway.auth")
    cfg_path, keys = _setup(tmp_path, f"- {{id: ok, customer: acme, hash: '{hash_key('tw-ok')}'}}\n")
    ring = KeyRing(load_config(cfg_path))
    aside = str(tmp_path / "aside.yaml")
    gone = ("WARNING", f"the keys file {keys} is gone (No such file or directory): its 1 active key(s) no longer "
                       "authenticate until it is back")
    os.rename(keys, aside)
    for _ in range(5):
        ring.reload_if_changed()
    assert _said(caplog) == [gone]
    with pytest.raises(GatewayError) as e:
        ring.authenticate("Bearer tw-ok")
    assert e.value.code == "invalid_api_key"
    assert [k.id for k, _ in ring.keys()] == ["inline"]  # the config's keys are not the file's

    os.rename(aside, keys)
    assert ring.reload_if_changed() is True
    assert ring.authenticate("Bearer tw-ok").key_id == "ok"
    back = ("WARNING", f"the keys file {keys} is back: 1 active key(s) from it")
    assert _said(caplog) == [gone, back]
    os.remove(keys)  # gone again: said again
    for _ in range(3):
        ring.reload_if_changed()
    assert _said(caplog) == [gone, back, gone]


def test_keys_create_with_limits_and_keys_limits_change_them_on_a_running_gateway(tmp_path):
    """A platform team gives each new key its own rate limit and budget from the CLI, and changes them live."""
    cfg_path = tmp_path / "tagway.yaml"
    cfg_path.write_text(yaml.safe_dump({"models": [{"name": "m", "provider": "mock"}],
                                        "tenants": [{"customer": "acme"}]}))
    res = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "acme-ci", "--rpm", "2",
                              "--budget", "25", "--budget-per", "7d", "--config", str(cfg_path)])
    assert res.exit_code == 0, res.output
    key = res.stdout.strip().splitlines()[-1]
    entry = yaml.safe_load((tmp_path / "tagway.keys.yaml").read_text())[0]
    assert entry["limits"] == {"rpm": 2, "budget": {"usd": 25.0, "per": "7d"}}
    listing = runner.invoke(cli, ["keys", "list", "--config", str(cfg_path)]).stdout
    assert "acme-ci\tacme\tactive\tkeys file\trpm=2 budget=$25/7d" in listing

    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(load_config(cfg_path), recorder=recorder)).start()
    try:
        def call() -> httpx.Response:
            return httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})

        assert [call().status_code for _ in range(3)] == [200, 200, 429]  # the key's own 2 a minute
        res = runner.invoke(cli, ["keys", "limits", "acme-ci", "--rpm", "0", "--config", str(cfg_path)])
        assert res.exit_code == 0 and res.stdout == "acme-ci\tbudget=$25/7d\n", res.output
        deadline = time.monotonic() + 5
        while (r := call()).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)  # the running gateway reads the changed file within a second
        assert r.status_code == 200
        assert [call().status_code for _ in range(3)] == [200, 200, 200]

        show = runner.invoke(cli, ["keys", "limits", "acme-ci", "--config", str(cfg_path)])
        assert show.exit_code == 0 and show.stdout == "acme-ci\tbudget=$25/7d\n"
        cleared = runner.invoke(cli, ["keys", "limits", "acme-ci", "--clear", "--config", str(cfg_path)])
        assert cleared.exit_code == 0 and cleared.stdout == "acme-ci\t-\n"
        assert "limits" not in yaml.safe_load((tmp_path / "tagway.keys.yaml").read_text())[0]
    finally:
        server.stop()
        recorder.shutdown()


@pytest.mark.parametrize("argv, says", [
    (["keys", "create", "--customer", "acme", "--rpm", "-1"], "error: --rpm must be a positive number of requests "
     "a minute, or 0 to remove the limit"),
    (["keys", "create", "--customer", "acme", "--budget", "5", "--budget-per", "fortnight"],
     "error: limits: budget.per: invalid window 'fortnight'"),
    (["keys", "limits", "a1", "--budget-soft", "0.5"], "error: --budget-per and --budget-soft change a budget: give "
     "--budget USD too (there is none)"),
    (["keys", "limits", "a1", "--budget", "5", "--budget-soft", "2"], "error: limits: budget.soft: Input should be "
     "less than or equal to 1"),
    (["keys", "limits", "nobody", "--rpm", "5"], "error: no key with id 'nobody' in "),
    (["keys", "limits", "inline", "--rpm", "5"], "error: key 'inline' is written in the config (tenants[0].keys[0]), "
     "not in the keys file: set its `limits:` there"),
])
def test_bad_limit_flags_are_one_line_and_change_nothing(tmp_path, argv, says):
    cfg_path, keys = _setup(tmp_path, "")
    assert runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "a1", "--tpm", "100",
                               "--config", cfg_path]).exit_code == 0
    before = Path(keys).read_text()
    res = runner.invoke(cli, [*argv, "--config", cfg_path])
    assert res.exit_code == 2 and res.stderr.startswith(says) and res.stderr.count("\n") == 1, res.output
    assert Path(keys).read_text() == before
