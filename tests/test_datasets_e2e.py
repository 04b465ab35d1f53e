"""Datasets as the product's memory (issue 12), end to end against the real `tagway serve` (subprocess, embedded
store, real HTTP upstream, the openai SDK as client; the CLI as subprocesses working through the gateway's store
API):

traffic -> complaints and ratings posted through the openai client's base URL with tenant keys -> `tagway stats`
shows complaint_rate and feedback_score per segment -> refunds@1 built from complaints -> replayed -> a fixed bug's
trace locked (@2) -> a slice added (@3) -> refunds@1 replayed again (the same cases) and refunds (= @3) replayed:
a candidate that breaks the locked case fails the gate although no segment's statistics are significant ->
`tagway coverage` flags the slices that fail or complain with no case, worst first. Every number is checked.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import yaml

from exporters.datasets import JOIN_SQL as DATASET_JOIN
from exporters.feedback import JOIN_SQL as FEEDBACK_JOIN
from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

ADMIN = "tw-ds-admin-0123456789abcdefghijklmnopqrs"
KEYS = {c: f"tw-ds-{c}-0123456789abcdefghijklmnopqrstu" for c in ("acme", "globex", "initech")}
FLOOD_KEY = "tw-ds-acme2-0123456789abcdefghijklmnopqrs"
PER_MINUTE = 12


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datasets")
    with Upstream() as up:
        base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "DS_UPSTREAM_KEY"}
        config = {
            "admin_key_hash": hash_key(ADMIN),
            "models": [{"name": "gpt-test", "model": "ok-model", **base},
                       {"name": "refund-bad", "model": "refund-bad-model", **base},  # answers WRONG about refunds
                       {"name": "broken", "model": "fail500-a", **base}],
            "tenants": [{"customer": "acme", "keys": [{"id": "acme-k", "hash": hash_key(KEYS["acme"])},
                                                      {"id": "acme-k2", "hash": hash_key(FLOOD_KEY)}]},
                        {"customer": "globex", "keys": [{"id": "globex-k", "hash": hash_key(KEYS["globex"])}]},
                        {"customer": "initech", "keys": [{"id": "initech-k", "hash": hash_key(KEYS["initech"])}]}],
            # a long batch window: ratings posted right after their calls find them in the gateway's memory
            "recording": {"batch_max_seconds": 2.0},
            "feedback": {"per_minute": PER_MINUTE},
        }
        with GatewayProcess(tmp, config, env={"DS_UPSTREAM_KEY": "sk-up"}) as g:
            g.tmp = tmp
            yield g


def client(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def traffic(gw) -> dict[tuple[str, str], list[str]]:
    """(customer, intent) -> trace ids. globex/billing goes to a broken model: 3 errors."""
    plan = [("acme", "refund", 6, "gpt-test"), ("acme", "billing", 4, "gpt-test"), ("globex", "refund", 5, "gpt-test"),
            ("globex", "billing", 3, "broken"), ("initech", "refund", 4, "gpt-test")]
    out: dict[tuple[str, str], list[str]] = {}
    for customer, intent, n, model in plan:
        c = client(gw, KEYS[customer])
        for i in range(n):
            try:
                raw = c.chat.completions.with_raw_response.create(
                    model=model, messages=[{"role": "user", "content": f"{intent} question #{i} from {customer}"}],
                    extra_headers={"x-tagway-intent": intent, "x-tagway-prompt-version": f"{intent}-v4"})
                tid = raw.headers["x-tagway-trace-id"]
            except openai.InternalServerError as e:
                tid = e.response.headers["x-tagway-trace-id"]
            out.setdefault((customer, intent), []).append(tid)
    return out


def rate(gw, key: str, **body) -> dict:
    """A rating through the openai client's own base URL (/v1) and key."""
    return client(gw, key).post("/tagway/feedback", body=body, cast_to=httpx.Response).json()


def tagway(gw, *args: str) -> tuple[int, str, str]:
    r = gw.cli(*args)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


