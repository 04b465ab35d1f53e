"""Multi-tenant limits trial (a platform team's first week): budgets and rate limits through the real `tagway serve`
(embedded chDB), a real OpenAI-compatible upstream on 127.0.0.1 and the openai SDK's async client."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from gateway.auth import hash_key
from tests.gateway_process import ENV, GatewayProcess
from tests.http_server import free_port
from tests.upstream import Upstream

ADMIN = "tw-trial-admin-0123456789abcdefghijklmnop"
KEY = "tw-trial-beta-0123456789abcdefghijklmnopqr"
PRICE = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.001}  # "hi" -> 11 + 2 tokens: $0.013 a call
CALL_USD = 0.013


@pytest.fixture(scope="module")
def upstream():
    up = Upstream().start()
    yield up
    up.stop()


def _burst(url: str, key: str, model: str, n: int, retries: int = 0) -> list:
    """n concurrent chat calls with the SDK's async client: each a response or the exception it raised."""
    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=retries, timeout=30)
        msg = [{"role": "user", "content": "hi"}]
        try:
            return await asyncio.gather(*(client.chat.completions.with_raw_response.create(model=model, messages=msg)
                                          for _ in range(n)), return_exceptions=True)
        finally:
            await client.close()
    return asyncio.run(run())


def test_a_first_burst_stops_at_the_budget(tmp_path, upstream):
    """A tenant's first calls since the gateway started: no call had ended, so the average cost a call that calls in
    flight are counted at was unknown (0), and a burst of 30 concurrent calls was admitted whole against a budget of
    about four calls ($0.39 of $0.05; the trial saw 58 calls, $0.75 of $0.13). Until one call has ended they are now
    admitted one at a time (the others get a 429 budget_in_flight the SDKs retry), and spending stops at the budget
    give or take one call."""
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY",
           "models": [{"name": "slow", "provider": "openai", "model": "slow-priced", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "beta", "keys": [{"id": "beta-1", "hash": hash_key(KEY)}],
                        "limits": {"budget": {"usd": 0.05, "per": "month"}}}]}
    with GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}) as gw:
        first = _burst(gw.url, KEY, "slow", 30)  # the upstream takes 2 s: every call is in flight at once
        answered = [r for r in first if not isinstance(r, Exception)]
        refused = [r for r in first if isinstance(r, openai.RateLimitError)]
        assert len(answered) == 1 and len(refused) == 29, [type(r).__name__ for r in first]
        r = refused[0]
        assert r.code == "budget_in_flight" and r.body["type"] == "rate_limit_error"
        assert r.response.headers["retry-after"] == "2" and r.response.headers["x-should-retry"] == "true"
        assert "not known yet" in r.message
        # the cost of a call is known now: the next burst is admitted up to the budget, give or take one call
        second = _burst(gw.url, KEY, "slow", 30)
        answered += [r for r in second if not isinstance(r, Exception)]
        assert 1 < len(answered) <= round(0.05 / CALL_USD) + 1
        assert all(isinstance(r, openai.RateLimitError) for r in second if isinstance(r, Exception))
        # spent: the SDK does not retry a spent budget (x-should-retry: false), whatever its max_retries
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as spent:
            openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=3).chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "hi"}])
        assert spent.value.code == "budget_exceeded" and time.monotonic() - t0 < 1.5
        rows = gw.get("/admin/budgets", ADMIN).json()["data"]
        assert rows[0]["id"] == "beta" and rows[0]["spent_usd"] <= 0.05 + CALL_USD + 1e-9
        # what the store recorded agrees: the calls answered, each at its price
        deadline = time.monotonic() + 15
        while True:
            stored = gw.query("SELECT count() AS n, sum(cost_usd) AS usd FROM llm_calls WHERE customer = 'beta' "
                              "AND http_status = 200", ADMIN)[0]
            if stored["n"] == len(answered) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stored["n"] == len(answered) and float(stored["usd"]) == pytest.approx(CALL_USD * len(answered))


