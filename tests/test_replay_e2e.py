"""End to end through the real gateway: production traffic for three customers goes through tagway (real openai
SDK) and lands in chDB; `tagway replay run` replays it against a candidate that is better on average but worse for
one customer. The pooled pass rate goes up, the paired gate finds that customer's regression (exit 1, naming it and
its flipped cases), the replayed and judge calls are themselves tagged spans, and replay_results joins llm_calls on
the original trace id."""
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
from replay.store import JOIN_SQL
from tests.gateway_fixture import GatewayServer
from tests.replay_support import FakeLLM, unique

PLATFORM_KEY = "tw-replay-e2e-platform-0123456789abcdef"
N = 20


def _n(user: str) -> int:
    return int(user.split("#")[-1])


def prod_answer(user: str, headers: dict) -> str:
    """Production model: always right on refunds, wrong on half the invoices and a quarter of support questions."""
    if "invoice" in user and _n(user) % 2 == 0 or "support" in user and _n(user) % 4 == 0:
        return "denied"
    return "approved"


def cand_answer(user: str, headers: dict) -> str:
    """Candidate: right on invoices and support, wrong on every third refund (one customer's flow)."""
    return "denied" if "refund" in user and _n(user) % 3 == 0 else "approved"


def judge_answer(user: str, headers: dict) -> str:
    """A judge that follows the contract: it grades the tagged response block and answers the verdict JSON."""
    tag = user.split("each block is tagged ", 1)[1].split(".", 1)[0]
    response = user.split(f"<response-{tag}>", 1)[1].split(f"</response-{tag}>", 1)[0]
    verdict = "true" if "approved" in response else "false"
    return f'{{"pass": {verdict}, "reason": "checked the decision"}}'


@pytest.fixture(scope="module")
def stack(chdb_dsn, chdb_store, tmp_path_factory):
    upstream = FakeLLM({"prod-up": prod_answer, "cand-up": cand_answer, "judge-up": judge_answer},
                       require_key=None).start()
    os.environ["REPLAY_E2E_UPSTREAM_KEY"] = "sk-upstream"
    up = {"provider": "openai", "base_url": upstream.url + "/v1", "api_key_env": "REPLAY_E2E_UPSTREAM_KEY",
          "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    cfg = GatewayConfig(
        models=[{"name": "prod-model", "model": "prod-up", **up}, {"name": "cand-model", "model": "cand-up", **up},
                {"name": "judge-model", "model": "judge-up", **up}],
        tenants=[{"customer": "platform", "may_set_customer": True,
                  "keys": [{"id": "platform-1", "hash": hash_key(PLATFORM_KEY)}]}],
        storage={"dsn": chdb_dsn, "spool_dir": str(tmp_path_factory.mktemp("spool"))},
        recording={"batch_max_seconds": 0.05},
        taxonomy={"keys": {"region": {}}, "unknown": "keep"})
    app = TagwayApp(cfg)
    server = GatewayServer(app).start()
    yield server, app, upstream
    server.stop()
    upstream.stop()