def jout(text: str):
    return json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])


def spec(gw, name: str, model: str) -> str:
    path = gw.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"dataset": "refunds", "candidates": [{"name": "cand", "model": model}],
                                    "evaluators": [{"type": "icontains", "value": "refund"}]}))
    return str(path)


def replay(gw, spec_path: str, dataset: str) -> tuple[int, dict]:
    code, out, err = tagway(gw, "replay", "run", "--spec", spec_path, "--dataset", dataset, "--gateway", gw.url,
                            "--api-key", ADMIN, "--no-progress", "--format", "json")
    assert code in (0, 1), err
    return code, jout(out)


def case_set(gw, run_id: str) -> set[str]:
    rows = gw.query("SELECT DISTINCT case_id, dataset_id FROM replay_results WHERE run_id = {r:String}", ADMIN,
                    r=run_id)
    return {(r["case_id"], r["dataset_id"]) for r in rows}


def test_datasets_from_complaints_to_locks_and_the_coverage_map(gw):
    t = traffic(gw)
    acme_r, acme_b, globex_r, initech_r = t["acme", "refund"], t["acme", "billing"], t["globex", "refund"], \
        t["initech", "refund"]

    # -- feedback, right after the calls (the 2 s batch window has not written them yet) -------------------------
    assert rate(gw, KEYS["acme"], trace_id=acme_r[0], complaint=True, thumbs="down", comment="no refund policy")[
        "complaint"] is True
    rate(gw, KEYS["acme"], trace_id=acme_r[1], complaint=True, thumbs="down", source="support")
    rate(gw, KEYS["acme"], trace_id=acme_r[2], thumbs="up")
    rate(gw, KEYS["acme"], trace_id=acme_b[0], complaint=True, comment="wrong invoice")
    rate(gw, KEYS["globex"], trace_id=globex_r[0], complaint=True)
    rate(gw, KEYS["globex"], trace_id=globex_r[1], score=0.2)
    rate(gw, KEYS["initech"], trace_id=initech_r[0], complaint=True, score=0.0)
    rate(gw, ADMIN, trace_id=initech_r[1], thumbs="up")  # the admin key rates any call
    c = client(gw, KEYS["acme"])
    answers = []
    for trace_id in (globex_r[2], "f" * 32):  # another tenant's call answers as an unknown one: it may not exist
        with pytest.raises(openai.NotFoundError) as e:
            c.post("/tagway/feedback", body={"trace_id": trace_id, "complaint": True}, cast_to=httpx.Response)
        assert e.value.code == "call_not_found" and "globex" not in str(e.value) and "acme" not in str(e.value)
        answers.append(e.value.body)
    assert answers[0] == answers[1]
    # (bad input on the CLI side, e.g. unknown datasets naming the nearest, is in test_datasets.py)
    for bad, param in (({"trace_id": acme_r[3], "score": 1.5}, "score"), ({"trace_id": acme_r[3], "thumbs": "meh"},
                                                                           "thumbs"),
                       ({"trace_id": acme_r[3]}, "score"), ({"trace_id": acme_r[3], "complaint": True, "x": 1}, "x")):
        with pytest.raises(openai.BadRequestError) as e:
            c.post("/tagway/feedback", body=bad, cast_to=httpx.Response)
        assert e.value.param == param, bad
    # a flood from one key: rate limited; other keys are not slowed by it
    flood = client(gw, FLOOD_KEY)
    codes = []
    for _ in range(PER_MINUTE + 3):
        r = httpx.post(gw.url + "/v1/tagway/feedback", json={"trace_id": acme_r[2], "thumbs": "up"},
                       headers={"Authorization": f"Bearer {FLOOD_KEY}"})
        codes.append(r.status_code)
    assert codes[:PER_MINUTE] == [201] * PER_MINUTE and set(codes[PER_MINUTE:]) == {429}, codes
    with pytest.raises(openai.RateLimitError) as e:
        flood.post("/tagway/feedback", body={"trace_id": acme_r[2], "thumbs": "up"}, cast_to=httpx.Response)
    assert int(e.value.response.headers["retry-after"]) >= 1
    rate(gw, KEYS["acme"], trace_id=acme_r[5], thumbs="up")  # the tenant's own key still rates

    # stored with time and who, joinable to llm_calls in one query
    gw.call_row(initech_r[3], ADMIN)  # every call written
    rows = gw.query(FEEDBACK_JOIN, ADMIN, customer="acme")
    assert len(rows) == 5 + PER_MINUTE
    by_trace = {}
    for r in rows:
        by_trace.setdefault(r["trace_id"], []).append(r)
    assert {r["rated_by"] for r in by_trace[acme_r[0]]} == {"acme-k"} and by_trace[acme_r[0]][0]["intent"] == "refund"
    assert by_trace[acme_b[0]][0]["comment"] == "wrong invoice"
    admin_row = gw.query("SELECT key_id, by_admin, customer FROM llm_feedback WHERE trace_id = {t:String}", ADMIN,
                         t=initech_r[1])
    assert admin_row == [{"key_id": "admin", "by_admin": True, "customer": "initech"}]

    # -- stats: complaint_rate and feedback_score per segment -------------------------------------------------------
    code, out, err = tagway(gw, "stats", "--by", "customer", "--by", "intent", "--since", "1h", "--json")
    assert code == 0, err
    seg = {(s["key"]["customer"], s["key"]["intent"]): s for s in jout(out)["segments"]}
    # calls, complaints, rated calls, feedback score (each rated call's latest value: thumbs up 1, down 0, score)
    expect = {("acme", "refund"): (6, 2, 4, 0.5),  # r0 down, r1 down, r2 up (and the flood's ups), r5 up
              ("acme", "billing"): (4, 1, 0, None), ("globex", "refund"): (5, 1, 1, 0.2),
              ("globex", "billing"): (3, 0, 0, None), ("initech", "refund"): (4, 1, 2, 0.5)}
    for k, (calls, complaints, rated, score) in expect.items():
        s = seg[k]
        assert (s["calls"], s["complaints"], s["rated"]) == (calls, complaints, rated), k
        assert s["complaint_rate"] == pytest.approx(complaints / calls), k
        assert (s["feedback_score"] is None) if score is None else s["feedback_score"] == pytest.approx(score), k
    assert seg["globex", "billing"]["errors"] == 3
    tenant = httpx.get(gw.url + "/v1/tagway/stats?by=intent&since=1h", headers={"Authorization": f"Bearer {KEYS['acme']}"}).json()
    assert {s["key"]["intent"]: s["complaints"] for s in tenant["segments"]} == {"refund": 2, "billing": 1}

    # -- refunds@1 from complaints ----------------------------------------------------------------------------------
    code, out, err = tagway(gw, "dataset", "add", "refunds", "--from-feedback", "complaints", "--where",
                            "intent=refund", "--since", "1h", "-m", "complaints of the week", "--author", "ana")
    assert code == 0, err
    assert "refunds@1: added 4 case(s)" in out
    at1 = {acme_r[0], acme_r[1], globex_r[0], initech_r[0]}
    code, out, _ = tagway(gw, "dataset", "show", "refunds@1", "--json")
    v1 = jout(out)
    assert (v1["ref"], v1["author"], v1["message"], v1["n_cases"]) == ("refunds@1", "ana", "complaints of the week", 4)
    assert {c["trace_id"] for c in v1["cases"]} == at1
    case0 = next(c for c in v1["cases"] if c["trace_id"] == acme_r[0])
    assert (case0["customer"], case0["intent"], case0["prompt_version"], case0["model"], case0["source"],
            case0["segment"], case0["origin"]) == ("acme", "refund", "refund-v4", "gpt-test", "production", "acme",
                                                   "feedback")

    spec_good, spec_bad = spec(gw, "good", "gpt-test"), spec(gw, "bad", "refund-bad")
    code, run_a = replay(gw, spec_good, "refunds@1")
    assert code == 0 and run_a["dataset"] == "refunds@1" and run_a["n_cases"] == 4 and run_a["locks"] == {}
    set_a = case_set(gw, run_a["run_id"])
    assert set_a == {(tid, "refunds@1") for tid in at1}

    # -- the lock (@2), then a slice (@3) ---------------------------------------------------------------------------
    code, out, err = tagway(gw, "dataset", "lock", acme_r[1], "--dataset", "refunds", "--expect", "pass",
                            "--note", "refund-v4 dropped the policy clause")
    assert code == 0 and "refunds@2: locked" in out, err
    code, out, err = tagway(gw, "dataset", "add", "refunds", "--where", "customer=globex", "--where",
                            "intent=refund", "--since", "1h", "--sample", "2", "--seed", "1")
    assert code == 0 and "refunds@3: added 2 case(s)" in out, err + out
    code, out, _ = tagway(gw, "dataset", "diff", "refunds@1", "refunds@3", "--json")
    d = jout(out)
    assert d["removed"] == [] and len(d["added"]) == 2 and set(d["added"]) <= set(globex_r[1:])
    assert d["changed"] == {acme_r[1]: {"locked": [False, True], "expect": ["", "pass"],
                                        "lock_note": ["", "refund-v4 dropped the policy clause"]}}
    code, out, _ = tagway(gw, "dataset", "log", "refunds", "--json")
    assert [(v["version"], v["op"], v["n_cases"]) for v in jout(out)] == [(3, "add", 6), (2, "lock", 4), (1, "add", 4)]

    # replaying refunds@1 after @2 and @3 exist: the very same cases
    code, run_b = replay(gw, spec_good, "refunds@1")
    assert code == 0 and case_set(gw, run_b["run_id"]) == set_a

    # refunds (the latest, recorded as refunds@3) against a candidate that breaks the refund answers
    code, run_c = replay(gw, spec_bad, "refunds")
    assert code == 1 and run_c["dataset"] == "refunds@3" and run_c["n_cases"] == 6
    cand = run_c["candidates"][0]
    rows = {r["segment"]: r for r in cand["rows"]}
    assert rows["acme"]["verdict"] == "regression" and "locked case" in rows["acme"]["why"]
    # the statistics alone decide nothing with so few cases: the other segments are inconclusive, not regressions
    assert rows["globex"]["verdict"] == "inconclusive" and rows["initech"]["verdict"] == "inconclusive"
    assert (rows["globex"]["n"], rows["globex"]["pass_fail"]) == (3, 3)
    assert rows["acme"]["p_adjusted"] > 0.05
    assert [(lk["trace_id"], lk["expect"], lk["got"]) for lk in cand["locks"]] == [(acme_r[1], "pass", "fail")]
    assert any("locked case" in x and "refund-v4 dropped the policy clause" in x for x in run_c["reasons"])
    assert case_set(gw, run_c["run_id"]) == {(tid, "refunds@3") for tid in at1 | set(d["added"])}
    code, run_d = replay(gw, spec_good, "refunds@3")
    assert code == 0 and [lk["got"] for lk in run_d["candidates"][0]["locks"]] == ["pass"]

    # eval records join their dataset case and the production call on shared keys, in one query
    joined = gw.query(DATASET_JOIN, ADMIN, run_id=run_c["run_id"])
    assert len(joined) == 12  # 6 cases x (baseline, cand)
    locked = [r for r in joined if r["locked"]]
    assert {(r["trace_id"], r["candidate"], r["status"]) for r in locked} == {(acme_r[1], "baseline", "passed"),
                                                                               (acme_r[1], "cand", "failed")}
    assert {(r["customer"], r["intent"], r["prompt_version"], r["model"]) for r in joined} == \
        {("acme", "refund", "refund-v4", "gpt-test"), ("globex", "refund", "refund-v4", "gpt-test"),
         ("initech", "refund", "refund-v4", "gpt-test")}

    # the case board's view of the locked trace: its labels (datasets) and its feedback
    view = httpx.get(f"{gw.url}/admin/cases/{acme_r[1]}", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    sections = {x["name"]: x["rows"] for x in view["sections"]}
    assert [(r["dataset_id"], r["locked"], r["expect"], r["lock_note"]) for r in sections["labels"]] == [
        ("refunds@3", True, "pass", "refund-v4 dropped the policy clause")]
    held = sections["datasets"]  # the versioned dataset (its latest version) first, then any pinned ones
    assert held and held[0]["dataset_id"] == "refunds@3" and held[0]["segment"] == "acme"
    assert all(not r["dataset_id"].startswith("refunds@") for r in held[1:])
    assert [(r["complaint"], r["thumbs"], r["source"], r["rated_by"]) for r in sections["feedback"]] == [
        (True, "down", "support", "acme-k")]

    # -- the coverage map -------------------------------------------------------------------------------------------
    # a call refused before any model was tried (a wrong key: recorded, as an error without customer or intent)
    # is no model behaviour a case could cover: neither a slice nor a gap
    refused = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": "Bearer tw-not-a-key"},
                         json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401
    code, out, err = tagway(gw, "errors", "--since", "1h", "--json")
    assert code == 0 and 401 in [s for g in jout(out)["errors"] for s in g["http_statuses"]], out  # it is recorded
    code, out, err = tagway(gw, "coverage", "--by", "customer", "--by", "intent", "--dataset", "refunds", "--since",
                            "1h", "--json")
    assert code == 0, err
    cov = jout(out)
    assert cov["datasets"] == ["refunds@3"] and cov["gaps"] == 2
    assert all(s["key"]["customer"] for s in cov["slices"]), cov["slices"]  # the refused call is in no slice
    got = [(s["key"]["customer"], s["key"]["intent"], s["calls"], s["errors"], s["complaints"], s["cases"], s["gap"])
           for s in cov["slices"]]
    assert got[:2] == [("globex", "billing", 3, 3, 0, 0, True),  # 3 failures, no case: the worst gap
                       ("acme", "billing", 4, 0, 1, 0, True)]  # a complaint, no case
    assert sorted(got[2:]) == [("acme", "refund", 6, 0, 2, 2, False), ("globex", "refund", 5, 0, 1, 3, False),
                               ("initech", "refund", 4, 0, 1, 1, False)]
    billing = cov["slices"][1]
    assert billing["complaint_rate"] == pytest.approx(0.25) and billing["failure_rate"] == 0
    assert cov["slices"][0]["failure_rate"] == 1.0
    code, out, _ = tagway(gw, "coverage", "--by", "customer", "--by", "intent", "--dataset", "refunds", "--since",
                          "1h")
    lines = [line.split() for line in out.splitlines() if line.split()[:1] in (["acme"], ["globex"], ["initech"])]
    assert [x[:2] for x in lines[:2]] == [["globex", "billing"], ["acme", "billing"]]
    assert all("GAP:" in " ".join(x) for x in lines[:2]) and not any("GAP:" in " ".join(x) for x in lines[2:])
    assert lines[1][2:6] == ["4", "0.0%", "25.0%", "0"], lines[1]
    api = httpx.get(gw.url + "/admin/coverage", params=[("by", "customer"), ("by", "intent"), ("dataset", "refunds"),
                                                       ("since", "1h")], headers={"Authorization": f"Bearer {ADMIN}"})
    assert api.status_code == 200 and api.json()["slices"] == cov["slices"]
    typo = httpx.get(gw.url + "/admin/coverage", params={"dataset": "refundz"},
                     headers={"Authorization": f"Bearer {ADMIN}"})
    assert typo.status_code == 404 and typo.json()["error"]["code"] == "dataset_not_found"  # as /admin/datasets/NAME
    assert "did you mean refunds?" in typo.json()["error"]["message"]
    assert httpx.get(gw.url + "/admin/coverage", headers={"Authorization": f"Bearer {KEYS['acme']}"}).status_code == 403
