"""Shadow traffic's rules (issue 16): the config refuses a shadow to an unknown model and a sample outside [0, 1]
with one line naming the setting (`tagway config check`); the dispatcher samples, matches `where`, honours a
tenant's opt-out, never waits, and drops (counted) past its queue while its candidate hangs. The end to end test is
tests/test_shadow_e2e.py."""
from __future__ import annotations

import asyncio
import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.config import ShadowConfig, TenantConfig
from gateway.shadow import ShadowDispatcher, matches
from gateway.telemetry import CallRecord
from tests.test_cli_ops import app, run, write  # noqa: F401 - the CLI fixtures


@pytest.mark.parametrize("shadow, message", [
    ([{"model": "nope", "sample": 0.1}], "shadow[0].model: unknown model 'nope' (shadow to a configured model)"),
    ([{"model": "gpt", "sample": 1.5}], "shadow[0].sample: Input should be less than or equal to 1"),
    ([{"model": "gpt", "sample": -0.1}], "shadow[0].sample: Input should be greater than or equal to 0"),
    ([{"model": "gpt", "sample": 0.5, "where": {"colour": "red"}}],
     "shadow[0].where: unknown key 'colour': use customer, intent, prompt_version, model or tag.<key>"),
    ([{"model": "gpt", "sample": 0.5}, {"model": "gpt", "sample": 0.1}],
     "shadow: two rules mirror to 'gpt' (give one rule per candidate)"),
])
def test_config_check_refuses_bad_shadow_rules(run, tmp_path, shadow, message):  # noqa: F811
    path = write(tmp_path, shadow=shadow)
    res = run("config", "check", "--config", path)
    assert res.exit_code == 2
    assert f"tagway: config error: {path}: {message}" in res.stderr.splitlines(), res.stderr
    assert "Traceback" not in res.output


def test_config_check_accepts_a_shadow_rule(run, tmp_path):  # noqa: F811
    path = write(tmp_path, shadow=[{"model": "gpt", "sample": 0.05, "where": {"customer": "acme", "tag.tier": "gold"},
                                    "max_rps": 5, "evaluators": [{"type": "contains", "value": "ok"}]}],
                 tenants=[{"customer": "acme", "shadow": False}])
    res = run("config", "check", "--config", path)
    assert "config error" not in res.stderr


def _call(customer="acme", model="gpt", tags=None, operation="chat", tenant=None, error="", source="production"):
    rec = CallRecord(customer=customer, requested_model=model, tags=tags or {}, intent="refund", source=source)
    rec.error_type = error
    return types.SimpleNamespace(rec=rec, tenant=tenant, operation=operation, upstream_path="/chat/completions",
                                 payload={"model": model, "messages": []}, trace_id=b"ab" * 16, principal=None,
                                 capture=True, forward_headers=[])


def test_where_matches_columns_and_tags():
    rule = ShadowConfig(model="cand", sample=1, where={"customer": "acme", "tag.tier": "gold", "model": "gpt"})
    assert matches(rule, _call(tags={"tier": "gold"}).rec)
    assert not matches(rule, _call(tags={"tier": "free"}).rec)
    assert not matches(rule, _call(customer="globex", tags={"tier": "gold"}).rec)
    assert not matches(rule, _call(model="other", tags={"tier": "gold"}).rec)


def _count(d: ShadowDispatcher, outcome: str, model: str = "cand") -> float:
    class Collector:
        def collect(self):
            return d.collect("tagway_")

    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector())
    for line in generate_latest(reg).decode().splitlines():
        if line.startswith("tagway_shadow_calls_total{") and f'outcome="{outcome}"' in line and model in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_offer_never_waits_and_drops_past_the_queue_while_the_candidate_hangs():
    async def go():
        release = asyncio.Event()
        sent = []

        async def hang(job):  # a candidate that answers only when released
            sent.append(job.trace_id)
            await release.wait()
            return True

        d = ShadowDispatcher([ShadowConfig(model="cand", sample=1, max_rps=1000, queue=3, max_in_flight=2)], hang)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(20):
            d.offer(_call())
        offered = loop.time() - t0
        await asyncio.sleep(0.05)
        assert offered < 0.05  # offer is a queue put, never a wait
        assert len(sent) == 2  # in flight: max_in_flight
        # 20 sampled in one go: 3 fit the queue, 17 dropped; of the 3, 2 are in flight and 1 waits for a slot
        assert (_count(d, "sampled"), _count(d, "dropped")) == (20, 17)
        release.set()
        await asyncio.sleep(0.05)
        assert len(sent) == 3 and _count(d, "sent") == 3
        await d.aclose()
    asyncio.run(go())


def test_sampling_opt_out_and_what_is_not_shadowed():
    async def go():
        got = []

        async def send(job):
            got.append(job)
            return True

        d = ShadowDispatcher([ShadowConfig(model="cand", sample=0.25, max_rps=1e6, queue=10_000)], send, seed=7)
        for _ in range(4000):
            d.offer(_call())
        d.offer(_call(tenant=TenantConfig(customer="acme", shadow=False)))  # opted out
        d.offer(_call(operation="embeddings"))  # nothing to compare
        d.offer(_call(error="timeout"))  # production failed: no answer to pair with
        d.offer(_call(source="replay"))  # not live traffic
        d.offer(_call(model="cand"))  # already the candidate
        await asyncio.sleep(0.2)
        assert 900 <= len(got) <= 1100 and _count(d, "sampled") == len(got) and _count(d, "dropped") == 0
        assert {j.model for j in got} == {"cand"} and got[0].trace_id == "ab" * 16
        await d.aclose()
    asyncio.run(go())


def test_max_rps_spaces_the_sends():
    async def go():
        times = []

        async def send(job):
            times.append(asyncio.get_running_loop().time())
            return False

        d = ShadowDispatcher([ShadowConfig(model="cand", sample=1, max_rps=20, queue=10)], send)
        for _ in range(6):
            d.offer(_call())
        await asyncio.sleep(0.4)
        assert len(times) == 6 and _count(d, "failed") == 6
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert min(gaps) >= 0.04  # 20/s: 50 ms apart (timer slack allowed)
        await d.aclose()
    asyncio.run(go())
