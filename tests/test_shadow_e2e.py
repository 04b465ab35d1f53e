"""Shadow traffic end to end (issue 16) against the real `tagway serve` (subprocess, embedded store, real HTTP
upstream, the openai SDK as client; the CLI as subprocesses through the gateway's store API).

Every live call of acme, globex and initech is mirrored to `refund-bad` (which answers WRONG about refunds);
globex's are also mirrored to `hang` (an upstream that takes 2 s, past its 0.5 s timeout) through a queue of 2 at
1 call/s, so most are dropped and counted. The client only ever sees production's answers, as fast as without
shadow; the shadow calls are recorded with source shadow, the live call's trace id and tags, without content for
the tenant that captures none, none for the tenant that opted out; `tagway replay report --shadow` pairs and gates
them per segment (acme regresses, globex does not) and stores the run, which `report RUN_ID --format github`
shows again.
"""
from __future__ import annotations

import json
import time

import openai
import pytest
import yaml

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess, metric
from tests.upstream import Upstream

ADMIN = "tw-sh-admin-0123456789abcdefghijklmnopqrs"
TENANTS = ("acme", "globex", "initech", "optout")
KEYS = {c: f"tw-sh-{c}-0123456789abcdefghijklmnopqrstu" for c in TENANTS}
N = 8  # live calls per customer (acme, globex)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shadow")
    with Upstream() as up:
        base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "SH_UPSTREAM_KEY"}
        config = {
            "admin_key_hash": hash_key(ADMIN),
            # priced, so a run's cost says which calls it counts (the live model's 10x the shadow's)
            "models": [{"name": "gpt-test", "model": "ok-model", **base, "input_cost_per_token": 1e-5,
                        "output_cost_per_token": 2e-5},
                       {"name": "refund-bad", "model": "refund-bad-model", **base, "input_cost_per_token": 1e-6,
                        "output_cost_per_token": 2e-6},
                       {"name": "hang", "model": "slow-model", "timeout": 0.5, **base}],
            "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])}]},
                        {"customer": "globex", "keys": [{"id": "globex-k", "hash": hash_key(KEYS["globex"])}]},
                        {"customer": "initech", "capture_content": False,
                         "keys": [{"id": "initech-k", "hash": hash_key(KEYS["initech"])}]},
                        {"customer": "optout", "shadow": False,
                         "keys": [{"id": "optout-k", "hash": hash_key(KEYS["optout"])}]}],
            "shadow": [{"model": "refund-bad", "sample": 1.0, "max_rps": 100,
                        "evaluators": [{"type": "icontains", "value": "echo"}]},
                       {"model": "hang", "sample": 1.0, "where": {"customer": "globex"}, "max_rps": 1, "queue": 2,
                        "max_in_flight": 1}],
        }
        with GatewayProcess(tmp, config, env={"SH_UPSTREAM_KEY": "sk-up"}) as g:
            g.tmp, g.upstream = tmp, up
            yield g


def client(gw, customer: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS[customer], max_retries=0)


@pytest.fixture(scope="module")
def live(gw):
    """Live traffic: trace id -> (customer, what the client got, seconds it took)."""
    out = {}
    plan = [("acme", "refund", N, False), ("globex", "billing", N, True), ("initech", "refund", 3, False),
            ("optout", "refund", 3, False)]
    for customer, intent, n, stream in plan:
        c = client(gw, customer)
        for i in range(n):
            question = f"{intent} question #{i} from {customer}"
            t0 = time.perf_counter()
            if stream:
                with c.chat.completions.with_streaming_response.create(
                        model="gpt-test", messages=[{"role": "user", "content": question}], stream=True,
                        extra_headers={"x-tagway-intent": intent, "x-tagway-tags": "tier=gold"}) as raw:
                    tid = raw.headers["x-tagway-trace-id"]
                    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
            else:
                raw = c.chat.completions.with_raw_response.create(
                    model="gpt-test", messages=[{"role": "user", "content": question}],
                    extra_headers={"x-tagway-intent": intent, "x-tagway-tags": "tier=gold"})
                tid, text = raw.headers["x-tagway-trace-id"], raw.parse().choices[0].message.content
            out[tid] = (customer, question, text, time.perf_counter() - t0)
    return out


