"""A replay run belongs to the key that started it: `tagway replay resume` with another key (another platform
tenant's) is refused in one line (exit 2) before it calls or writes anything, and the answers a resume takes from
the gateway's record are the ones made with the run's key, not calls another key marked with the run's id. Through
the real gateway (uvicorn on 127.0.0.1, recording into chDB) and a real upstream on 127.0.0.1."""
from __future__ import annotations

import os

import orjson
import pytest
import yaml
from openai import OpenAI
from typer.testing import CliRunner

from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from replay.cli import replay_app
from replay.pipeline import _resume_refusal
from replay.runner import Caller
from replay.store import RunRow, get_run, read_results
from tests.gateway_fixture import GatewayServer
from tests.replay_support import FakeLLM, unique

KEY_A = "tw-resume-keys-platform-a-0123456789abcd"
KEY_B = "tw-resume-keys-platform-b-0123456789abcd"
ADMIN = "tw-resume-keys-admin-0123456789abcdefghi"


def answer(user: str, headers: dict) -> str:
    return "denied" if "deny" in user else "approved"


@pytest.fixture(scope="module")
def stack(chdb_dsn, chdb_store, tmp_path_factory):
    upstream = FakeLLM({"prod-up": answer, "cand-up": answer}, require_key=None).start()
    os.environ["RESUME_KEYS_UPSTREAM_KEY"] = "sk-upstream"
    up = {"provider": "openai", "base_url": upstream.url + "/v1", "api_key_env": "RESUME_KEYS_UPSTREAM_KEY",
          "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    cfg = GatewayConfig(
        models=[{"name": "prod-model", "model": "prod-up", **up}, {"name": "cand-model", "model": "cand-up", **up}],
        tenants=[{"customer": "platform-a", "may_set_customer": True,
                  "keys": [{"id": "platform-a-1", "hash": hash_key(KEY_A)}]},
                 {"customer": "platform-b", "may_set_customer": True,
                  "keys": [{"id": "platform-b-1", "hash": hash_key(KEY_B)}]}],
        admin_key_hash=hash_key(ADMIN),
        storage={"dsn": chdb_dsn, "spool_dir": str(tmp_path_factory.mktemp("spool"))},
        recording={"batch_max_seconds": 0.05})
    app = TagwayApp(cfg)
    server = GatewayServer(app).start()
    yield server, app, upstream
    server.stop()
    upstream.stop()


def _started_run(stack, chdb_store, tmp_path, key: str, calls: int = 3) -> tuple[str, list[str], str]:
    """A run of `calls` recorded calls of a customer of its own, started with `key`: (run id, its case ids, the
    customer)."""
    server, app, upstream = stack
    customer = unique("resume-keys")
    client = OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    for i in range(calls):
        client.chat.completions.create(model="prod-model", messages=[{"role": "user", "content": f"refund #{i}"}],
                                       extra_headers={"x-tagway-customer": customer, "x-tagway-prompt-version": "p1"})
    assert app.recorder.force_flush()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "slice": {"customer": [customer], "since": "1h", "segment_by": ["customer"]},
        "candidates": [{"name": "cand", "model": "cand-model"}],
        "evaluators": [{"type": "icontains", "value": "approved"}], "concurrency": 1}))
    run_id = unique("keys")
    res = CliRunner().invoke(replay_app, ["run", "--spec", str(spec), "--run-id", run_id, "--api-key", key,
                                          "--dsn", chdb_store.dsn, "--gateway", server.url, "--no-progress"])
    assert res.exit_code == 0, res.output
    return run_id, sorted(r.case_id for r in read_results(chdb_store, run_id) if r.candidate == "cand"), customer