def test_replay_through_the_gateway_gates_per_segment(stack, chdb_store, tmp_path):
    server, app, upstream = stack
    acme, globex, initech = unique("acme"), unique("globex"), unique("initech")
    client = OpenAI(base_url=server.url + "/v1", api_key=PLATFORM_KEY, max_retries=0)
    for customer, intent in ((acme, "refund"), (globex, "invoice"), (initech, "support")):
        for i in range(N):
            client.chat.completions.create(
                model="prod-model", temperature=0.3,
                messages=[{"role": "system", "content": "Decide."}, {"role": "user", "content": f"{intent} #{i}"}],
                extra_headers={"x-tagway-customer": customer, "x-tagway-intent": intent,
                               "x-tagway-prompt-version": "p1", "x-tagway-tags": "region=eu"})
    assert app.recorder.force_flush()
    recorded = chdb_store.query("SELECT customer, count() AS n FROM llm_calls WHERE customer IN {c:Array(String)} "
                                "AND source = 'production' GROUP BY customer", {"c": [acme, globex, initech]})
    assert {r["customer"]: r["n"] for r in recorded} == {acme: N, globex: N, initech: N}

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "slice": {"customer": [acme, globex, initech], "tags": {"region": "eu"}, "since": "1h",
                  "segment_by": ["customer"], "sampling": {"min_per_segment": 20, "seed": 0}},
        "candidates": [{"name": "cand", "model": "cand-model", "params": {"temperature": 0}}],
        "evaluators": [{"type": "icontains", "value": "approved"},
                       {"type": "llm_judge", "value": "The decision must be 'approved'.", "model": "judge-model",
                        "judge_version": "judge-v1"}],
        "concurrency": 8}))
    common = ["--spec", str(spec), "--dsn", chdb_store.dsn, "--gateway", server.url, "--api-key", PLATFORM_KEY,
              "--no-progress"]
    cli = CliRunner()

    res = cli.invoke(replay_app, ["run", *common, "--run-id", unique("e2e"), "--format", "json"])
    assert res.exit_code == 1, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    overall = report["candidates"][0]["overall"]
    assert overall["n"] == 3 * N and overall["after"] > overall["before"]  # better on average: 0.883 vs 0.750
    rows = {r["segment"]: r for r in report["candidates"][0]["rows"]}
    # acme: 7 of 20 refunds flipped to a fail, none back: p = 0.5**7, x3 (Holm) = 0.023 <= 0.05
    assert (rows[acme]["before"], rows[acme]["after"], rows[acme]["pass_fail"]) == (1.0, 0.65, 7)
    assert rows[acme]["verdict"] == "regression" and rows[acme]["p_adjusted"] == pytest.approx(3 * 0.5 ** 7)
    assert rows[globex]["verdict"] == rows[initech]["verdict"] == "ok" and report["verdict"] == "regression"
    flips = rows[acme]["flips"]
    assert len(flips) == 7 and {f["input"] for f in flips} == {f"refund #{i}" for i in range(0, 20, 3)}
    assert all(f["baseline"] == "approved" and f["candidate"] == "denied" for f in flips)
    run_id = report["run_id"]

    assert app.recorder.force_flush()
    replayed = chdb_store.query(
        "SELECT source, replay_candidate, count() AS n, uniqExact(replay_case_id) AS cases, any(customer) AS c "
        "FROM llm_calls WHERE replay_run_id = {r:String} GROUP BY source, replay_candidate ORDER BY source, replay_candidate",
        {"r": run_id})
    assert [(r["source"], r["replay_candidate"], r["n"], r["cases"]) for r in replayed] == [
        ("replay", "cand", 3 * N, 3 * N), ("replay-judge", "baseline", 3 * N, 3 * N),
        ("replay-judge", "cand", 3 * N, 3 * N)]
    # the judge's calls have no result row: the report says what they cost, apart from the candidate's cost
    judged = chdb_store.query("SELECT sum(cost_usd) AS c FROM llm_calls WHERE replay_run_id = {r:String} "
                              "AND source = 'replay-judge'", {"r": run_id})[0]["c"]
    assert judged > 0 and report["judge_cost_usd"] == pytest.approx(judged)
    assert any(n.startswith("the LLM judge's calls cost $") for n in report["notes"]), report["notes"]
    run_row = chdb_store.query("SELECT cost_usd FROM replay_runs FINAL WHERE run_id = {r:String}", {"r": run_id})[0]
    assert run_row["cost_usd"] == pytest.approx(report["candidates"][0]["cost_usd"] + judged)  # what max_cost counts
    tagged = chdb_store.query("SELECT DISTINCT prompt_version, tags['region'] AS region FROM llm_calls "
                              "WHERE replay_run_id = {r:String} AND source = 'replay'", {"r": run_id})
    assert tagged == [{"prompt_version": "p1", "region": "eu"}]

    joined = chdb_store.query(JOIN_SQL, {"run_id": run_id})
    assert len(joined) == 2 * 3 * N and {j["production_model"] for j in joined} == {"prod-model"}
    both = chdb_store.query(
        "SELECT count() AS n FROM replay_results AS r INNER JOIN llm_calls AS c ON c.trace_id = r.replay_trace_id "
        "WHERE r.run_id = {r:String} AND c.replay_case_id = r.case_id AND c.model_requested = 'cand-model'",
        {"r": run_id})
    assert both[0]["n"] == 3 * N  # each candidate result also lines up with the replayed call's own span

    # a run stopped by its budget and resumed: the report's judge cost is every session's (a resume counted only its
    # own, and stored the short figure)
    stopped = unique("e2e")
    res = cli.invoke(replay_app, ["run", *common, "--run-id", stopped, "--max-cost", str(judged / 3),
                                  "--concurrency", "1"])
    assert res.exit_code == 3, res.output
    res = cli.invoke(replay_app, ["resume", stopped, "--dsn", chdb_store.dsn, "--gateway", server.url,
                                  "--api-key", PLATFORM_KEY, "--no-progress", "--max-cost", "10", "--format", "json"])
    assert res.exit_code == 1, res.output
    resumed = orjson.loads(res.output[res.output.index("{"):])
    assert app.recorder.force_flush()
    paid = chdb_store.query("SELECT sum(cost_usd) AS c FROM llm_calls WHERE replay_run_id = {r:String} "
                            "AND source = 'replay-judge'", {"r": stopped})[0]["c"]
    assert resumed["judge_cost_usd"] == pytest.approx(paid) and paid == pytest.approx(judged)  # every case judged once


