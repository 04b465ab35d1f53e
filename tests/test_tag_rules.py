"""Tag rules end to end, exactly as seed 002: production calls driven through the real gateway (recording into the
shared chDB store), a deterministic judge double behind it (a HandlerProvider), `tagway eval run` over datasets of
those calls, and the tags read back from the store, the audit log, the admin API and `tagway stats`.

Each reconciliation sentence of the seed is its own test."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx
import orjson
import pytest
import typer
from typer.testing import CliRunner

from exporters import tagstate as ts
from exporters.evals import get_run
from gateway import stats_cli, tags_cli
from replay.datasets import save_dataset, save_jsonl
from replay.slice import Sampled
from replay.evals.cli import eval_app
from replay.evals.run import EvalOptions, resolve_evaluators, run_evaluation
from replay.slice import fetch_cases
from tests.gateway_fixture import ADMIN_KEY, KEYS, recorded_gateway
from tests.tag_rules_support import JUDGE_MODEL, JudgeDouble, Traffic, seed_evaluator, unique

cli = CliRunner()
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
NEG = {"user_sentiment": "negative", "expected_helpfulness": 2, "confidence_score": 0.3}  # meets all three rules
POS = {"user_sentiment": "positive", "expected_helpfulness": 5, "confidence_score": 0.95}  # meets none


@pytest.fixture(scope="module")
def world(upstream, chdb_store, tmp_path_factory):
    judge = JudgeDouble()
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("tagrules-spool")),
                          providers={"judge-double": judge.provider}, models=[JUDGE_MODEL]) as gw:
        yield {"gw": gw, "judge": judge, "store": chdb_store}


@pytest.fixture()
def w(world, tmp_path):
    run = uuid.uuid4().hex
    return {**world, "run": run, "traffic": Traffic(world["gw"], run), "tmp": tmp_path,
            "a": f"tr-{run[:8]}-a", "b": f"tr-{run[:8]}-b"}


def evaluate(w, evaluator, dataset, mode="full", *extra):
    res = cli.invoke(eval_app, ["run", "--evaluator", str(evaluator), "--dataset", str(dataset), "--mode", mode,
                                "--dsn", w["store"].dsn, "--gateway", w["gw"].url, "--api-key", ADMIN_KEY,
                                "--format", "json", *extra], catch_exceptions=False)
    report = orjson.loads(res.stdout[res.stdout.index("{"):]) if "{" in res.stdout else None
    return res, report


def dataset_of(w, trace_ids):
    ds = unique("tagrules")
    save_dataset(w["store"], ds, [Sampled(t, "x") for t in trace_ids])
    return ds


def tags(w, target):
    return set(ts.tags_of(w["store"], ts.parse_target(target)))


def audit(w, target):
    return [(e["tag"], e["action"], e["actor"]) for e in ts.audit(w["store"], ts.parse_target(target))]


def calls(w, n, customer=None, **kw):
    out = [w["traffic"].call(customer or w["a"], **kw) for _ in range(n)]
    w["traffic"].flush(w["store"], [t for t, _ in out])
    return out


def human(w, method, target, tag, key=ADMIN_KEY, prefix="/admin"):
    with httpx.Client(base_url=w["gw"].url, headers={"authorization": f"Bearer {key}"}, timeout=10) as h:
        if method == "add":
            return h.post(f"{prefix}/tags", json={"target": target, "tag": tag})
        return h.delete(f"{prefix}/tags", params={"target": target, "tag": tag})


# -- the seed's example rules --------------------------------------------------------------------------------------
def test_seed_example_rules_tag_the_messages_that_meet_them(w):
    (t1, m1), (t2, m2), (t3, m3), (t4, m4) = calls(w, 4)
    w["judge"].answers.update({m1: NEG, m2: {**POS, "expected_helpfulness": 1},
                               m3: {**POS, "confidence_score": 0.4}, m4: POS})
    name = unique("seed")
    res, report = evaluate(w, seed_evaluator(w["tmp"] / "seed.yaml", name), dataset_of(w, [t1, t2, t3, t4]))
    assert res.exit_code == 0, res.output
    assert tags(w, t1) == {"negative-sentiment", "low-helpfulness", "low-confidence"}
    assert tags(w, t2) == {"low-helpfulness"}  # 1 is in 1..2
    assert tags(w, t3) == {"low-confidence"}  # 0.4 is in 0.0..0.4: ranges are inclusive
    assert tags(w, t4) == set()
    rows = {r["target_id"]: r for r in report["rows"]}
    assert rows[t1]["applied_tags"] == ["negative-sentiment", "low-helpfulness", "low-confidence"]
    assert rows[t1]["fields"] == NEG and rows[t4]["applied_tags"] == []
    assert rows[t1]["evaluator_version"] == 1 and report["evaluators"] == [f"{name}@1"]
    assert report["summary"]["applied"] == 5 and report["summary"]["removed"] == 0
    e = ts.audit(w["store"], ts.parse_target(t1))
    assert {(x["tag"], x["action"], x["actor"], x["field_value"]) for x in e} == {
        ("negative-sentiment", "apply", f"rule:{name}/negative-sentiment", "negative"),
        ("low-helpfulness", "apply", f"rule:{name}/low-helpfulness", "2"),
        ("low-confidence", "apply", f"rule:{name}/low-confidence", "0.3")}
    assert {(x["run_id"], x["mode"], x["evaluator_version"]) for x in e} == {(report["run_id"], "full", 1)}
    # the judge was asked for the schema in structured-output mode, through the gateway as a judge call
    body = w["judge"].prompts[-1]
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["user_sentiment"]["enum"] == ["positive", "neutral", "negative"]
    judge_traces = [r["reason"].split("trace ")[1].rstrip(")") for r in report["rows"]]
    w["traffic"].flush(w["store"], judge_traces)  # the judge's calls are recorded like any other
    judged = w["store"].query("SELECT DISTINCT source, replay_run_id FROM llm_calls WHERE trace_id IN "
                              "{ids:Array(String)}", {"ids": judge_traces})
    assert judged == [{"source": "replay-judge", "replay_run_id": report["run_id"]}]
    # the table shows the Applied Tags column
    table = cli.invoke(eval_app, ["results", report["run_id"], "--dsn", w["store"].dsn]).output
    assert "Applied Tags" in table and "negative-sentiment, low-helpfulness, low-confidence" in table


# -- reconciliation, sentence by sentence --------------------------------------------------------------------------
def test_a_full_rerun_removes_a_rule_tag_the_latest_run_did_not_apply(w):
    (t1, m1), (t2, m2) = calls(w, 2)
    w["judge"].answers.update({m1: NEG, m2: NEG})
    name = unique("stale")
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", name), dataset_of(w, [t1, t2])
    assert evaluate(w, ev, ds)[0].exit_code == 0
    assert tags(w, t1) == tags(w, t2) == {"negative-sentiment", "low-helpfulness", "low-confidence"}
    w["judge"].answers[m1] = {**NEG, "user_sentiment": "neutral"}  # the message no longer meets one rule
    res, report = evaluate(w, ev, ds)
    assert res.exit_code == 0, res.output
    assert tags(w, t1) == {"low-helpfulness", "low-confidence"}
    assert tags(w, t2) == {"negative-sentiment", "low-helpfulness", "low-confidence"}
    assert report["tag_changes"] == [{
        "target_kind": "message", "target_id": t1, "customer": w["a"], "tag": "negative-sentiment",
        "action": "remove", "actor": f"rule:{name}/negative-sentiment", "evaluator": name, "evaluator_version": 1,
        "rule": "negative-sentiment",
        "field": "user_sentiment", "field_value": "neutral"}]


def test_a_full_rerun_removes_a_human_applied_tag_that_a_rule_manages(w):
    ((t1, m1),) = calls(w, 1)
    w["judge"].answers[m1] = POS
    r = human(w, "add", t1, "low-confidence")
    assert r.status_code == 200 and r.json()["changed"] is True
    assert tags(w, t1) == {"low-confidence"}
    res, report = evaluate(w, seed_evaluator(w["tmp"] / "e.yaml", unique("human")), dataset_of(w, [t1]))
    assert res.exit_code == 0, res.output
    assert tags(w, t1) == set()  # confidence 0.95 is outside 0.0..0.4: removed, whoever applied it
    name = report["rows"][0]["evaluator"]
    assert audit(w, t1) == [("low-confidence", "apply", "human:admin"),
                            ("low-confidence", "remove", f"rule:{name}/low-confidence")]


def test_reconciliation_never_touches_a_tag_no_rule_names(w):
    ((t1, m1),) = calls(w, 1)
    w["judge"].answers[m1] = POS
    assert human(w, "add", t1, "escalated").status_code == 200
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", unique("unmanaged")), dataset_of(w, [t1])
    for _ in range(2):
        res, report = evaluate(w, ev, ds)
        assert res.exit_code == 0 and report["tag_changes"] == []
    assert tags(w, t1) == {"escalated"}
    assert audit(w, t1) == [("escalated", "apply", "human:admin")]


def test_a_delta_run_scores_and_reconciles_only_the_rows_added_since(w):
    rows = calls(w, 4)
    (t1, m1), (t2, m2), (t3, m3), (t4, m4) = rows
    w["judge"].answers.update({m1: NEG, m2: POS, m3: NEG, m4: POS})
    cases, _ = fetch_cases(w["store"], [Sampled(t1, "x"), Sampled(t2, "x")])
    path = w["tmp"] / "grows.jsonl"
    save_jsonl(path, cases)
    ev = seed_evaluator(w["tmp"] / "e.yaml", unique("delta"))
    assert evaluate(w, ev, path)[0].exit_code == 0
    # the old rows change: a full run would remove t1's tags and a human's managed tag on t2
    w["judge"].answers.update({m1: POS})
    assert human(w, "add", t2, "negative-sentiment").status_code == 200
    more, _ = fetch_cases(w["store"], [Sampled(t3, "x"), Sampled(t4, "x")])
    save_jsonl(path, cases + more)  # the dataset grows by two rows
    before = len(w["judge"].prompts)
    res, report = evaluate(w, ev, path, "delta")
    assert res.exit_code == 0, res.output
    assert len(w["judge"].prompts) - before == 2 and {r["target_id"] for r in report["rows"]} == {t3, t4}
    assert tags(w, t1) == {"negative-sentiment", "low-helpfulness", "low-confidence"}  # out of scope: untouched
    assert tags(w, t2) == {"negative-sentiment"}
    assert tags(w, t3) == {"negative-sentiment", "low-helpfulness", "low-confidence"} and tags(w, t4) == set()
    res, report = evaluate(w, ev, path, "delta")  # nothing new: nothing scored, nothing changed
    assert res.exit_code == 0 and report["rows"] == [] and report["tag_changes"] == []
    res, report = evaluate(w, ev, path, "full")  # a full run reconciles every row
    assert tags(w, t1) == set() and tags(w, t2) == set()


def test_a_preview_run_neither_applies_nor_removes(w):
    (t1, m1), (t2, m2) = calls(w, 2)
    w["judge"].answers.update({m1: NEG, m2: POS})
    assert human(w, "add", t2, "low-helpfulness").status_code == 200
    ev = seed_evaluator(w["tmp"] / "e.yaml", unique("preview"))
    res, report = evaluate(w, ev, dataset_of(w, [t1, t2]), "preview")
    assert res.exit_code == 0, res.output
    assert tags(w, t1) == set() and tags(w, t2) == {"low-helpfulness"}
    assert report["tag_changes"] == [] and ts.run_events(w["store"], report["run_id"]) == []
    rows = {r["target_id"]: r for r in report["rows"]}
    assert rows[t1]["applied_tags"] == [] and rows[t1]["matched_tags"] == ["negative-sentiment", "low-helpfulness",
                                                                           "low-confidence"]
    table = cli.invoke(eval_app, ["results", report["run_id"], "--dsn", w["store"].dsn]).output
    assert "Applied Tags (preview: not applied)" in table and "preview: no tag was applied or removed" in table


def test_session_mode_sees_the_whole_session_in_order_and_tags_the_session(w):
    sid, other = unique("Sess"), unique("sess")
    first = calls(w, 1, session=sid)  # the header ...
    rest = calls(w, 2, session=sid, via="metadata")  # ... or metadata.session_id
    (o1, om), (lone, _) = calls(w, 1, session=other)[0], calls(w, 1)[0]
    w["judge"].answers[first[0][1]] = NEG
    ev = seed_evaluator(w["tmp"] / "s.yaml", unique("session"), mode="session")
    # the dataset holds one call of the session (the last), one of another session, and one without a session
    res, report = evaluate(w, ev, dataset_of(w, [rest[-1][0], o1, lone]))
    assert res.exit_code == 0, res.output
    sess = ts.session_target_id(w["a"], sid)
    assert tags(w, f"session:{sess}") == {"negative-sentiment", "low-helpfulness", "low-confidence"}
    assert tags(w, rest[-1][0]) == set()  # session mode tags the session, not the message
    seen = [m for m in w["judge"].markers_seen() if first[0][1] in m]
    assert seen == [[first[0][1], rest[0][1], rest[1][1]]]  # every call of the session, oldest first
    rows = {r["target"]: r for r in report["rows"]}
    assert rows[f"session:{sess}"]["trace_ids"] == [first[0][0], rest[0][0], rest[1][0]]
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    assert [(r["trace_ids"], r["error"].split(" (")[0]) for r in skipped] == [([lone], "no session id")]
    # the session's tags count for each of its calls in stats
    n = w["store"].query(f"SELECT count() AS n FROM llm_calls WHERE tags['run'] = {{r:String}} AND "
                         f"{ts.has_tag_condition('{t:String}')}", {"r": w["run"], "t": "low-confidence"})
    assert n == [{"n": 3}]


def test_session_mode_on_calls_without_session_ids_names_and_counts_them(w):
    (t1, _), (t2, _) = calls(w, 2)
    ev = seed_evaluator(w["tmp"] / "s.yaml", unique("nosess"), mode="session")
    res, _ = evaluate(w, ev, dataset_of(w, [t1, t2]))
    assert res.exit_code == 2
    assert "is in session mode, but none of the 2 row(s) in its scope has a session: no session id" in res.output
    assert t1 in res.output


def test_message_and_session_targets_are_kept_apart(w):
    sid = unique("sess")
    (t1, m1), (t2, m2) = calls(w, 2, session=sid)
    w["judge"].answers.update({m1: NEG, m2: POS})
    msg = seed_evaluator(w["tmp"] / "m.yaml", unique("msg"), rules=[
        {"field": "user_sentiment", "tag": "negative-sentiment", "equals": "negative"}])
    ses = seed_evaluator(w["tmp"] / "s.yaml", unique("ses"), mode="session", rules=[
        {"field": "user_sentiment", "tag": "negative-sentiment", "equals": "negative"}])
    ds = dataset_of(w, [t1, t2])
    res, report = evaluate(w, msg, ds, "full", "--evaluator", str(ses))
    assert res.exit_code == 0, res.output
    sess = f"session:{ts.session_target_id(w['a'], sid)}"
    assert tags(w, t1) == {"negative-sentiment"} and tags(w, t2) == set()  # per message
    assert tags(w, sess) == {"negative-sentiment"}  # the session: its first marker's answer is NEG
    w["judge"].answers[m1] = POS
    res, report = evaluate(w, msg, ds, "full", "--evaluator", str(ses))
    assert tags(w, t1) == set() and tags(w, sess) == set()
    assert {(c["target_kind"], c["action"]) for c in report["tag_changes"]} == {("message", "remove"),
                                                                               ("session", "remove")}


def test_the_audit_log_has_one_row_per_change(w):
    ((t1, m1),) = calls(w, 1)
    name = unique("audit")
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", name), dataset_of(w, [t1])
    w["judge"].answers[m1] = NEG
    evaluate(w, ev, ds)
    evaluate(w, ev, ds)  # the same answer again: no change, no row
    w["judge"].answers[m1] = {**NEG, "confidence_score": 0.8}
    evaluate(w, ev, ds)
    assert human(w, "remove", t1, "low-helpfulness").status_code == 200
    assert human(w, "remove", t1, "low-helpfulness").status_code == 404  # not there any more
    assert human(w, "add", t1, "negative-sentiment").json()["changed"] is False  # already there
    assert audit(w, t1) == [  # a run's changes in tag order
        ("low-confidence", "apply", f"rule:{name}/low-confidence"),
        ("low-helpfulness", "apply", f"rule:{name}/low-helpfulness"),
        ("negative-sentiment", "apply", f"rule:{name}/negative-sentiment"),
        ("low-confidence", "remove", f"rule:{name}/low-confidence"),
        ("low-helpfulness", "remove", "human:admin")]
    with httpx.Client(base_url=w["gw"].url, headers=ADMIN) as h:
        api = h.get("/admin/tags/audit", params={"target": t1}).json()
    assert [(e["tag"], e["action"], e["actor"]) for e in api["events"]] == audit(w, t1)
    assert api["events"][3]["field"] == "confidence_score" and api["events"][3]["field_value"] == "0.8"
    out = cli.invoke(_tagway(), ["tags", "audit", t1, "--dsn", w["store"].dsn]).output
    assert out.count("rule:") == 4 and "human:admin" in out and "confidence_score=0.8" in out


def test_stats_by_applied_tag_gives_per_tenant_counts_that_match(w):
    a = calls(w, 5, customer=w["a"])
    b = calls(w, 3, customer=w["b"])
    for i, (_, m) in enumerate(a):
        w["judge"].answers[m] = NEG if i < 3 else POS  # a: 3 negative of 5
    for i, (_, m) in enumerate(b):
        w["judge"].answers[m] = NEG if i < 1 else {**POS, "confidence_score": 0.1}  # b: 1 negative, 2 low-confidence
    ev = seed_evaluator(w["tmp"] / "e.yaml", unique("stats"))
    assert evaluate(w, ev, dataset_of(w, [t for t, _ in a + b]))[0].exit_code == 0
    tagway = _tagway()
    res = cli.invoke(tagway, ["stats", "--by", "customer", "--where", "applied_tag=negative-sentiment",
                              "--where", f"tag.run={w['run']}", "--since", "1h", "--json", "--dsn", w["store"].dsn])
    assert res.exit_code == 0, res.output
    got = {s["key"]["customer"]: s["calls"] for s in orjson.loads(res.stdout)["segments"]}
    assert got == {w["a"]: 3, w["b"]: 1}
    # one complaint (with a score) on a call that carries three applied tags
    from exporters.feedback import feedback_row, insert_feedback, parse_feedback  # noqa: PLC0415
    insert_feedback(w["store"], [feedback_row(parse_feedback({"trace_id": a[0][0], "complaint": True, "score": 0.2}),
                                              customer=w["a"], key_id="k", by_admin=True)])
    res = cli.invoke(tagway, ["stats", "--by", "customer", "--by", "applied_tag", "--where", f"tag.run={w['run']}",
                              "--since", "1h", "--json", "--dsn", w["store"].dsn])
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.stdout)
    assert (report["total"]["complaints"], report["total"]["rated"]) == (1, 1), report["total"]  # counted once
    got = {(s["key"]["customer"], s["key"]["applied_tag"]): s["calls"] for s in report["segments"]}
    assert got == {(w["a"], "negative-sentiment"): 3, (w["a"], "low-helpfulness"): 3, (w["a"], "low-confidence"): 3,
                   (w["a"], ""): 2, (w["b"], "negative-sentiment"): 1, (w["b"], "low-helpfulness"): 1,
                   (w["b"], "low-confidence"): 3}
    assert report["total"]["calls"] == 8  # a call with three tags is counted once in the total
    res = cli.invoke(tagway, ["stats", "--where", "applied_tag!=low-confidence", "--where", f"tag.run={w['run']}",
                              "--since", "1h", "--json", "--dsn", w["store"].dsn])
    assert orjson.loads(res.stdout)["total"]["calls"] == 2
    with httpx.Client(base_url=w["gw"].url, timeout=10) as h:  # the same over the admin API
        d = h.get("/admin/stats", params={"by": "customer", "where": ["applied_tag=low-confidence",
                                                                     f"tag.run={w['run']}"], "since": "1h"},
                  headers=ADMIN).json()
        assert {s["key"]["customer"]: s["calls"] for s in d["segments"]} == {w["a"]: 3, w["b"]: 3}
        chart = h.get("/admin/charts", params={"by": "applied_tag", "where": f"tag.run={w['run']}", "since": "1h",
                                               "top": "10"}, headers=ADMIN).json()
        assert {s["key"]: s["calls"] for s in chart["series"]} == {"negative-sentiment": 4, "low-helpfulness": 4,
                                                                   "low-confidence": 6, "": 2}
        listed = h.get("/admin/calls", params={"where": ["applied_tag=negative-sentiment", f"tag.run={w['run']}"],
                                               "since": "1h"}, headers=ADMIN).json()
        assert sorted(c["trace_id"] for c in listed["calls"]) == sorted(t for t, m in a[:3] + b[:1])
    bad = cli.invoke(tagway, ["stats", "--where", "applied_tag=Not A Tag", "--dsn", w["store"].dsn])
    assert bad.exit_code == 2 and "invalid tag name" in bad.output


# -- errors are listed and left alone ------------------------------------------------------------------------------
def test_an_answer_that_fails_the_schema_is_an_errored_row_left_as_it_was(w):
    (t1, m1), (t2, m2), (t3, m3) = calls(w, 3)
    w["judge"].answers.update({m1: NEG, m2: NEG, m3: NEG})
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", unique("schema")), dataset_of(w, [t1, t2, t3])
    evaluate(w, ev, ds)
    w["judge"].answers.update({m1: POS, m2: {**POS, "expected_helpfulness": 2.5},  # not an integer
                               m3: "I think the user is negative."})  # not JSON at all
    res, report = evaluate(w, ev, ds)
    assert res.exit_code == 3
    rows = {r["target_id"]: r for r in report["rows"]}
    assert rows[t1]["status"] == "scored" and tags(w, t1) == set()
    assert rows[t2]["status"] == "errored" and "expected_helpfulness" in rows[t2]["error"]
    assert rows[t3]["status"] == "errored" and "does not fit the output schema" in rows[t3]["error"]
    for t in (t2, t3):  # their tags were left as they were
        assert tags(w, t) == {"negative-sentiment", "low-helpfulness", "low-confidence"}
    assert report["status"] == "incomplete" and report["summary"]["errored"] == 2
    table = cli.invoke(eval_app, ["results", report["run_id"], "--dsn", w["store"].dsn]).output
    assert "2 row(s) errored; their tags were left as they were" in table


@pytest.mark.parametrize("rules,message", [
    ([{"field": "mood", "tag": "x", "equals": "a"}], "tag rule 'x': field 'mood' is not in the output schema"),
    ([{"field": "user_sentiment", "tag": "angry", "equals": "furious"}],
     "tag rule 'angry': 'furious' is not one of the choices of 'user_sentiment'"),
    ([{"field": "summary", "tag": "long", "range": [1, 2]}], "tag rule 'long': a range on the string field 'summary'"),
    ([{"field": "expected_helpfulness", "tag": "low", "range": [1.5, 2]}], "tag rule 'low': the bounds of a range on "
                                                                            "the integer field"),
    ([{"field": "confidence_score", "tag": "Low Confidence", "range": [0, 0.4]}], "is not a valid tag name"),
    ([{"field": "confidence_score", "tag": "lc", "equals": 0.1, "range": [0, 1]}], "give exactly one condition"),
])
def test_rules_that_do_not_fit_the_schema_are_refused_when_saved(w, rules, message):
    ev = seed_evaluator(w["tmp"] / "bad.yaml", unique("bad"), rules=rules)
    doc = ev.read_text().replace("output:\n", "output:\n  summary: {type: string, rubric: one line}\n")
    ev.write_text(doc)
    res = cli.invoke(eval_app, ["save", str(ev), "--dsn", w["store"].dsn])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_saving_versions_evaluators_and_unknown_ones_are_one_line(w):
    ev = seed_evaluator(w["tmp"] / "v.yaml", unique("ver"))
    args = ["--dsn", w["store"].dsn]
    assert "saved evaluator" in cli.invoke(eval_app, ["save", str(ev), *args]).output
    assert "unchanged: evaluator" in cli.invoke(eval_app, ["save", str(ev), *args]).output
    ev.write_text(ev.read_text() + "description: a new rubric note\n")
    assert "version 2" in cli.invoke(eval_app, ["save", str(ev), *args]).output
    res = cli.invoke(eval_app, ["run", "--evaluator", "no-such-evaluator", "--dataset", "nope", *args])
    assert res.exit_code == 2 and "no evaluator 'no-such-evaluator'" in res.output
    ((t1, _),) = calls(w, 1)
    res, _ = evaluate(w, ev, dataset_of(w, [t1]), "sideways")
    assert res.exit_code == 2 and "--mode 'sideways'" in res.output
    res, _ = evaluate(w, ev, unique("no-such-dataset"))
    assert res.exit_code == 2 and "no dataset 'no-such-dataset-" in res.output and "Traceback" not in res.output


# -- concurrency ---------------------------------------------------------------------------------------------------
def test_a_run_fails_clearly_when_another_run_holds_its_tags(w):
    ((t1, m1),) = calls(w, 1)
    w["judge"].answers[m1] = NEG
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", unique("lock")), dataset_of(w, [t1])
    holder = ts.TagLock(w["store"], ["tag:low-confidence"], run_id="someone-else", holder="test").acquire()
    try:
        res, report = evaluate(w, ev, ds, "full", "--lock-wait", "0.5")
    finally:
        holder.release()
    assert res.exit_code == 3 and tags(w, t1) == set()
    assert report["status"] == "unreconciled" and report["rows"][0]["status"] == "scored"  # the scores are kept
    assert "tag:low-confidence is being reconciled by someone-else" in report["summary"]["reconcile_error"]
    assert get_run(w["store"], report["run_id"]).status == "unreconciled"
    res, report = evaluate(w, ev, ds, "delta")  # an unreconciled run covered nothing: delta takes the row again
    assert res.exit_code == 0 and tags(w, t1) == {"negative-sentiment", "low-helpfulness", "low-confidence"}


def test_two_runs_on_the_same_tags_take_turns(w):
    rows = calls(w, 6)
    for _, m in rows:
        w["judge"].answers[m] = NEG
    jobs = [(seed_evaluator(w["tmp"] / f"e{i}.yaml", unique(f"turns{i}")), dataset_of(w, [t for t, _ in part]))
            for i, part in enumerate((rows[:3], rows[3:]))]
    reports: list = []

    def run(ev, ds):  # the Python API (typer's CliRunner swaps sys.stdout: one at a time)
        evs = resolve_evaluators(w["store"], [str(ev)])
        opts = EvalOptions(gateway_url=w["gw"].url, api_key=ADMIN_KEY, lock_wait=60)
        reports.append(asyncio.run(run_evaluation(w["store"], evs, ds, opts)).run)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(reports) == 2 and all(r.status == "complete" for r in reports)  # the second waited
    versions = [[e["version"] for e in ts.run_events(w["store"], r.run_id)] for r in reports]
    assert [len(v) for v in versions] == [9, 9]
    first, second = sorted(versions)
    assert max(first) < min(second)  # never interleaved


def test_the_tag_lock_excludes(chdb_store):
    key = [f"tag:{unique('mutex')}"]
    spans: list[tuple[float, float]] = []

    def worker() -> None:
        for _ in range(3):
            with ts.TagLock(chdb_store, key, run_id="t", holder="t", wait=60, poll=0.02):
                start = time.monotonic()
                time.sleep(0.03)
                spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    spans.sort()
    assert len(spans) == 12 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _tagway() -> typer.Typer:
    app = typer.Typer()
    stats_cli.register(app)
    tags_cli.register(app)
    return app


# -- people's tags, tenants, session ids ---------------------------------------------------------------------------
def test_people_tag_through_the_cli_and_tenants_only_their_own_calls(w):
    tagway, dsn = _tagway(), ["--dsn", w["store"].dsn]
    mine, _ = w["traffic"].call("", key=KEYS["acme"])  # recorded as acme, by acme's own key
    theirs, _ = w["traffic"].call("", key=KEYS["support"])
    sid = unique("sess")
    in_session, _ = w["traffic"].call("", key=KEYS["acme"], session=sid)
    w["traffic"].flush(w["store"], [mine, theirs, in_session])
    res = cli.invoke(tagway, ["tags", "add", mine, "needs-review", "--actor", "ana", *dsn])
    assert res.exit_code == 0 and f"added needs-review to message:{mine} (as human:ana)" in res.output
    res = cli.invoke(tagway, ["tags", "remove", mine, "never-there", *dsn])
    assert res.exit_code == 2 and "does not carry the tag 'never-there'" in res.output
    res = cli.invoke(tagway, ["tags", "add", "session:acme/no-such-session", "x", *dsn])
    assert res.exit_code == 2 and "no session session:acme/no-such-session in the store" in res.output
    res = cli.invoke(tagway, ["tags", "add", mine, "Needs Review", *dsn])
    assert res.exit_code == 2 and "invalid tag name 'Needs Review'" in res.output
    # a tenant key tags its own calls and sessions through /v1/tagway/tags, audited with its key id
    r = human(w, "add", mine, "wrong-answer", key=KEYS["acme"], prefix="/v1/tagway")
    assert r.status_code == 200 and r.json()["event"]["actor"] == "human:acme-1"
    r = human(w, "add", f"session:{sid}", "angry-user", key=KEYS["acme"], prefix="/v1/tagway")
    assert r.status_code == 200 and r.json()["target"] == f"session:acme/{sid}"
    assert tags(w, f"session:acme/{sid}") == {"angry-user"}
    for target in (theirs, f"session:{unique('none')}"):  # another tenant's call, a session it does not have
        r = human(w, "add", target, "x", key=KEYS["acme"], prefix="/v1/tagway")
        assert r.status_code == 404 and r.json()["error"]["code"] == "target_not_found"
    with httpx.Client(base_url=w["gw"].url, timeout=10) as h:
        acme = {"authorization": f"Bearer {KEYS['acme']}"}
        got = h.get("/v1/tagway/tags", params={"target": mine}, headers=acme).json()
        assert [t["tag"] for t in got["tags"]] == ["needs-review", "wrong-answer"]
        log = h.get("/v1/tagway/tags/audit", params={"target": mine}, headers=acme).json()["events"]
        assert [(e["tag"], e["actor"]) for e in log] == [("needs-review", "human:ana"),
                                                         ("wrong-answer", "human:acme-1")]
        assert h.get("/admin/tags/audit", params={"target": mine}, headers=acme).status_code == 403
        bad = h.post("/admin/tags", json={"target": mine, "tag": "-x"}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tag"
        bad = h.post("/admin/tags", json={"target": mine}, headers=ADMIN)
        assert bad.status_code == 400 and "tag" in bad.json()["error"]["message"]
    out = cli.invoke(tagway, ["tags", "list", mine, "--json", *dsn]).stdout
    assert [t["tag"] for t in orjson.loads(out)["tags"]] == ["needs-review", "wrong-answer"]


def test_every_call_records_its_session_id(w):
    sid = "Conv/Ab-" + uuid.uuid4().hex[:6]  # opaque: case and punctuation are kept
    (by_header, _), (by_meta, _), (none, _) = (w["traffic"].call(w["a"], session=sid),
                                               w["traffic"].call(w["a"], session=sid, via="metadata"),
                                               w["traffic"].call(w["a"]))
    w["traffic"].flush(w["store"], [by_header, by_meta, none])
    rows = {r["trace_id"]: (r["session_id"], dict(r["tags"])) for r in w["store"].query(
        "SELECT trace_id, session_id, tags FROM llm_calls WHERE trace_id IN {ids:Array(String)}",
        {"ids": [by_header, by_meta, none]})}
    assert rows[by_header][0] == rows[by_meta][0] == sid and rows[none][0] == ""
    assert rows[by_meta][1]["session_id"] == sid.lower().replace("/", "_")  # still a (normalised) tag, as before
    with httpx.Client(base_url=w["gw"].url, timeout=10) as h:
        r = h.post("/v1/chat/completions", json={"model": "gpt-test", "messages": [{"role": "user", "content": "x"}]},
                   headers={"authorization": f"Bearer {KEYS['acme']}", "x-tagway-session-id": "s" * 129})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_session_id"


def test_a_deterministic_evaluator_keeps_pass_score_and_reason(w):
    (t1, _), (t2, _) = calls(w, 2)
    ev = w["tmp"] / "det.yaml"
    ev.write_text(f"name: {unique('echo')}\ntype: similar\nvalue: 'Echo: ticket'\nthreshold: 0.5\n")
    res, report = evaluate(w, ev, dataset_of(w, [t1, t2]))
    assert res.exit_code == 0, res.output
    row = report["rows"][0]
    assert row["status"] == "scored" and row["passed"] is True and 0.5 < row["score"] < 1
    assert "similarity" in row["reason"] and row["fields"] == {"similarity": pytest.approx(row["score"])}
    assert row["applied_tags"] == [] and report["tag_changes"] == []


def test_a_refused_run_stores_nothing_and_an_interrupted_one_is_incomplete(w, monkeypatch):
    """Refused before the run row is written (as replay runs and `dataset populate` are): no gateway, an unreachable
    one; they were listed `running` for ever. A run stopped midway where the store still answers is `incomplete`."""
    from replay import runner
    from replay.evals import run as eval_run
    from tests.http_server import free_port

    ((t1, m1),) = calls(w, 1)
    w["judge"].answers[m1] = NEG
    ev, ds = seed_evaluator(w["tmp"] / "e.yaml", unique("refused")), dataset_of(w, [t1])
    for gateway, says in (([], "no gateway"), (["--gateway", f"http://127.0.0.1:{free_port()}"], "unreachable")):
        run_id = f"refused-{uuid.uuid4().hex[:8]}"
        res = cli.invoke(eval_app, ["run", "--evaluator", str(ev), "--dataset", ds, "--dsn", w["store"].dsn,
                                    "--api-key", ADMIN_KEY, "--run-id", run_id, *gateway])
        assert res.exit_code == 2 and says in res.output, res.output
        assert get_run(w["store"], run_id) is None

    async def stopped(*a, **k):  # the judge's gateway goes away after the first (probe) call
        raise runner.FatalRunError("gateway unreachable after 4 attempt(s)", unreachable=True)

    monkeypatch.setattr(eval_run, "_score_all", stopped)
    run_id = f"stopped-{uuid.uuid4().hex[:8]}"
    res = cli.invoke(eval_app, ["run", "--evaluator", str(ev), "--dataset", ds, "--dsn", w["store"].dsn,
                                "--gateway", w["gw"].url, "--api-key", ADMIN_KEY, "--run-id", run_id])
    assert res.exit_code != 0 and "Traceback" not in res.output
    run = get_run(w["store"], run_id)
    assert run is not None and run.status == "incomplete" and "unreachable" in run.summary["interrupted"]