def test_a_run_is_resumed_only_with_its_own_key_and_its_own_recorded_answers(stack, chdb_store, tmp_path):
    server, app, upstream = stack
    run_id, _, customer = _started_run(stack, chdb_store, tmp_path, KEY_A, calls=6)
    where = ["--dsn", chdb_store.dsn, "--gateway", server.url, "--no-progress"]
    cli = CliRunner()
    assert get_run(chdb_store, run_id).key_id == "platform-a-1"

    # the run's CLI killed before two results were written: the gateway recorded those calls (key A's)
    results = {r.case_id: r for r in read_results(chdb_store, run_id) if r.candidate == "cand"}
    lost = sorted(results)[:2]
    own = {c: results[c].replay_trace_id for c in lost}
    chdb_store.command("ALTER TABLE replay_results DELETE WHERE run_id = {r:String} AND candidate = 'cand' "
                       "AND case_id IN {c:Array(String)} SETTINGS mutations_sync = 2", {"r": run_id, "c": lost})
    # another platform key marks a call of its own as that run's answer for one of them (it may mark replay calls)
    other = OpenAI(base_url=server.url + "/v1", api_key=KEY_B, max_retries=0)
    forged = other.chat.completions.with_raw_response.create(
        model="cand-model", messages=[{"role": "user", "content": "deny this one"}],
        extra_headers={"x-tagway-customer": customer, "x-tagway-prompt-version": "p1", "x-tagway-source": "replay",
                       "x-tagway-replay-run-id": run_id, "x-tagway-replay-candidate": "cand",
                       "x-tagway-replay-case-id": lost[0]})
    assert app.recorder.force_flush()
    sent = len(upstream.chat_requests())

    # that key cannot resume the run: one line, exit 2, nothing called or written
    res = cli.invoke(replay_app, ["resume", run_id, "--api-key", KEY_B, *where])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert (f"run {run_id} was started with key 'platform-a-1', not this one ('platform-b-1'): resume it with that "
            "key or the admin key") in lines[0]
    assert len(upstream.chat_requests()) == sent and len(read_results(chdb_store, run_id)) == len(results) * 2 - 2

    # the admin key may; the answers it scores from the record are key A's, not the forged one
    res = cli.invoke(replay_app, ["resume", run_id, "--api-key", ADMIN, "--format", "json", *where])
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    assert "2 call(s) answered before the stop, whose results were not stored, scored from the gateway's record " \
           "without calling again" in report["notes"], report["notes"]
    assert len(upstream.chat_requests()) == sent
    again = {r.case_id: r for r in read_results(chdb_store, run_id) if r.candidate == "cand"}
    assert {c: again[c].replay_trace_id for c in lost} == own
    assert forged.headers["x-tagway-trace-id"] not in {r.replay_trace_id for r in again.values()}
    assert again[lost[0]].status == "passed"  # the forged call's answer was "denied"

    # and the key that started it still may (nothing left to run)
    res = cli.invoke(replay_app, ["resume", run_id, "--api-key", KEY_A, *where])
    assert res.exit_code == 0, res.output
    assert len(upstream.chat_requests()) == sent


def test_a_run_that_recorded_no_key_is_resumed_by_the_admin_key_only():
    """Started in-process (its gateway is the CLI's own app) or by a tagway that did not record keys."""
    run = RunRow("old-run", "incomplete")
    assert _resume_refusal(run, Caller("platform-b-1", admin=False)) == (
        "run old-run recorded no key (started in-process, or before tagway recorded it): resume it with the admin key")
    assert _resume_refusal(run, Caller("admin", admin=True)) is None
    assert _resume_refusal(run, None) is None  # a gateway that does not say which key it is: nothing to check against
    assert _resume_refusal(run, None, asked=False) is None  # in-process, or a given transport


def test_an_unknown_key_does_not_resume_a_run_that_recorded_one_unless_the_check_is_skipped_by_intent():
    run = RunRow("keyed-run", "incomplete", key_id="platform-a-1")
    assert "the gateway could not say whose key this is" in _resume_refusal(run, None)
    assert _resume_refusal(run, None, asked=False) is None  # in-process / a given transport: the key guards nothing