def test_rpm_below_the_number_of_workers_still_admits_calls(tmp_path, upstream):
    """`rpm: 1` with `tagway serve --workers 2`: each worker's share was a bucket of half a request, which never
    holds one, so every call was refused for ever (429, retry-after 60, repeated). A worker's bucket now holds at
    least one request: the limit is kept over time, not refused outright."""
    key = "tw-trial-small-0123456789abcdefghijklmnopq"
    port = free_port()
    cfg = {"server": {"host": "127.0.0.1", "port": port}, "recording": {"enabled": False},
           "storage": {"data_dir": str(tmp_path / "data")},
           "models": [{"name": "ok", "provider": "openai", "model": "ok-a", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "small", "keys": [{"id": "small-1", "hash": hash_key(key)}],
                        "limits": {"rpm": 1}}]}
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with open(tmp_path / "stderr.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), "--workers", "2"],
                                stdout=subprocess.DEVNULL, stderr=err, env={**ENV, "UP_KEY": "sk-up"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.1)
        time.sleep(1)  # both workers up
        results = _burst(url, key, "ok", 10)
        answered = [r for r in results if not isinstance(r, Exception)]
        assert 1 <= len(answered) <= 2, [type(r).__name__ for r in results]  # one per worker at most
        assert all(isinstance(r, openai.RateLimitError) and r.code == "rate_limited"
                   for r in results if isinstance(r, Exception))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_config_check_warns_about_a_budget_over_unpriced_models(tmp_path, upstream):
    """A tenant's budget whose models have no price (none in the config, none in litellm's map) never counts their
    calls; `tagway config check` said "ok" (only `tagway serve`'s start-up log named the model, not the budget)."""
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY", "storage": {"data_dir": str(tmp_path / "data")},
           "models": [{"name": "my-llama", "provider": "openai", "model": "ok-llama-local", "api_key_env": "UP_KEY",
                       "base_url": upstream.base_url},
                      {"name": "priced", "provider": "openai", "model": "ok-a", "api_key_env": "UP_KEY",
                       "base_url": upstream.base_url, **PRICE}],
           "tenants": [{"customer": "acme", "limits": {"budget": {"usd": 5}}},
                       {"customer": "beta", "allowed_models": ["priced"], "limits": {"budget": {"usd": 5}}},
                       {"customer": "gamma"}]}
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**ENV, "TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(path), "--strict"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: tenants[0] (acme).limits.budget: my-llama has no price, so calls to it are recorded "
                        "without a cost and this budget does not count them; set input_cost_per_token and "
                        "output_cost_per_token on it, or leave it out of the tenant's allowed_models"]
    cfg["models"][0].update(PRICE)  # priced: nothing to say
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(path), "--strict"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok:"), run.stdout + run.stderr


def test_a_budget_check_costs_the_same_however_busy_the_tenant(upstream):
    """Each call's budget check summed every cost added in-process since the last store read (a list kept 15-45 s):
    a tenant at 1,000 calls/s made each of its calls sum ~30,000 floats on the event loop (~0.6 ms a check, twice
    with a key budget too; the gateway's whole call is ~0.2-0.3 ms). The sum is now kept as costs are added."""
    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.config import GatewayConfig  # noqa: PLC0415
    from tests.gateway_fixture import GatewayServer, MemoryRecorder  # noqa: PLC0415

    os.environ["TRIAL_UP_KEY"] = "sk-up"
    cfg = GatewayConfig(models=[{"name": "ok", "provider": "openai", "model": "ok-a", "base_url": upstream.base_url,
                                 "api_key_env": "TRIAL_UP_KEY", **PRICE}],
                        tenants=[{"customer": "busy", "keys": [{"id": "busy-1", "hash": hash_key(KEY)}],
                                  "limits": {"budget": {"usd": 1e9, "per": "month"}}}])
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    try:
        answered = _burst(server.url, KEY, "ok", 1) + _burst(server.url, KEY, "ok", 49)  # the first: one at a time
        assert all(not isinstance(r, Exception) for r in answered)
        limits = server.app.proxy.limits
        who = ("tenant", "busy")
        assert limits.budgets.spent(who, "month") == pytest.approx(50 * CALL_USD)
        for _ in range(60_000):  # 30 s of a tenant at 2,000 calls/s, as the calls' ends add them
            limits.budgets.add(who, "month", CALL_USD)
        scopes = limits.scopes("busy-1", None, cfg.tenants[0])
        for _ in range(1000):  # measured by hand: 1.2 s before (a sum of 60,000 costs a check), ~0.25 s now
            refusal, _ = limits.admit(scopes)
            assert refusal is None
            limits.finish(scopes, 13, CALL_USD)
        assert limits.budgets.spent(who, "month") == pytest.approx(61_050 * CALL_USD)
        # a store read keeps what it may not have yet, and their sum
        limits.budgets._read = lambda scope, ident, since: 1.0
        limits.budgets.refresh()
        assert limits.budgets.spent(who, "month") == pytest.approx(1.0 + 61_050 * CALL_USD)
    finally:
        server.stop()
        recorder.shutdown()


def test_after_a_restart_a_budget_knows_what_a_call_costs_from_the_record(tmp_path, upstream):
    """The first-burst rule admits calls one at a time until one has ended, because what a call costs is unknown:
    after every restart each budgeted tenant's first wave waited (429 budget_in_flight), although the record says
    what its calls cost. The store read at start now seeds the average cost a call from the recorded spend."""
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY",
           "models": [{"name": "ok", "provider": "openai", "model": "ok-priced", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "beta", "keys": [{"id": "beta-1", "hash": hash_key(KEY)}],
                        "limits": {"budget": {"usd": 10, "per": "month"}}}]}
    gw = GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}).start()
    try:
        assert all(not isinstance(r, Exception) for r in _burst(gw.url, KEY, "ok", 1))
    finally:
        gw.stop()  # the call is flushed to the store at shutdown
    gw.start()
    try:
        burst = _burst(gw.url, KEY, "ok", 8)
        assert all(not isinstance(r, Exception) for r in burst), [type(r).__name__ for r in burst]
    finally:
        gw.stop()


