"""Rate limits and budgets (gateway/limits.py), on a clock the tests move."""
from __future__ import annotations

import datetime as dt
import time
from types import SimpleNamespace

import pytest

from gateway.config import BudgetConfig, LimitsConfig
from gateway.limits import Budgets, CallLimits, Limiter, period_bounds


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_rpm_bursts_then_refills_one_per_interval():
    clock = Clock()
    lim = Limiter(clock=clock)
    who = [(("key", "k1"), 6, None)]
    assert all(lim.admit(who) is None for _ in range(6))
    r = lim.admit(who)
    assert r is not None and r.code == "rate_limited" and r.retry_after == pytest.approx(10.0)
    clock.t += 10.0
    assert lim.admit(who) is None and lim.admit(who) is not None
    assert lim.refused == 2


def test_a_refusal_takes_nothing_from_the_other_scope():
    clock = Clock()
    lim = Limiter(clock=clock)
    key, tenant = (("key", "k"), 100, None), (("tenant", "t"), 1, None)
    assert lim.admit([key, tenant]) is None
    assert lim.admit([key, tenant]) is not None  # the tenant refuses...
    assert lim.admit([key]) is None  # ...and the key's bucket was not charged for the refused call
    assert lim._rpm[("key", "k")].level == pytest.approx(98)


def test_tpm_charges_after_the_call_and_debt_makes_the_next_wait():
    clock = Clock()
    lim = Limiter(clock=clock)
    who = [(("tenant", "t"), None, 600)]  # 10 tokens a second
    assert lim.admit(who) is None
    lim.charge(who, 900)  # the call used more than the whole minute's budget
    r = lim.admit(who)
    assert r is not None and r.retry_after == pytest.approx(30.1, abs=0.2)  # 300 in debt, +1 token
    clock.t += 31
    assert lim.admit(who) is None


def test_workers_share_each_limit():
    lim = Limiter(share=0.5, clock=Clock())
    who = [(("key", "k"), 10, None)]
    assert sum(lim.admit(who) is None for _ in range(10)) == 5


def test_periods():
    jan31 = dt.datetime(2026, 1, 31, 23, 0, tzinfo=dt.timezone.utc).timestamp()
    start, end = period_bounds("month", jan31)
    assert dt.datetime.fromtimestamp(start, dt.timezone.utc) == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    assert dt.datetime.fromtimestamp(end, dt.timezone.utc) == dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
    start, end = period_bounds("1d", jan31)
    assert (start, end) == (jan31 - 23 * 3600, jan31 + 3600)
    assert period_bounds("1.5h", 5400 * 7 + 1) == (5400 * 7, 5400 * 8)


def test_budget_soft_warning_hard_refusal_until_the_period_ends():
    clock = Clock(dt.datetime(2026, 3, 10, 12, tzinfo=dt.timezone.utc).timestamp())
    b = Budgets(None, clock=clock)
    who = ("tenant", "acme")
    assert b.check(who, 1.0, "1d", 0.8) == (None, "")
    b.add(who, "1d", 0.85)
    refusal, warning = b.check(who, 1.0, "1d", 0.8)
    assert refusal is None and "85%" in warning
    b.add(who, "1d", 0.2)
    refusal, _ = b.check(who, 1.0, "1d", 0.8)
    assert refusal.code == "budget_exceeded" and refusal.retry_after == pytest.approx(12 * 3600)
    assert refusal.error().status == 429 and dict(refusal.error().headers)[b"x-should-retry"] == b"false"
    assert "spent $1.05 of $1.00 per 1d" in refusal.message
    clock.t += 12 * 3600  # the next day: a new period
    assert b.check(who, 1.0, "1d", 0.8) == (None, "")
    tiny = ("tenant", "tiny")  # small budgets read as amounts, not $0.00 of $1e-05
    b.add(tiny, "1d", 0.000012)
    assert "spent $0.000012 of $0.00001 per 1d" in b.check(tiny, 0.00001, "1d", 0.8)[0].message


def test_refresh_takes_the_store_figure_and_keeps_calls_the_store_may_not_have_yet():
    clock = Clock(1_700_000_000.0)
    stored = {"v": 0.5}
    b = Budgets(lambda scope, who, since: stored["v"], clock=clock)
    who = ("key", "k1")
    b.check(who, 10.0, "month", 0.8)  # tracked
    b.add(who, "month", 0.25)  # a call that ended just now
    b.refresh()
    assert b.spent(who, "month") == pytest.approx(0.75)  # the store's 0.5 + the recent call (not stored yet)
    clock.t += 60
    stored["v"] = 0.75
    b.refresh()
    assert b.spent(who, "month") == pytest.approx(0.75)  # older than the store's lag: now only from the store


def test_refresh_failure_keeps_counting():
    def down(*_):
        raise RuntimeError("store down")

    b = Budgets(down, clock=Clock())
    b.check(("tenant", "t"), 1.0, "1h", 0.8)
    b.add(("tenant", "t"), "1h", 0.3)
    b.refresh()
    assert b.spent(("tenant", "t"), "1h") == pytest.approx(0.3)


