"""A deployment that keeps failing is passed over for its fallback for a while (gateway/cooldowns.py): the rule on a
clock, then through the real gateway with a real upstream that hangs, the openai SDK and /metrics."""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from gateway.cooldowns import Cooldowns
from tests.gateway_fixture import UPSTREAM_KEY, GatewayServer, MemoryRecorder, recorded_gateway
from tests.upstream import Upstream

KEY = "tw-cool-acme-0123456789abcdefghijklmnopq"
SOLO = "tw-cool-solo-0123456789abcdefghijklmnopq"
MSG = [{"role": "user", "content": "hi"}]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_failures_in_a_row_cool_a_deployment_until_its_time_is_up_then_one_try_decides(caplog):
    caplog.set_level(logging.INFO, logger="tagway.cooldowns")
    clock = Clock()
    c = Cooldowns(after_failures=3, seconds=30, clock=clock)
    c.failed("a")
    c.failed("a")
    c.answered("a")  # an answer between failures: not "in a row"
    c.failed("a")
    c.failed("a")
    assert not c.cooling("a")
    c.failed("a", "timeout")
    assert c.cooling("a") and c.started == {"a": 1}
    clock.t += 29.9
    assert c.cooling("a")
    clock.t += 0.2
    assert not c.cooling("a")  # half-open: the next call tries it...
    assert c.trying("a")
    assert c.cooling("a")  # ...alone: the others still pass it over while that try runs
    assert not c.trying("a")  # a call with no fallback tries it too, but is not the probe: its end frees nothing
    c.ended("a")  # the probe's try ended with no word on the deployment (the client left): the next call tries
    assert not c.cooling("a")
    assert c.trying("a")
    c.failed("a")  # and a failure cools it again at once (the same outage: not a new cooldown)
    assert c.cooling("a") and c.started == {"a": 1}
    clock.t += 30
    assert c.trying("a")
    c.answered("a")
    assert not c.cooling("a")
    c.failed("a")
    assert not c.cooling("a")  # an answer cleared the count
    # on-call reads one line when it starts cooling (not at each failed half-open try) and one when it answers again
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "deployment 'a' failed 3 times in a row (last: timeout): calls that can go to a fallback pass it "
                    "over for 30s at a time until it answers again"),
        ("INFO", "deployment 'a' answers again: calls go to it first again")]

    # /metrics: a deployment that cooled reads 0 once it answers again (the series stays); the calls sent past it
    c.pass_over("a")
    metrics = {m.name: {tuple(x.labels.values()): x.value for x in m.samples} for m in c.collect("t_")}
    assert metrics["t_deployment_cooling"] == {("a",): 0.0} and metrics["t_deployment_cooldowns"] == {("a",): 1}
    assert metrics["t_deployment_passed_over"] == {("a",): 1}

    never = Cooldowns(after_failures=0, seconds=30, clock=clock)
    for _ in range(10):
        never.failed("a")
    assert not never.cooling("a") and never.started == {}


@pytest.fixture()
def gateway():
    up = Upstream().start()
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    cfg = GatewayConfig(
        models=[{"name": "hangs", "model": "slow-a", "timeout": 0.3, "fallbacks": ["backup"], **base},
                {"name": "backup", "model": "ok-b", **base},
                {"name": "alone", "model": "slow-c", "timeout": 0.3, **base}],
        tenants=[{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEY)}]},
                 {"customer": "solo", "allowed_models": ["hangs"], "keys": [{"id": "solo-k", "hash": hash_key(SOLO)}]}],
        cooldown={"after_failures": 2, "seconds": 1.5})
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()
    up.stop()