def test_a_platform_keys_own_tenant_limits_hold_over_the_customers_it_names(tmp_path, upstream):
    """The limits applied were those of the tenant a call is recorded as: a platform tenant with rpm 5 answered 5 of
    12 calls without a customer header, and all 12 with `x-tagway-customer: shop-123` (limits trial). Its own
    tenant's limits now hold too, and its budget counts the calls its keys made for others."""
    key = "tw-trial-platform-0123456789abcdefghijklmn"
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY",
           "models": [{"name": "ok", "provider": "openai", "model": "ok-priced", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "platform", "may_set_customer": True,
                        "limits": {"rpm": 5, "budget": {"usd": 100, "per": "month"}},
                        "keys": [{"id": "platform-1", "hash": hash_key(key)}]}]}
    gw = GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}).start()
    try:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                          default_headers={"x-tagway-customer": "shop-123"})
        outcomes = []
        for _ in range(8):
            try:
                c.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
                outcomes.append("ok")
            except openai.RateLimitError as e:
                outcomes.append(e.code)
        assert outcomes == ["ok"] * 5 + ["rate_limited"] * 3, outcomes
    finally:
        gw.stop()
    gw.start()  # the budget's spend read back from the record: the calls its key made for shop-123
    try:
        (b,) = [b for b in gw.get("/admin/budgets", ADMIN).json()["data"] if b["id"] == "platform"]
        assert b["spent_usd"] == pytest.approx(5 * CALL_USD)
    finally:
        gw.stop()


def test_replay_calls_spend_no_tenants_limits(tmp_path, upstream):
    """A replay run's calls (a platform key, `x-tagway-source: replay`, the case's customer) were admitted against
    that customer's rpm and budget in-process, though the budget's store read leaves them out: a replay could 429
    the tenant's production calls (review). Only the key's own limits hold for the gateway's own calls."""
    platform = "tw-trial-replayer-0123456789abcdefghijklmn"
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY",
           "models": [{"name": "ok", "provider": "openai", "model": "ok-priced", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "beta", "keys": [{"id": "beta-1", "hash": hash_key(KEY)}], "limits": {"rpm": 2}},
                       {"customer": "ops", "may_set_customer": True, "limits": {"rpm": 2},
                        "keys": [{"id": "ops-1", "hash": hash_key(platform)}]}]}
    with GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}) as gw:
        replayer = openai.OpenAI(base_url=gw.url + "/v1", api_key=platform, max_retries=0, default_headers={
            "x-tagway-source": "replay", "x-tagway-customer": "beta"})
        for _ in range(4):
            replayer.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
        tenant = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        for _ in range(2):  # beta's own rpm is untouched by the replay
            tenant.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.RateLimitError):
            tenant.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])


def test_a_budget_given_to_a_key_while_the_gateway_runs_counts_what_it_spent(tmp_path, upstream):
    """A budget added to a key in the keys file started from $0 until the next store read, up to 30 s later (the
    trial spent $0.104 more of a $0.10 budget the key had long passed); with no budget at the start, spend was never
    read from the store at all. A budget first seen since the start now has its spend read at once."""
    keys = tmp_path / "keys.yaml"

    def write_keys(limits: dict | None) -> None:
        entry = {"id": "beta-1", "customer": "beta", "hash": hash_key(KEY), **({"limits": limits} if limits else {})}
        keys.write_text(yaml.safe_dump([entry]))
        os.utime(keys, (time.time() + 2, time.time() + 2))  # a change the watcher cannot miss

    write_keys(None)
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY", "keys_file": str(keys),
           "models": [{"name": "ok", "provider": "openai", "model": "ok-priced", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", **PRICE}],
           "tenants": [{"customer": "beta"}]}
    with GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}) as gw:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
        raws = [c.chat.completions.with_raw_response.create(model="ok", messages=[{"role": "user", "content": "hi"}])
                for _ in range(4)]
        gw.call_row(raws[-1].headers["x-tagway-trace-id"], ADMIN)  # ~$0.052 is in the store
        write_keys({"budget": {"usd": 0.02, "per": "month"}})
        refused, deadline = None, time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                c.chat.completions.create(model="ok", messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as e:
                refused = e
            time.sleep(0.5)
        assert refused is not None and refused.code == "budget_exceeded"
        (b,) = [b for b in gw.get("/admin/budgets", ADMIN).json()["data"] if b["id"] == "beta-1"]
        assert b["spent_usd"] >= 4 * CALL_USD