def test_call_limits_scopes_and_finish():
    lim = LimitsConfig(rpm=2, tpm=None, budget=BudgetConfig(usd=0.001, per="month"))
    tenant = SimpleNamespace(customer="acme", limits=LimitsConfig(tpm=100))
    cl = CallLimits()
    scopes = cl.scopes("k1", lim, tenant)
    assert [who for who, _ in scopes] == [("key", "k1"), ("tenant", "acme")]
    assert cl.admit(scopes) == (None, [])
    cl.finish(scopes, tokens=150, cost=0.002)
    refusal, _ = cl.admit(scopes)
    assert refusal.code == "budget_exceeded" and cl.refused == {"rate_limited": 0, "budget_exceeded": 1,
                                                                "budget_in_flight": 0}
    assert CallLimits.scopes("admin", None, None) == []


def test_calls_in_flight_count_against_the_budget_at_the_recent_cost_a_call():
    """The trial's burst: $0.04 of $0.05 spent, calls of $0.02 each, eight at once. Before, all eight were admitted
    against the spend before them ($0.20 of $0.05); now the calls in flight count at the average cost a call."""
    lim = LimitsConfig(budget=BudgetConfig(usd=0.05, per="1d"))
    cl = CallLimits()
    cl.budgets.clock = Clock(dt.datetime(2026, 3, 10, 12, tzinfo=dt.timezone.utc).timestamp())
    scopes = [(("tenant", "dd"), lim)]
    for _ in range(2):  # two calls before the burst: $0.04, and what a call costs
        assert cl.admit(scopes) == (None, [])
        cl.finish(scopes, tokens=10, cost=0.02)
    burst = [cl.admit(scopes)[0] for _ in range(8)]
    assert [r is None for r in burst] == [True] + [False] * 7  # $0.04 + one call in flight (~$0.02) >= $0.05
    # not spent yet: a short wait the SDKs honour (retry-after 2 s, x-should-retry true), not "until the period ends"
    wait = burst[1]
    assert wait.code == "budget_in_flight" and wait.retry_after == 2.0
    assert wait.message == ("Budget nearly reached: tenant 'dd' spent $0.04 of $0.05 per 1d, and 1 call(s) in flight "
                            "will likely spend ~$0.02; retry once they end.")
    err = wait.error()
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "budget_in_flight")
    assert dict(err.headers)[b"x-should-retry"] == b"true" and dict(err.headers)[b"retry-after"] == b"2"
    assert cl.refused == {"rate_limited": 0, "budget_exceeded": 0, "budget_in_flight": 7}
    cl.finish(scopes, tokens=10, cost=0.02)  # the admitted one ends: $0.06, over by at most that one call
    spent = cl.admit(scopes)[0]
    assert cl.budgets.spent(("tenant", "dd"), "1d") == pytest.approx(0.06) and spent.code == "budget_exceeded"
    # a failed or unpriced call ends without a cost: it leaves the flight and does not lower the average
    fresh = [(("tenant", "ee"), LimitsConfig(budget=BudgetConfig(usd=1.0, per="1d")))]
    assert cl.admit(fresh)[0] is None
    cl.finish(fresh, tokens=0, cost=0.0)
    assert cl.budgets._in_flight == {} and ("tenant", "ee") not in cl.budgets._per_call


def test_a_rate_limited_call_is_not_counted_in_flight():
    lim = LimitsConfig(rpm=2, budget=BudgetConfig(usd=1.0, per="1d"))
    cl = CallLimits()
    scopes = [(("key", "k"), lim)]
    assert cl.admit(scopes)[0] is None
    cl.finish(scopes, tokens=10, cost=0.01)  # one call ended: what a call costs is known (until then, one at a time)
    assert cl.admit(scopes)[0] is None
    refusal, _ = cl.admit(scopes)
    assert refusal.code == "rate_limited" and cl.budgets._in_flight == {("key", "k"): 1}


def test_every_admitted_call_leaves_the_flight_whatever_its_end(upstream):
    """Through the real gateway: answered, streamed, failed upstream, a stream the client drops midway, a
    fallback chain. Afterwards nothing is counted in flight, so a tenant's budget is never held by ghosts."""
    import os  # noqa: PLC0415

    import httpx  # noqa: PLC0415
    import openai  # noqa: PLC0415

    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.auth import hash_key  # noqa: PLC0415
    from gateway.config import GatewayConfig  # noqa: PLC0415
    from tests.gateway_fixture import UPSTREAM_KEY, GatewayServer, MemoryRecorder  # noqa: PLC0415

    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    key = "tw-flight-acme-0123456789abcdefghijklmnop"
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY",
          "input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}
    cfg = GatewayConfig(models=[{"name": "ok", "model": "ok-model", **up},
                                {"name": "broken", "model": "fail500-a", **up},
                                {"name": "slowstream", "model": "slowstream-a", **up},
                                {"name": "chain", "model": "fail503-a", **up, "fallbacks": ["ok"]}],
                        tenants=[{"customer": "acme", "keys": [{"id": "a", "hash": hash_key(key)}],
                                  "limits": {"budget": {"usd": 100, "per": "1d"}}}])
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        msg = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="ok", messages=msg)
        for _ in client.chat.completions.create(model="ok", messages=msg, stream=True):
            pass
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="broken", messages=msg)
        client.chat.completions.create(model="chain", messages=msg)
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "slowstream", "messages": msg, "stream": True}, timeout=10) as r:
            next(r.iter_bytes())  # the first event, then the client goes away
        budgets = server.app.proxy.limits.budgets
        deadline = time.monotonic() + 10
        while budgets._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert budgets._in_flight == {}
        assert budgets.spent(("tenant", "acme"), "1d") > 0  # the answered calls were charged
    finally:
        server.stop()
        recorder.shutdown()