def _call(server, model: str, key: str = KEY) -> dict:
    """The recorded call span's attributes of one call (answered or not)."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    try:
        raw = c.chat.completions.with_raw_response.create(model=model, messages=MSG)
        trace = raw.headers["x-tagway-trace-id"]
    except openai.APIStatusError as e:
        trace = e.response.headers["x-tagway-trace-id"]
    return dict(server.recorder.call(trace).attributes)


def _metric(server, name: str, model: str) -> float | None:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return None


def _fallbacks(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    (line,) = [x for x in text.splitlines() if x.startswith("tagway_fallbacks_total ")]
    return float(line.rsplit(" ", 1)[1])


def test_a_hanging_deployment_is_passed_over_for_its_fallback_then_tried_again(gateway):
    first = [_call(gateway, "hangs") for _ in range(2)]  # each waits out the timeout, then the fallback answers
    assert [(a[sc.ATTEMPTS], a[sc.DEPLOYMENT]) for a in first] == [(2, "backup"), (2, "backup")]
    assert _fallbacks(gateway) == 2 and _metric(gateway, "tagway_deployment_passed_over_total", "hangs") is None
    cooled = _call(gateway, "hangs")  # straight to the fallback: no wait on the deployment that hangs
    assert (cooled[sc.ATTEMPTS], cooled[sc.DEPLOYMENT]) == (1, "backup")
    assert json.loads(cooled[sc.DEPLOYMENTS_COOLING]) == ["hangs"] and sc.ERROR_TYPE not in cooled
    assert _metric(gateway, "tagway_deployment_cooling", "hangs") == 1
    assert _metric(gateway, "tagway_deployment_cooldowns_total", "hangs") == 1
    # on-call counts the calls the cooldown sent on apart from those that moved on after a failure
    assert _metric(gateway, "tagway_deployment_passed_over_total", "hangs") == 1 and _fallbacks(gateway) == 2

    time.sleep(1.6)  # its time is up: one call tries it while the others still go straight to the fallback
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: _call(gateway, "hangs"), range(4)))
    assert sorted(a[sc.ATTEMPTS] for a in together) == [1, 1, 1, 2], together
    assert all(a[sc.DEPLOYMENT] == "backup" and sc.ERROR_TYPE not in a for a in together)
    assert _call(gateway, "hangs")[sc.ATTEMPTS] == 1  # the try failed: cooling again, in the same outage
    assert _metric(gateway, "tagway_deployment_cooldowns_total", "hangs") == 1
    assert _metric(gateway, "tagway_deployment_passed_over_total", "hangs") == 1 + 3 + 1 and _fallbacks(gateway) == 3


def test_a_deployment_with_nothing_to_fall_back_to_is_always_tried(gateway):
    for _ in range(3):  # no fallback: its chance of an answer beats a certain error
        a = _call(gateway, "alone")
        assert (a[sc.ATTEMPTS], a[sc.DEPLOYMENT], a[sc.ERROR_TYPE]) == (1, "alone", "timeout")
    assert _metric(gateway, "tagway_deployment_cooling", "alone") == 1

    for _ in range(2):
        _call(gateway, "hangs")  # acme's calls cool `hangs` down
    assert _call(gateway, "hangs")[sc.ATTEMPTS] == 1
    moved = _fallbacks(gateway)
    solo = _call(gateway, "hangs", key=SOLO)  # solo may not use the fallback: `hangs` is tried all the same
    assert (solo[sc.ATTEMPTS], solo[sc.DEPLOYMENT], solo[sc.ERROR_TYPE]) == (1, "hangs", "timeout")
    assert json.loads(solo[sc.FALLBACKS_SKIPPED]) == ["backup"] and sc.DEPLOYMENTS_COOLING not in solo
    assert _fallbacks(gateway) == moved  # it failed with no fallback it may use: it moved on to none


def test_show_says_which_deployments_a_call_passed_over_and_why(tmp_path, chdb_store, chdb_dsn):
    """On-call reading one call: `tagway show` (and the call's JSON) says the deployment it passed over while that
    cooled, and the fallback its customer may not use (both were on the span only: "attempts 1" and no reason)."""
    import typer  # noqa: PLC0415
    from typer.testing import CliRunner  # noqa: PLC0415

    from exporters.calls import call_detail  # noqa: PLC0415
    from gateway import stats_cli  # noqa: PLC0415

    up = Upstream().start()
    base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    models = [{"name": "hangs", "model": "slow-a", "timeout": 0.3, "fallbacks": ["backup"], **base},
              {"name": "backup", "model": "ok-b", **base}]
    tenants = [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEY)}]},
               {"customer": "solo", "allowed_models": ["hangs"], "keys": [{"id": "solo-k", "hash": hash_key(SOLO)}]}]
    try:
        with recorded_gateway(up, chdb_store, str(tmp_path / "spool"), models=models,
                              config={"tenants": tenants, "cooldown": {"after_failures": 2, "seconds": 60}}) as gw:
            traces = []
            for key in (KEY, KEY, KEY, SOLO):  # two fall back and cool it down, one passes it over, solo may not
                c = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
                try:
                    traces.append(c.chat.completions.with_raw_response.create(
                        model="hangs", messages=MSG).headers["x-tagway-trace-id"])
                except openai.APIStatusError as e:
                    traces.append(e.response.headers["x-tagway-trace-id"])
            assert gw.recorder.force_flush()
    finally:
        up.stop()
    passed, skipped = call_detail(chdb_store, traces[2]), call_detail(chdb_store, traces[3])
    assert (passed["deployments_cooling"], passed["fallbacks_skipped"]) == (["hangs"], [])
    assert (skipped["deployments_cooling"], skipped["fallbacks_skipped"]) == ([], ["backup"])
    app = typer.Typer()
    stats_cli.register(app)
    shown = []
    for trace in traces[2:]:
        res = CliRunner().invoke(app, ["show", trace, "--dsn", chdb_dsn], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        shown.append(" ".join(res.stdout.split()))
    assert "passed over hangs (cooling down after failures: sent on to its fallback)" in shown[0], shown[0]
    assert "fallbacks skipped" not in shown[0] and "passed over" not in shown[1]
    assert "fallbacks skipped backup (this customer may not use them)" in shown[1], shown[1]
