"""Limits on one model under a key's or tenant's own (`limits.models`): rate limits and budgets by the model the
client asked for, through the real `tagway serve` (embedded chDB), a real upstream on 127.0.0.1 and the openai SDK."""
from __future__ import annotations

import time
from types import SimpleNamespace

import openai
import pytest
import yaml
from pydantic import ValidationError

from gateway.auth import hash_key
from gateway.config import GatewayConfig, LimitsConfig
from gateway.limits import CallLimits, model_scope, scope_text, split_scope
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

ADMIN = "tw-model-admin-0123456789abcdefghijklmnop"
KEY = "tw-model-acme-0123456789abcdefghijklmnopq"
PRICE = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.001}  # "hi" -> 11 + 2 tokens: $0.013 a call
CALL_USD = 0.013


def test_a_call_falls_under_its_models_limits_beside_the_key_and_tenant_limits():
    key = LimitsConfig.model_validate({"rpm": 100, "models": {"big": {"rpm": 2}}})
    tenant = SimpleNamespace(customer="acme", limits=LimitsConfig.model_validate(
        {"models": {"big": {"budget": {"usd": 5}}, "meta-llama/llama-3": {"tpm": 10}}}))
    whos = [who for who, _ in CallLimits.scopes("acme-ci", key, tenant, "big")]
    assert whos == [("key", "acme-ci"), model_scope("key", "acme-ci", "big"), ("tenant", "acme"),
                    model_scope("tenant", "acme", "big")]
    assert [who for who, _ in CallLimits.scopes("acme-ci", key, tenant, "small")] == [("key", "acme-ci"),
                                                                                       ("tenant", "acme")]
    assert {who for who, _ in CallLimits.all_scopes("", None, tenant)} == {
        ("tenant", "acme"), model_scope("tenant", "acme", "big"), model_scope("tenant", "acme", "meta-llama/llama-3")}
    assert scope_text(model_scope("key", "acme-ci", "big")) == "key 'acme-ci' on model 'big'"
    assert scope_text(("tenant", "acme")) == "tenant 'acme'"
    # ids and model names with "/" stay apart: key "a/b" on model "c" is not key "a" on model "b/c" (a review found
    # a "/" separator read the first as the second, so the key's budget read someone else's spend)
    assert split_scope(model_scope("key", "a/b", "c")) == ("key", "a/b", "c")
    assert split_scope(model_scope("key", "a", "b/c")) == ("key", "a", "b/c")
    assert model_scope("key", "a/b", "c") != model_scope("key", "a", "b/c")

    cl = CallLimits()
    scopes = cl.scopes("acme-ci", key, tenant, "big")
    for _ in range(2):
        assert cl.admit(scopes)[0] is None
        cl.finish(scopes, tokens=1, cost=0.01)  # one call at a time: the first-burst rule of budgets holds too
    refusal, _ = cl.admit(scopes)
    assert refusal.code == "rate_limited" and "key 'acme-ci' on model 'big' is over its limit of 2" in refusal.message
    assert cl.admit(cl.scopes("acme-ci", key, tenant, "small"))[0] is None  # another model: not held


def test_a_models_limits_have_no_models_of_their_own():
    with pytest.raises(ValidationError, match=r"models\.big\.models"):
        GatewayConfig.model_validate({"tenants": [{"customer": "acme", "limits": {
            "models": {"big": {"models": {"x": {"rpm": 1}}}}}}]})


@pytest.fixture(scope="module")
def upstream():
    up = Upstream().start()
    yield up
    up.stop()