def test_in_process_mode_runs_the_gateway_app_inside_the_replay(stack, chdb_store, chdb_dsn, tmp_path, monkeypatch):
    """`--in-process`: no gateway server; replay imports gateway.app:create_app by name (config from
    TAGWAY_CONFIG) and talks to it over httpx.ASGITransport. Its spans land in the same store."""
    server, app, upstream = stack
    customer = unique("hooli")
    client = OpenAI(base_url=server.url + "/v1", api_key=PLATFORM_KEY, max_retries=0)
    for i in range(N):
        client.chat.completions.create(model="prod-model", messages=[{"role": "user", "content": f"support #{i}"}],
                                       extra_headers={"x-tagway-customer": customer, "x-tagway-intent": "support"})
    assert app.recorder.force_flush()

    up = {"provider": "openai", "base_url": upstream.url + "/v1", "api_key_env": "REPLAY_E2E_UPSTREAM_KEY"}
    config = tmp_path / "tagway.yaml"
    config.write_text(yaml.safe_dump({
        "models": [{"name": "cand-model", "model": "cand-up", **up}],
        "tenants": [{"customer": "platform", "may_set_customer": True,
                     "keys": [{"id": "platform-1", "hash": hash_key(PLATFORM_KEY)}]}],
        "storage": {"dsn": chdb_dsn, "spool_dir": str(tmp_path / "spool")},
        "recording": {"batch_max_seconds": 0.05}}))
    monkeypatch.setenv("TAGWAY_CONFIG", str(config))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "slice": {"customer": customer, "since": "1h"}, "candidates": [{"name": "cand", "model": "cand-model"}],
        "evaluators": [{"type": "equals", "value": "approved"}]}))
    run_id = unique("inproc")
    res = CliRunner().invoke(replay_app, ["run", "--spec", str(spec), "--dsn", chdb_store.dsn, "--in-process",
                                          "--api-key", PLATFORM_KEY, "--no-progress", "--run-id", run_id])
    assert res.exit_code == 0, res.output
    assert "VERDICT: PASSED" in res.output and "0.750" in res.output and "1.000" in res.output
    rows = chdb_store.query("SELECT count() AS n FROM llm_calls WHERE replay_run_id = {r:String} AND "
                            "source = 'replay' AND customer = {c:String}", {"r": run_id, "c": customer})
    assert rows[0]["n"] == N  # the in-process gateway flushed its spans on lifespan shutdown
