"""The operator's CLI: `tagway --version`, `config check` warnings (a table of cases), config errors that name the
file and the setting, `tagway keys admin`, and `--help` that is never cut at 80 columns."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import click
import pytest
import yaml
from click.testing import CliRunner

from gateway import cli as gateway_cli
from gateway.auth import KeyRing, hash_key
from gateway.config import GatewayConfig
from tests.fake_clickhouse import WrongPasswordClickHouse
from tests.http_server import free_port

ENV_KEYS = ("TAGWAY_CONFIG", "TAGWAY_ADMIN_KEY", "OPENAI_API_KEY", "TAGWAY_STORAGE__DSN", "TAGWAY_SERVER__PORT")


@pytest.fixture(scope="module")
def app() -> click.Command:
    return gateway_cli.command()  # stats, errors, show, replay: every command, as `tagway` has them


@pytest.fixture()
def run(app, monkeypatch, tmp_path):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str, env: dict | None = None):
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return invoke


def write(tmp_path, **cfg) -> str:
    base = {"storage": {"data_dir": str(tmp_path / "data")},
            "models": [{"name": "gpt", "provider": "openai", "api_key_env": "OPENAI_API_KEY"}],
            "tenants": [{"customer": "acme"}]}
    base.update(cfg)
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump(base))
    return str(path)


FULL_ENV = {"TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789", "OPENAI_API_KEY": "sk-test"}


# case -> (config overrides (or a function of the servers' addresses) or None for "no config file",
#          environment, expected warning fragments)
CASES = {
    "all set": ({}, FULL_ENV, []),
    "no config file": (None, FULL_ENV, ["config: no config file", "models: no models", "tenants: no tenants"]),
    "no admin key": ({}, {"OPENAI_API_KEY": "sk-test"},
                     ["admin_key_env: $TAGWAY_ADMIN_KEY is not set", "`tagway keys admin`",
                      "export TAGWAY_ADMIN_KEY=<key>"]),
    "admin key hash in the config": ({"admin_key_hash": hash_key("x" * 20)}, {"OPENAI_API_KEY": "sk-test"}, []),
    "provider key unset": ({}, {"TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789"},
                           ["models[0] (gpt).api_key_env: $OPENAI_API_KEY is not set: openai will refuse calls to gpt",
                            "export OPENAI_API_KEY="]),
    "several models, two unset": ({"models": [
        {"name": "a", "provider": "openai", "api_key_env": "OPENAI_API_KEY"},
        {"name": "b", "provider": "anthropic", "model": "claude", "api_key_env": "TAGWAY_TEST_UNSET_KEY"},
        {"name": "c", "provider": "mock"}]}, {"TAGWAY_ADMIN_KEY": "k" * 20},
        ["models[0] (a).api_key_env: $OPENAI_API_KEY", "models[1] (b).api_key_env: $TAGWAY_TEST_UNSET_KEY"]),
    # drop_params is litellm's: a provider passed the request as it is never drops anything
    "drop_params where nothing is translated": ({"models": [
        {"name": "gpt", "provider": "openai", "api_key_env": "OPENAI_API_KEY", "drop_params": True},
        {"name": "claude", "provider": "anthropic", "api_key_env": "OPENAI_API_KEY", "drop_params": True}]}, FULL_ENV,
        ["models[0] (gpt).drop_params: has no effect: openai is passed the request as it is sent"]),
    "closed port": (lambda f: {"storage": {"dsn": f"http://default:s3cret-pw@127.0.0.1:{f['closed']}/tagway"}},
                    FULL_ENV, ["storage.dsn: ", "127.0.0.1:{closed}", "spool every call"]),
    "wrong password": (lambda f: {"storage": {"dsn": f["wrong_password"]}}, FULL_ENV,
                       ["storage.dsn: ", "Authentication failed"]),
    # a server DSN's deployment writes only the spool locally: `serve` refused it, `config check` said ok
    "spool that cannot be created": (lambda f: {"storage": {"dsn": f"http://default:s3cret-pw@127.0.0.1:{f['closed']}/t",
                                                            "spool_dir": f"{f['file']}/spool"}}, FULL_ENV,
                                     ["storage.spool_dir: {file} is not a directory, so the spool cannot be created "
                                      "under it; `tagway serve` refuses to start without a spool"]),
}


@pytest.mark.parametrize("case", CASES)
def test_config_check_warnings(run, tmp_path, case):
    overrides, env, expected = CASES[case]
    with WrongPasswordClickHouse() as ch:
        (tmp_path / "a-file").write_text("")
        fill = {"closed": str(free_port()), "wrong_password": ch.dsn("s3cret-pw"), "file": str(tmp_path / "a-file")}
        args = ["config", "check"]
        if overrides is not None:
            args += ["--config", write(tmp_path, **(overrides(fill) if callable(overrides) else overrides))]
        res = run(*args, env=env)
    assert res.exit_code == 0, res.output
    warnings = [x for x in res.stderr.splitlines() if x.startswith("warning: ")]
    if not expected:
        assert warnings == [] and res.stdout.startswith("ok: "), res.output
        return
    text = "\n".join(warnings)
    for fragment in expected:
        assert fragment.format(**fill) in text, (fragment, text)
    assert re.match(r"\d+ warning\(s\): ", res.stdout)
    assert "s3cret-pw" not in res.output  # the DSN's password is never printed


def test_config_check_strict_exits_1_on_warnings(run, tmp_path):
    path = write(tmp_path)
    assert run("config", "check", "--strict", "--config", path, env=FULL_ENV).exit_code == 0
    assert run("config", "check", "--strict", "--config", path, env={}).exit_code == 1


def test_config_errors_name_the_file_and_the_setting(run, tmp_path):
    path = write(tmp_path, models=[{"name": "gpt", "timeout": -1}], server={"port": "not-a-port"})
    res = run("config", "check", "--config", path)
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert f"tagway: config error: {path}: models[0].timeout: Input should be greater than 0" in lines
    assert any(x.startswith(f"tagway: config error: {path}: server.port: ") for x in lines)
    assert "Traceback" not in res.output


def test_config_check_refuses_a_provider_nobody_serves_and_a_base_url_that_is_no_url(run, tmp_path):
    """A mistyped provider or base_url used to pass every check; each call then failed (litellm's 400 "LLM Provider
    NOT provided", a 502 InvalidUrl). Both are config errors now, with the setting named; litellm's own provider
    names still pass."""
    path = write(tmp_path, models=[{"name": "m", "provider": "nosuchprovider"},
                                   {"name": "b", "provider": "bedrock", "model": "anthropic.claude-v2"},
                                   {"name": "v", "provider": "openai", "base_url": "not a url"}])
    res = run("config", "check", "--config", path, env=FULL_ENV)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert f"tagway: config error: {path}: models[2] (v).base_url: 'not a url' is not an http(s) URL, e.g. " \
           "http://10.0.0.5:8000/v1" in lines, lines
    path = write(tmp_path, models=[{"name": "m", "provider": "nosuchprovider"},
                                   {"name": "b", "provider": "bedrock", "model": "anthropic.claude-v2"}])
    res = run("config", "check", "--config", path, env=FULL_ENV)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"tagway: config error: {path}: models[0] (m).provider: unknown provider 'nosuchprovider'; use openai"), lines
    assert "Traceback" not in res.output


def test_config_errors_from_the_environment_name_the_variable(run, tmp_path):
    res = run("config", "check", "--config", write(tmp_path), env={"TAGWAY_SERVER__PORT": "abc"})
    assert res.exit_code == 2
    assert res.stderr.startswith("tagway: config error: $TAGWAY_SERVER__PORT: server.port: "), res.stderr
    # the file has a server section too: the variable's value is the one read, so the variable is named
    res = run("config", "check", "--config", write(tmp_path, server={"port": 4000, "host": "127.0.0.1"}),
              env={"TAGWAY_SERVER__PORT": "abc"})
    assert res.exit_code == 2
    assert res.stderr.startswith("tagway: config error: $TAGWAY_SERVER__PORT: server.port: "), res.stderr


@pytest.mark.parametrize("server, says", [({"port": 70000}, "server.port: Input should be less than or equal to 65535"),
                                          ({"port": -5}, "server.port: Input should be greater than or equal to 0"),
                                          ({"max_body_bytes": 0}, "server.max_body_bytes: Input should be greater")])
def test_a_port_or_body_cap_out_of_range_is_a_config_error(run, tmp_path, server, says):
    """A port past 65535 reached the socket and ended `tagway serve` with an OverflowError traceback."""
    path = write(tmp_path, server=server)
    for argv in (("config", "check", "--config", path), ("serve", "--config", path)):
        res = run(*argv)
        assert res.exit_code == 2, res.output
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"tagway: config error: {path}: {says}"), lines
        assert "Traceback" not in res.output
    res = run("serve", "--config", write(tmp_path), "--port", "65536")
    assert res.exit_code == 2 and "Invalid value for '--port'" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("mock, says", [({"stream_chunk_words": 0}, "mock.stream_chunk_words: Input should be greater"),
                                        ({"error_status": 200}, "mock.error_status: Input should be greater"),
                                        ({"latency_ms": -1}, "mock.latency_ms: Input should be greater")])
def test_mock_settings_out_of_range_are_config_errors(run, tmp_path, mock, says):
    path = write(tmp_path, models=[{"name": "m", "provider": "mock", "mock": mock}])
    res = run("config", "check", "--config", path)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tagway: config error: {path}: models[0].{says}"), lines


def test_a_variable_of_no_settings_section_is_an_error_not_ignored(run, tmp_path):
    """TAGWAY_ACCESSLOG__ENABLED=false (for access_log) was read by nobody: the access log stayed on, config check
    said nothing. A `__` variable names a section, so one naming none is refused, with the nearest section."""
    res = run("config", "check", "--config", write(tmp_path),
              env={"TAGWAY_ACCESSLOG__ENABLED": "false", "TAGWAY_ZZZ__X": "1"})
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.splitlines() == [
        "tagway: config error: $TAGWAY_ACCESSLOG__ENABLED: accesslog: unknown settings section (did you mean "
        "$TAGWAY_ACCESS_LOG__...?)",
        "tagway: config error: $TAGWAY_ZZZ__X: zzz: unknown settings section"]
    assert run("config", "check", "--config", write(tmp_path),
               env={"TAGWAY_ACCESS_LOG__ENABLED": "false"}).exit_code == 0
    # a variable the config names for a secret is not a section, whatever its name
    named = write(tmp_path, models=[{"name": "gpt", "provider": "openai", "api_key_env": "TAGWAY_OPENAI__KEY"}])
    assert run("config", "check", "--config", named, env={"TAGWAY_OPENAI__KEY": "sk-x"}).exit_code == 0


def test_version(run):
    from importlib.metadata import version  # noqa: PLC0415

    res = run("--version")
    assert res.exit_code == 0 and res.stdout == f"tagway {version('tagway')}\n"


def test_keys_admin_prints_a_key_the_gateway_accepts(run, tmp_path):
    res = run("keys", "admin")
    assert res.exit_code == 0
    key = res.stdout.strip()
    assert key.startswith("tw-") and "export TAGWAY_ADMIN_KEY=" in res.stderr
    digest = re.search(r"admin_key_hash: (sha256:[0-9a-f]{64})", res.stderr).group(1)
    assert digest == hash_key(key)
    assert KeyRing(GatewayConfig(admin_key_hash=digest)).authenticate(f"Bearer {key}", None).is_admin


def _commands(group: click.Command, path: tuple[str, ...] = ()):
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_help_is_never_cut_at_80_columns(run, app):
    checked = 0
    for path, cmd in _commands(app):
        res = run(*path, "--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert res.exit_code == 0, (path, res.output)
        out = res.stdout
        assert "…" not in out, (path, out)  # rich's cut
        flat = " ".join(out.split())
        for name, sub in getattr(cmd, "commands", {}).items():  # click cuts summaries with "..." unless told not to
            summary = " ".join((sub.short_help or sub.help or "").split("\n\n")[0].split())
            assert summary in flat, (path, name)
        assert max(len(line) for line in out.splitlines()) <= 80, path
        words = set(re.findall(r"[\w$<>.,;:()'`=/-]+", out))
        for param in cmd.params:
            for word in (getattr(param, "help", None) or "").split():
                assert word in words or word.strip(".,;:()") in out, (path, param.name, word)
        checked += 1
    assert checked >= 15  # serve, demo, stats, errors, show, keys *, db migrate, config check, replay *


def test_a_config_no_gateway_could_serve_is_refused_in_one_line(run, tmp_path):
    """An unsupported DSN scheme in the config started a gateway that spooled for ever ("degraded until it answers");
    an empty host bound every interface; both are config errors now. `CHDB://` too: every other reader of the DSN
    (replay, datasets) takes schemes in lower case."""
    for storage, server, said in (
            ({"dsn": "ftp://u:s3cret-pw@x/db"}, {}, "storage.dsn: unsupported DSN: use chdb:///path/to/dir (embedded), "
             "http://user:password@host:8123/database or https://... (a ClickHouse server)"),
            ({"dsn": "CHDB:///x"}, {}, "storage.dsn: unsupported DSN: use chdb:///path/to/dir (embedded), "
             "http://user:password@host:8123/database or https://... (a ClickHouse server)"),
            ({}, {"host": " "}, "server.host: empty: give an address (127.0.0.1 for this machine only, 0.0.0.0 for "
                                "every interface)")):
        path = write(tmp_path, storage={"data_dir": str(tmp_path / "data"), **storage}, server=server)
        for argv in (("config", "check"), ("serve",)):
            res = run(*argv, "--config", path, env=FULL_ENV)
            assert res.exit_code == 2 and res.stderr.splitlines() == [f"tagway: config error: {path}: {said}"], \
                res.output
            assert "s3cret-pw" not in res.output


def test_serve_refuses_an_unknown_log_level_before_it_serves(run, tmp_path):
    res = run("serve", "--log-level", "loud", "--config", write(tmp_path), env=FULL_ENV)
    assert res.exit_code == 2 and "serving" not in res.output and "Traceback" not in res.output
    assert res.stderr.splitlines() == ["error: --log-level 'loud' is not a level: use one of critical, error, "
                                       "warning, info, debug, trace"]


def test_a_stray_workers_variable_does_not_divide_a_single_gateways_limits(tmp_path, monkeypatch):
    """$TAGWAY_WORKERS told `serve --workers N`'s workers their share of each rate limit; a single gateway read it
    too (5 divided every limit by 5, 'abc' was a traceback). Only the workers' factory reads it now."""
    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.config import load_config  # noqa: PLC0415

    monkeypatch.setenv("TAGWAY_WORKERS", "5")
    cfg = load_config(write(tmp_path, recording={"enabled": False}))
    assert TagwayApp(cfg).limits.limiter.share == 1 and TagwayApp(cfg, workers=4).limits.limiter.share == 0.25


def test_a_dsn_scheme_is_checked_and_https_means_tls(run):
    """An unknown scheme is the user's input, said in one line with exit 2 (it used to be read as http:// to a host
    named by the rest, with a stray driver warning and a long connection error). https:// asks for TLS on any port
    (the driver alone takes TLS from ports 443/8443 only): against a plain-HTTP server it fails in the TLS handshake,
    where http:// reaches the server and hears its answer."""
    from exporters.store import DsnError, StoreError, connect  # noqa: PLC0415

    res = run("stats", "--dsn", "bogus://x")
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == ["error: bogus://x: unsupported DSN; use chdb:///path/to/dir (embedded), "
                                       "http://user:password@host:8123/database or https://... (a ClickHouse server)"]
    with pytest.raises(DsnError):
        connect("tcp://127.0.0.1:9000/db")
    with WrongPasswordClickHouse() as ch:
        with pytest.raises(StoreError, match="Authentication failed"):
            connect(ch.dsn("pw"))
        with pytest.raises(StoreError) as tls:
            connect(ch.dsn("pw").replace("http://", "https://"), connect_timeout=3)
        assert "Authentication failed" not in str(tls.value) and "SSL" in str(tls.value), tls.value


def test_a_store_that_is_down_is_one_line_without_the_drivers_warning(tmp_path):
    """clickhouse-connect logs "Unexpected Http Driver Exception" before raising: the command says what failed in
    its own line, and that line is the only one."""
    from exporters.rows import EncodedBatch  # noqa: PLC0415
    from exporters.spool import Spool  # noqa: PLC0415

    spool = Spool(str(tmp_path / "tagway-data" / "spool" / "worker-0"), fsync=False)  # what a gateway left waiting
    spool.write(EncodedBatch.of("otel_traces", b'{"TraceId":"t"}\n' * 4, 4))
    spool.close()
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "db", "status", "--dsn",
                          f"http://default:pw@127.0.0.1:{free_port()}/tagway"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    # what waits in the spool is said even so: ClickHouse down is when it matters
    assert out.stdout.splitlines() == [f"spool: {tmp_path}/tagway-data/spool: 4 span(s) not stored yet (stored when "
                                       "a gateway runs on this store)"]
    (line,) = out.stderr.splitlines()
    # the socket's reason, not urllib3's retry text with a query id in a URL (an embedded store's disk errors are
    # said as they are: tests/test_cli_ops.py::test_an_embedded_store_on_a_bad_path_is_not_unreachable)
    assert re.fullmatch(r"error: cannot reach ClickHouse at http://default:\*\*\*@127\.0\.0\.1:\d+/tagway "
                        r"\(connection refused\)", line), line


def test_an_embedded_store_on_a_bad_path_is_not_unreachable(tmp_path):
    """The embedded store's errors are its disk's: never worded as a server that cannot be reached."""
    from exporters.store import StoreError, connect
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreError) as e:
        connect(f"chdb://{blocker}/store")
    assert str(e.value).startswith(f"cannot open ClickHouse at chdb://{blocker}/store: ") and "reach" not in str(e.value)