def test_a_tenants_limits_on_one_model_refuse_it_and_count_only_its_spend(tmp_path, upstream):
    """acme may call `big` 5 times a minute and spend $0.03 on it a month; `small` stays open. The budget's spend is
    read back from the record after a restart, counting the calls to `big` only."""
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY", **PRICE}
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY",
           "models": [{"name": "big", "model": "ok-big", **up}, {"name": "small", "model": "ok-small", **up}],
           "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEY)}],
                        "limits": {"models": {"big": {"rpm": 5, "budget": {"usd": 0.03, "per": "month"}}}}}]}
    gw = GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}).start()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)

    def call(model: str) -> str:
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
            return "ok"
        except openai.RateLimitError as e:
            return f"{e.code}: {e.body['message']}"

    try:
        big = [call("big") for _ in range(6)]
        # $0.026 spent after two calls is under the budget, so a third goes (a budget stops the call after the one
        # that reaches it); then the budget, not the rate limit of 5, refuses
        assert big[:3] == ["ok"] * 3 and all(b.startswith("budget_exceeded: Budget reached: tenant 'acme' on model "
                                                          "'big' spent $0.039 of $0.03 per month") for b in big[3:]), big
        assert [call("small") for _ in range(6)] == ["ok"] * 6
    finally:
        gw.stop()
    gw.start()
    try:
        rows = gw.get("/admin/budgets", ADMIN).json()["data"]
        (b,) = [r for r in rows if r.get("model") == "big"]
        assert (b["scope"], b["id"], b["budget_usd"]) == ("tenant", "acme", 0.03)
        assert b["spent_usd"] == pytest.approx(3 * CALL_USD)  # the six calls to `small` are not its spend
        assert call("big").startswith("budget_exceeded: Budget reached: tenant 'acme' on model 'big' spent $0.039")
        assert call("small") == "ok"
    finally:
        gw.stop()


def test_a_keys_limit_on_one_model_set_from_the_cli_holds_on_a_running_gateway(tmp_path, upstream):
    """`tagway keys create --model small --rpm 1` holds that key on that model; `keys limits --model small --rpm 0`
    lifts it while the gateway runs."""
    from typer.testing import CliRunner  # noqa: PLC0415

    from gateway.cli import app as cli  # noqa: PLC0415

    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "UP_KEY", **PRICE}
    gw = GatewayProcess(tmp_path, {"admin_key_env": "TAGWAY_ADMIN_KEY", "tenants": [{"customer": "acme"}],
                                   "models": [{"name": "big", "model": "ok-big", **up},
                                              {"name": "small", "model": "ok-small", **up}]},
                        env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"})
    runner = CliRunner()
    res = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "acme-ci", "--model", "small", "--rpm",
                              "1", "--config", gw.config_path])
    assert res.exit_code == 0, res.output
    key = res.stdout.strip().splitlines()[-1]
    listing = runner.invoke(cli, ["keys", "list", "--config", gw.config_path]).stdout
    assert "acme-ci\tacme\tactive\tkeys file\tsmall:[rpm=1]" in listing
    gw.start()
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        msg = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="small", messages=msg)
        with pytest.raises(openai.RateLimitError, match="key 'acme-ci' on model 'small' is over its limit of 1"):
            client.chat.completions.create(model="small", messages=msg)
        client.chat.completions.create(model="big", messages=msg)  # another model: not held

        res = runner.invoke(cli, ["keys", "limits", "acme-ci", "--model", "small", "--rpm", "0",
                                  "--config", gw.config_path])
        assert res.exit_code == 0 and res.stdout == "acme-ci\t-\n", res.output
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                client.chat.completions.create(model="small", messages=msg)
                break
            except openai.RateLimitError:
                time.sleep(0.2)  # the gateway reads the changed keys file within a second
        else:
            raise AssertionError("the lifted limit still held after 5 s")
    finally:
        gw.stop()