def shadow_rows(gw, expected: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = gw.query("SELECT trace_id, replay_case_id, replay_candidate, customer, intent, tags, status, "
                        "error_type, request_json, response_json, model_requested FROM llm_calls "
                        "WHERE source = 'shadow'", ADMIN)
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


def test_client_sees_only_production(gw, live):
    for customer, question, text, seconds in live.values():
        assert text == f"Echo: {question}"  # never the candidate's WRONG
        assert seconds < 1.5  # never waited for `hang` (2 s upstream, 0.5 s timeout)


def test_shadow_calls_recorded_with_the_live_keys(gw, live):
    live_ids = {t for t, v in live.items() if v[0] != "optout"}
    rows = shadow_rows(gw, 2 * N + 3 + 2)
    bad = [r for r in rows if r["replay_candidate"] == "refund-bad"]
    assert {r["replay_case_id"] for r in bad} == live_ids  # every live call but the opted-out tenant's, once
    assert len(bad) == len(live_ids)
    for r in bad:
        customer, question, _, _ = live[r["replay_case_id"]]
        assert r["customer"] == customer and r["tags"] == {"tier": "gold"} and r["status"] == "ok"
        assert r["model_requested"] == "refund-bad" and r["trace_id"] not in live
        if customer == "initech":  # capture_content: false holds for its shadow calls too
            assert r["request_json"] == "" and r["response_json"] == ""
        else:
            assert question in r["request_json"]
            want = "WRONG" if "refund" in question else f"Echo: {question}"
            assert json.loads(r["response_json"])[0]["parts"][0]["content"] == want
    # what the candidate was sent: the live request, never streamed (globex's live calls were)
    sent = [r["body"] for r in gw.upstream.requests if r["body"].get("model") == "refund-bad-model"]
    assert len(sent) == len(live_ids)
    assert all(b.get("stream") in (None, False) and "stream_options" not in b for b in sent)
    assert sum(1 for b in sent if b.get("stream") is False) == N
    # production calls stay production, untouched by their shadows
    prod = gw.query("SELECT count() AS n FROM llm_calls WHERE source = 'production'", ADMIN)[0]["n"]
    assert prod == len(live)


def test_hanging_shadow_is_bounded_and_counted(gw, live):
    globex = {t for t, v in live.items() if v[0] == "globex"}
    deadline = time.monotonic() + 30
    while True:
        text = gw.get("/metrics", ADMIN).text
        counts = {o: metric(text, "tagway_shadow_calls_total", model="hang", outcome=o)
                  for o in ("sampled", "dropped", "sent", "failed")}
        settled = counts["sent"] + counts["failed"] + counts["dropped"] >= counts["sampled"] == N
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counts["sampled"] == N and counts["sent"] == 0
    assert counts["dropped"] >= N - 4 and counts["failed"] >= 1  # a queue of 2, one in flight, 1/s: the rest drop
    assert counts["failed"] + counts["dropped"] == N
    deadline = time.monotonic() + 15
    while True:  # the last one's span reaches the store a batch later
        hung = [r for r in shadow_rows(gw, 0) if r["replay_candidate"] == "hang"]
        if len(hung) >= counts["failed"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert len(hung) == counts["failed"] and {r["replay_case_id"] for r in hung} <= globex
    assert all(r["status"] == "error" and r["error_type"] == "timeout" for r in hung)


def test_shadow_calls_have_access_lines_but_stay_out_of_the_client_metrics(gw, live):
    """The access log has one line per call, shadow calls included (source=shadow, the candidate's model); the
    client-call metrics count only the calls a client made (shadows have tagway_shadow_calls_total)."""
    shadow_rows(gw, 2 * N + 3 + 2)  # every shadow call recorded, so every access line queued
    time.sleep(0.3)  # lines are written at most 0.1 s after their call
    lines = [ln for ln in gw.stderr().splitlines() if " source=" in ln and " trace_id=" in ln]
    shadow = [ln for ln in lines if ln.endswith(" source=shadow")]
    bad = [ln for ln in shadow if " model=refund-bad " in ln]
    assert len(bad) == 2 * N + 3 and all(" status=200 " in ln for ln in bad), shadow[:3]
    assert len([ln for ln in lines if ln.endswith(" source=production")]) == len(live)
    calls = [ln for ln in gw.get("/metrics", ADMIN).text.splitlines() if ln.startswith("tagway_calls_total{")]
    assert not [ln for ln in calls if 'model="refund-bad"' in ln or 'model="hang"' in ln], calls
    assert sum(float(ln.rpartition(" ")[2]) for ln in calls) == len(live), calls


def test_stats_leave_shadow_out(gw, live):
    r = gw.get("/admin/stats?by=customer&since=1h", ADMIN)
    assert r.status_code == 200, r.text
    rows = {row["key"]["customer"]: row["calls"] for row in r.json()["segments"]}
    assert rows == {"acme": N, "globex": N, "initech": 3, "optout": 3}


def test_report_shadow_gates_per_segment(gw, live):
    shadow_rows(gw, 2 * N + 3)
    spec = gw.tmp / "shadow.yaml"
    spec.write_text(yaml.safe_dump({"slice": {"segment_by": ["customer"]},
                                    "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    p = gw.cli("replay", "report", "--shadow", "--since", "1h", "--spec", str(spec), "--candidate", "refund-bad",
               "--format", "json")
    assert p.returncode == 1, p.stderr  # a regression
    rep = json.loads(p.stdout)
    (cand,) = rep["candidates"]
    assert cand["model"] == "refund-bad" and cand["status"] == "regression"
    rows = {r["segment"]: r for r in cand["rows"]}
    assert set(rows) == {"acme", "globex"}  # initech's calls have no content to compare; optout has no shadow
    assert (rows["acme"]["n"], rows["acme"]["before_pass"], rows["acme"]["after_pass"]) == (N, N, 0)
    assert rows["acme"]["verdict"] == "regression"
    assert (rows["globex"]["n"], rows["globex"]["before_pass"], rows["globex"]["after_pass"]) == (N, N, N)
    assert rows["globex"]["verdict"] == "ok"
    assert rep["skipped"] == {"no captured content (content capture off for that call, or the call refused before capture)": 3}
    assert any("shadow call(s) recorded, shadowing" in n and 'outcome="dropped"' in n for n in rep["notes"])
    run_id = rep["run_id"]
    assert run_id.startswith("shadow-")
    # the run's listed cost is what the report paid for (the shadow calls it scored; no judge here), not that plus
    # the logged production calls' cost, which the baseline rows carry and nobody paid for this run
    listed = gw.get(f"/admin/replays/{run_id}", ADMIN).json()["cost_usd"]
    assert listed == pytest.approx(cand["cost_usd"] + rep["judge_cost_usd"]) and listed > 0
    # the run is stored: shown again, as a PR comment with the dashboard's run page linked
    p = gw.cli("replay", "report", run_id, "--format", "github", "--dashboard-url", "https://tw.example")
    assert p.returncode == 1, p.stderr
    assert p.stdout.startswith("## ❌ tagway gate: REGRESSION")
    assert f"(https://tw.example/ui/replays/{run_id})" in p.stdout and "| acme | 8 |" in p.stdout
    p = gw.cli("replay", "resume", run_id)
    assert p.returncode == 2 and "there is nothing to re-run" in p.stderr and "Traceback" not in p.stderr


def test_report_shadow_with_the_config_rule_evaluators(gw, live):
    shadow_rows(gw, 2 * N + 3)
    p = gw.cli("replay", "report", "--shadow", "--candidate", "refund-bad", "--segment-by", "customer",
               "--format", "json")  # no --spec: the rule's evaluators, from TAGWAY_CONFIG
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    rows = {r["segment"]: r for r in rep["candidates"][0]["rows"]}
    assert (rows["acme"]["after_pass"], rows["globex"]["after_pass"]) == (0, N)
    assert rep["candidates"][0]["rows"][0]["flips"][0]["reasons"] == "icontains: missing ['echo']"
    p = gw.cli("replay", "report", "--shadow", "--format", "json")  # two rules: which one's evaluators?
    assert p.returncode == 2 and "2 shadow rule(s) match; give --spec S, or --candidate MODEL" in p.stderr
    # a candidate no rule mirrors to: said as that (it said "0 rule(s) match; give ... --candidate MODEL")
    p = gw.cli("replay", "report", "--shadow", "--candidate", "gpt-test", "--format", "json")
    assert p.returncode == 2 and "no shadow rule mirrors to 'gpt-test' (its rules mirror to" in p.stderr, p.stderr


def test_report_shadow_bad_input(gw, live):
    spec = gw.tmp / "shadow.yaml"
    p = gw.cli("replay", "report", "--shadow", "--since", "1h", "--spec", str(spec), "--candidate", "nobody")
    assert p.returncode == 2 and p.stderr.startswith("error: no shadow call recorded") and "Traceback" not in p.stderr
    p = gw.cli("replay", "report", "--shadow", "--since", "forever", "--spec", str(spec))
    assert p.returncode == 2 and "--since" in p.stderr and "Traceback" not in p.stderr
    p = gw.cli("replay", "report", "some-run", "--shadow")
    assert p.returncode == 2 and "give no RUN_ID" in p.stderr


def test_report_shadow_with_a_judge_reaches_the_gateway_before_storing_a_run(gw, live):
    """An llm_judge calls a model through a gateway: with none given, the one serving the store; a key it refuses is
    bad input (exit 2) before anything is stored, not a run of errored judgements reported as a regression."""
    shadow_rows(gw, 2 * N + 3)
    spec = gw.tmp / "judged.yaml"
    spec.write_text(yaml.safe_dump({"slice": {"segment_by": ["customer"]},
                                    "evaluators": [{"type": "llm_judge", "value": "Is it an echo?",
                                                    "model": "gpt-test", "judge_version": "1"}]}))
    runs = {r["run_id"] for r in gw.get("/admin/replays", ADMIN).json()["runs"]}
    p = gw.cli("--verbose", "replay", "report", "--shadow", "--since", "1h", "--spec", str(spec), "--candidate",
               "refund-bad")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("tagway: store:")]  # one --verbose line
    assert len(said) == 1 and f"through the running gateway (pid {gw.proc.pid} at {gw.url})" in said[0], p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"error: the gateway at {gw.url} rejected the API key (HTTP 401)")
    assert {r["run_id"] for r in gw.get("/admin/replays", ADMIN).json()["runs"]} == runs
