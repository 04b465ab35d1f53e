"""A setting that holds a list or a section, set from the environment, is read as JSON (pydantic-settings): a value
that is not JSON is a config error naming the variable, for `config check` and `serve` alike, never a traceback."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from gateway import cli as gateway_cli
from tests.test_cli_ops import ENV_KEYS, write


@pytest.mark.parametrize("var, value, setting", [
    ("TAGWAY_MODELS", "oops", "models"),
    ("TAGWAY_SERVER", "notjson", "server"),
    ("TAGWAY_RECORDING__REDACT_PATTERNS", "[", "recording.redact_patterns"),
    ("TAGWAY_TAXONOMY__KEYS", "zz", "taxonomy.keys"),
])
def test_a_variable_that_is_not_json_is_a_config_error_naming_it(tmp_path, monkeypatch, var, value, setting):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TAGWAY_RECORDING__SOURCE", "prod")  # a plain string setting: not JSON, and not to blame
    path = write(tmp_path)
    for argv in (["config", "check", "--config", path], ["serve", "--config", path]):
        res = CliRunner().invoke(gateway_cli.command(), argv, env={var: value})
        assert res.exit_code == 2, res.output
        lines = res.stderr.splitlines()
        assert lines == [f"tagway: config error: ${var}: {setting}: not valid JSON (Expecting value: line 1 column "
                         f"{2 if value == '[' else 1} (char {1 if value == '[' else 0})); a setting that holds a list "
                         "or a section is given as JSON ('[...]' or '{...}')"], lines
        assert "Traceback" not in res.output


def test_valid_json_from_the_environment_still_configures(tmp_path, monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    res = CliRunner().invoke(gateway_cli.command(), ["config", "check", "--config", write(tmp_path)],
                             env={"TAGWAY_RECORDING__REDACT_PATTERNS": '["ACCT-[0-9]+"]',
                                  "TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789", "OPENAI_API_KEY": "sk-test"})
    assert res.exit_code == 0, res.output


def test_a_list_from_the_environment_with_a_bad_item_names_its_variable(tmp_path, monkeypatch):
    """TAGWAY_TENANTS='[1]': the variable that holds the list, not `$TAGWAY_TENANTS__*` (no such variable)."""
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    res = CliRunner().invoke(gateway_cli.command(), ["config", "check", "--config", write(tmp_path)],
                             env={"TAGWAY_TENANTS": "[1]"})
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [
        "tagway: config error: $TAGWAY_TENANTS: tenants[0]: Input should be a valid dictionary or instance of "
        "TenantConfig"]


def test_a_bad_value_from_the_file_is_not_blamed_on_a_section_variable(tmp_path, monkeypatch):
    """TAGWAY_SERVER='{"host": ...}' is merged with the file's `server:`: a bad port from the file is the file's."""
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    path = write(tmp_path, server={"port": 99999})
    res = CliRunner().invoke(gateway_cli.command(), ["config", "check", "--config", path],
                             env={"TAGWAY_SERVER": '{"host": "0.0.0.0"}'})
    assert res.exit_code == 2, res.output
    assert res.stderr.splitlines() == [
        f"tagway: config error: {path}: server.port: Input should be less than or equal to 65535"]


@pytest.mark.parametrize("env, said", [
    # an item of a list cannot be set alone: pydantic-settings read a mapping that replaced the file's whole list,
    # and the error ("models: Input should be a valid list") blamed the file
    ({"TAGWAY_MODELS__0__TIMEOUT": "abc"}, ["$TAGWAY_MODELS__0__TIMEOUT: models: a list's items cannot be set one by "
                                            "one; set $TAGWAY_MODELS to the whole list as JSON ('[...]')"]),
    ({"TAGWAY_SHADOW__0__SAMPLE": "2"}, ["$TAGWAY_SHADOW__0__SAMPLE: shadow: a list's items cannot be set one by one; "
                                         "set $TAGWAY_SHADOW to the whole list as JSON ('[...]')"]),
    # a section's cross-check named $TAGWAY_RECORDING, which is not set: the one variable of the section that is
    ({"TAGWAY_RECORDING__SPOOL_MAX_BYTES": "1000"},
     ["$TAGWAY_RECORDING__SPOOL_MAX_BYTES: recording: spool_max_bytes (1000) is below batch_max_bytes (33554432): a "
      "full batch could never be spooled (0 = no cap)"]),
    ({"TAGWAY_RECORDING__SPOOL_MAX_BYTES": "1000", "TAGWAY_RECORDING__BATCH_MAX_BYTES": "70000"},
     ["$TAGWAY_RECORDING__*: recording: spool_max_bytes (1000) is below batch_max_bytes (70000): a full batch could "
      "never be spooled (0 = no cap)"]),
])
def test_a_variable_is_blamed_for_what_it_set(tmp_path, monkeypatch, env, said):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    path = write(tmp_path, shadow=[])
    res = CliRunner().invoke(gateway_cli.command(), ["config", "check", "--config", path], env=env)
    assert res.exit_code == 2 and res.stderr.splitlines() == [f"tagway: config error: {s}" for s in said], res.output