def test_config_check_names_a_limit_on_a_model_nobody_serves_and_a_model_budget_without_a_price(tmp_path,
                                                                                                 monkeypatch):
    from typer.testing import CliRunner  # noqa: PLC0415

    from gateway.cli import app as cli  # noqa: PLC0415

    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data")},
        "models": [{"name": "big", "provider": "openai", "base_url": "http://127.0.0.1:9/v1"},
                   {"name": "openai/*", "provider": "openai", "base_url": "http://127.0.0.1:9/v1", **PRICE}],
        "tenants": [{"customer": "acme", "limits": {"models": {"bigg": {"rpm": 5}, "big": {"budget": {"usd": 5}},
                                                               "openai/gpt-4o": {"rpm": 3}}}}]}))
    monkeypatch.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    res = CliRunner().invoke(cli, ["config", "check", "--config", str(path)])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: tenants[0] (acme).limits.models.big.budget: big has no price, so calls to it are recorded without "
        "a cost and this budget never counts them; set input_cost_per_token and output_cost_per_token on it",
        "warning: tenants[0] (acme).limits.models.bigg: no model 'bigg' is served (no `models:` entry has that name "
        "or a wildcard that matches it), so this limit never applies; use the name clients ask for, as in `models:`"]


def test_a_key_id_with_a_control_character_is_refused(tmp_path):
    from typer.testing import CliRunner  # noqa: PLC0415

    from gateway.cli import app as cli  # noqa: PLC0415

    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({"tenants": [{"customer": "acme"}]}))
    res = CliRunner().invoke(cli, ["keys", "create", "--customer", "acme", "--id", "team\x1fci", "--config", str(path)])
    assert (res.exit_code, res.stderr) == (2, "error: a key's id must not hold control characters\n")


def test_a_budget_given_another_period_reads_its_spend_at_once():
    """`keys limits ID --budget-per 1d` on a running gateway: the new period's spend is read from the store now, not
    counted from $0 until the next 30 s refresh."""
    from gateway.limits import Budgets  # noqa: PLC0415

    class Wake:
        def __init__(self) -> None:
            self.times = 0

        def set(self) -> None:
            self.times += 1

    b = Budgets(read_spend=lambda *_: (0.0, 0))
    b.wake = Wake()
    b.check(("key", "k"), 5.0, "month", 0.8)
    b.check(("key", "k"), 5.0, "month", 0.8)
    assert b.wake.times == 1
    b.check(("key", "k"), 5.0, "1d", 0.8)
    assert b.wake.times == 2


def test_limits_on_models_written_by_the_cli_are_checked_like_the_configs(tmp_path, monkeypatch):
    """The keys file is where `keys create/limits --model` write: `config check` reads it too, the commands warn
    about a model nobody serves, and `--model` without a limit is refused (it was dropped in silence)."""
    from typer.testing import CliRunner  # noqa: PLC0415

    from gateway.cli import app as cli  # noqa: PLC0415

    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")}, "tenants": [{"customer": "acme"}],
                                    "models": [{"name": "big", "provider": "openai",
                                                "base_url": "http://127.0.0.1:9/v1"}]}))
    runner = CliRunner()
    bare = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--model", "big", "--config", str(path)])
    assert (bare.exit_code, bare.stderr) == (2, "error: --model names the model that --rpm, --tpm or --budget limit: "
                                                "give one of them too\n")
    typo = runner.invoke(cli, ["keys", "create", "--customer", "acme", "--id", "k1", "--model", "bigg", "--rpm", "3",
                               "--config", str(path)])
    unserved = ("no model 'bigg' is served (no `models:` entry has that name or a wildcard that matches it), so this "
                "limit never applies")
    assert typo.exit_code == 0 and f"warning: {unserved}\n" in typo.stderr
    served = runner.invoke(cli, ["keys", "limits", "k1", "--model", "big", "--budget", "5", "--config", str(path)])
    assert served.exit_code == 0 and "warning" not in served.stderr
    monkeypatch.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    check = runner.invoke(cli, ["config", "check", "--config", str(path)])
    warnings = [line for line in check.stderr.splitlines() if line.startswith("warning:")]
    assert f"warning: tagway.keys.yaml: key k1.limits.models.bigg: {unserved}; use the name clients ask for, as in " \
           "`models:`" in warnings
    assert any(w.startswith("warning: tagway.keys.yaml: key k1.limits.models.big.budget: big has no price") for w in
               warnings), warnings