class NoWhoami:
    """A proxy-like ASGI front of the gateway whose /v1/tagway/whoami answers `status` (a 5xx, or a proxy that
    does not route /v1/tagway/*): everything else is the gateway's (already started: lifespan answered here)."""

    def __init__(self, app, status: int) -> None:
        self.app, self.status = app, status

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http" and scope["path"] == "/v1/tagway/whoami":
            await send({"type": "http.response.start", "status": self.status, "headers": []})
            await send({"type": "http.response.body", "body": b"unavailable"})
            return
        await self.app(scope, receive, send)


@pytest.mark.parametrize("status", [503, 404])
def test_a_gateway_that_does_not_say_whose_key_it_is_lets_no_other_key_resume(stack, chdb_store, tmp_path, status):
    server, app, upstream = stack
    run_id, cases, _ = _started_run(stack, chdb_store, tmp_path, KEY_A)
    chdb_store.command("ALTER TABLE replay_results DELETE WHERE run_id = {r:String} AND candidate = 'cand' "
                       "AND case_id = {c:String} SETTINGS mutations_sync = 2", {"r": run_id, "c": cases[0]})
    front = GatewayServer(NoWhoami(app, status)).start()
    try:
        sent, stored = len(upstream.chat_requests()), len(read_results(chdb_store, run_id))
        res = CliRunner().invoke(replay_app, ["resume", run_id, "--api-key", KEY_B, "--dsn", chdb_store.dsn,
                                              "--gateway", front.url, "--no-progress"])
        assert res.exit_code == 2, res.output
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        assert (f"run {run_id} was started with key 'platform-a-1', and the gateway could not say whose key this is "
                "(/v1/tagway/whoami did not answer)") in lines[0], lines[0]
        assert len(upstream.chat_requests()) == sent and len(read_results(chdb_store, run_id)) == stored
    finally:
        front.stop()


def test_answers_paid_during_an_admin_resume_are_not_paid_again_by_the_runs_own_key(stack, chdb_store, tmp_path):
    server, app, upstream = stack
    run_id, cases, _ = _started_run(stack, chdb_store, tmp_path, KEY_A)
    where = ["--dsn", chdb_store.dsn, "--gateway", server.url, "--no-progress"]
    lost = {"r": run_id, "c": cases[0]}
    # the result and key A's recorded call gone: the admin resume pays for that case again (recorded as 'admin')
    chdb_store.command("ALTER TABLE replay_results DELETE WHERE run_id = {r:String} AND candidate = 'cand' "
                       "AND case_id = {c:String} SETTINGS mutations_sync = 2", lost)
    # (moved to a case id of no run rather than deleted: the rollups keep every call, and tests/test_rollups.py checks
    # that they answer as the raw calls do over the whole shared store)
    chdb_store.command("ALTER TABLE llm_calls UPDATE replay_case_id = 'gone' WHERE replay_run_id = {r:String} AND "
                       "replay_case_id = {c:String} SETTINGS mutations_sync = 2", lost)
    sent = len(upstream.chat_requests())
    res = CliRunner().invoke(replay_app, ["resume", run_id, "--api-key", ADMIN, *where])
    assert res.exit_code == 0, res.output
    assert app.recorder.force_flush()
    assert len(upstream.chat_requests()) == sent + 1
    # ... and its CLI was killed before it wrote that result: the run's own key scores it from the admin's call
    chdb_store.command("ALTER TABLE replay_results DELETE WHERE run_id = {r:String} AND candidate = 'cand' "
                       "AND case_id = {c:String} SETTINGS mutations_sync = 2", lost)
    res = CliRunner().invoke(replay_app, ["resume", run_id, "--api-key", KEY_A, "--format", "json", *where])
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    assert "1 call(s) answered before the stop, whose results were not stored, scored from the gateway's record " \
           "without calling again" in report["notes"], report["notes"]
    assert len(upstream.chat_requests()) == sent + 1
