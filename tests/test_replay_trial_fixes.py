"""Defects a user trial of replay found, each against the code that had it: a budget-stopped run's report names the
segments it never reached and says the budget stopped it; a re-run baseline's (and the judge's) cost is in the
printed cost, each part named; `plan` checks the models the spec calls against the gateway; an invalid flag value is
blamed on the flag, not the spec file; `report --out` writes the file and says so in one line; `resume` and the
pytest plugin load python evaluators before any call, as `run` does.

chDB (the suite's shared store) and real HTTP servers: FakeLLM playing the gateway, or the real gateway app."""
from __future__ import annotations

import os
import sys

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from replay.cli import replay_app
from replay.spec import Gating
from replay.report import NOT_RUN, aggregate
from tests.replay_support import API_KEY, FakeLLM, call_span, record, unique

pytest_plugins = ["pytester"]

cli = CliRunner()


def invoke(*args: object):
    return cli.invoke(replay_app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(res) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture()
def world(chdb_store, tmp_path):
    """Three customers of 6 calls each; a candidate that answers like production, a baseline re-run on its own
    model; calls cost $0.001 each."""
    customers = [unique(c) for c in ("acme", "globex", "initech")]
    record(chdb_store, [call_span(customer=c, intent="refund", user=f"refund #{i}", answer="approved")
                        for c in customers for i in range(6)])
    spec = {"slice": {"customer": customers, "since": "1h", "segment_by": ["customer"],
                      "sampling": {"min_per_segment": 6, "seed": 1}},
            "candidates": [{"name": "cand", "model": "cand-model"}],
            "baseline": {"mode": "rerun", "model": "base-model"},
            "evaluators": [{"type": "icontains", "value": "approved"}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with FakeLLM({"cand-model": lambda u, h: "approved", "base-model": lambda u, h: "approved"}) as gw:
        yield {"customers": customers, "spec": path, "gw": gw, "dsn": chdb_store.dsn, "tmp": tmp_path,
               "store": chdb_store,
               "common": ["--dsn", chdb_store.dsn, "--gateway", gw.url, "--api-key", API_KEY, "--no-progress"]}


# -- 1 and 4: what a budget stop left out, and what the run cost ---------------------------------------------------

def test_a_budget_stopped_run_lists_the_segments_it_never_reached_and_says_the_budget_stopped_it(world):
    """$0.0015 pays the two probe calls (the first case, on the baseline and the candidate) and nothing after: the
    report showed one segment, as if the slice had one, and `cost $0.0010   OK`."""
    first, *rest = sorted(world["customers"])
    run_id = unique("budget")
    res = invoke("run", "--spec", world["spec"], *world["common"], "--run-id", run_id, "--max-cost", "0.0015",
                 "--concurrency", "1")
    assert res.exit_code == 3, res.output
    out = res.stdout
    ran = [c for c in world["customers"] if any(c in line and "1.000" in line for line in out.splitlines())]
    assert len(ran) == 1, out
    missing = sorted(set(world["customers"]) - set(ran))
    for seg in missing:  # every segment it did not reach is a row, marked
        row = next(line for line in out.splitlines() if line.strip().startswith(seg))
        assert "not run (6 case(s))" in row, row
    assert f"not run: segment(s) {', '.join(missing)} (12 case(s)): the run stopped before any of them" in out
    # the cost lines say the budget stopped it, and what the baseline's re-run cost beside the candidate's
    # (one case is too few to judge: inconclusive so far; a segment that passed said `OK` there the same way)
    stop = "the budget stopped the run: spent $0.002000 of max_cost $0.0015"
    assert f"cost $0.0010   INCONCLUSIVE so far ({stop})" in out, out
    assert f"run cost $0.0020: candidate cand $0.0010, baseline (re-run) $0.0010; {stop}" in out, out

    # `report` rebuilds the same from the store, in every format
    res = invoke("report", run_id, "--dsn", world["dsn"], "--format", "json")
    assert res.exit_code == 3, res.output
    rep = orjson.loads(res.stdout)
    rows = {r["segment"]: r for r in rep["candidates"][0]["rows"]}
    assert sorted(rows) == sorted(world["customers"])
    assert [rows[s]["verdict"] for s in missing] == [NOT_RUN, NOT_RUN] and rows[missing[0]]["not_run"] == 6
    assert rows[ran[0]]["not_run"] == 5 and rep["segments"] == {c: 6 for c in world["customers"]}
    assert rep["stop_reason"] == "budget reached: spent $0.002000 of max_cost $0.0015" and rep["run_cost_usd"] == \
        pytest.approx(0.002)
    md = invoke("report", run_id, "--dsn", world["dsn"], "--format", "md").stdout
    assert f"| {missing[0]} | 0 |" in md and "not run (6 case(s))" in md
    assert "the budget stopped the run: spent $0.002000 of max_cost $0.0015" in md
    html = invoke("report", run_id, "--dsn", world["dsn"], "--format", "html").stdout
    assert f'<tr class="not run" data-segment="{missing[0]}">' in html and 'id="run-cost"' in html
    gh = invoke("report", run_id, "--dsn", world["dsn"], "--format", "github").stdout
    assert f"| {missing[0]} | 0 |" in gh and "baseline (re-run) $0.0010" in gh

    # resumed to the end: nothing is marked not run, the budget line is gone, the costs add up
    res = invoke("resume", run_id, *world["common"], "--max-cost", "1", "--format", "json")
    assert res.exit_code == 0, res.output
    done = orjson.loads(res.stdout)
    assert all(r["verdict"] != NOT_RUN and r["not_run"] == 0 for r in done["candidates"][0]["rows"])
    assert done["stop_reason"] == "" and done["run_cost_usd"] == pytest.approx(0.036)
    assert invoke("report", run_id, "--dsn", world["dsn"]).stdout.count("the budget stopped") == 0


def test_a_complete_run_with_a_rerun_baseline_prints_its_cost_in_its_parts(world):
    res = invoke("run", "--spec", world["spec"], *world["common"], "--customer", world["customers"][0])
    assert res.exit_code == 0, res.output
    # the baseline's 6 calls were paid too: the printed cost was the candidate's $0.0060 alone
    assert "run cost $0.012: candidate cand $0.0060, baseline (re-run) $0.0060" in res.stdout, res.stdout


def test_a_candidate_the_budget_stopped_before_its_first_call_is_listed():
    """Two candidates, the second never called: it was missing from the report altogether."""
    from types import SimpleNamespace
    rows = [SimpleNamespace(candidate=c, case_id=f"c{i}", segment="a", status="passed", error="", output="ok",
                            evaluations=[], cost_usd=0.001) for c in ("baseline", "one") for i in range(3)]
    r = aggregate(rows, Gating(), run_id="r", status="incomplete", models={"one": "m1", "two": "m2"},
                  segments={"a": 3, "b": 2}, stop_reason="budget reached: spent $0.0060 of max_cost $0.005")
    by = {c.candidate: c for c in r.candidates}
    assert sorted(by) == ["one", "two"] and r.exit_code == 3 and by["two"].status == "inconclusive"
    assert "two: candidate two has no result: the run stopped before any of its calls; nothing to gate on" in \
        r.reasons
    assert [(x.segment, x.verdict, x.not_run) for x in by["two"].rows] == [("a", NOT_RUN, 3), ("b", NOT_RUN, 2)]
    assert [(x.segment, x.verdict, x.not_run) for x in by["one"].rows] == [("a", "inconclusive", 0), ("b", NOT_RUN, 2)]
    assert any("segment(s) b (2 case(s)): the run stopped before any of them ran for candidate one" in x
               for x in r.reasons), r.reasons


def test_a_candidate_not_run_leaves_an_unfinished_run_incomplete_not_inconclusive():
    """An A/A run the budget stopped before its second candidate's first call: the first found nothing, the second
    is listed as not run. Its verdict (the run row's, the shadow record's, the pytest plugin's header) read
    "inconclusive", as if the evidence were mixed, when the run was unfinished. A complete run reads as before."""
    from types import SimpleNamespace

    from replay.render import render_markdown
    rows = [SimpleNamespace(candidate=c, case_id=f"c{i}", segment="a", status="passed", error="", output="ok",
                            evaluations=[], cost_usd=0.001) for c in ("baseline", "one") for i in range(300)]
    r = aggregate(rows, Gating(), run_id="r", status="incomplete", models={"one": "m1", "two": "m2"},
                  segments={"a": 300}, stop_reason="budget reached: spent $0.6000 of max_cost $0.6")
    by = {c.candidate: c for c in r.candidates}
    assert by["one"].status == "ok" and by["two"].status == "inconclusive"  # still listed, its segment not run
    assert (r.verdict, r.exit_code, r.passed) == ("incomplete", 3, False)
    assert "**Verdict: INCOMPLETE** (exit 3)" in render_markdown(r)
    # what did run still speaks: a regression (or an inconclusive segment) of a candidate that ran is the verdict
    worse = [x if x.candidate == "baseline" or int(x.case_id[1:]) >= 60 else SimpleNamespace(**{**vars(x),
             "status": "failed"}) for x in rows]
    assert aggregate(worse, Gating(), run_id="r", status="incomplete", models={"one": "m1", "two": "m2"},
                     segments={"a": 300}).verdict == "regression"
    # every candidate stopped before (the re-run baseline's probe spent the budget): incomplete too
    base_only = [x for x in rows if x.candidate == "baseline"]
    assert aggregate(base_only, Gating(), run_id="r", status="incomplete", models={"one": "m1"},
                     segments={"a": 300}).verdict == "incomplete"
    # a complete run: unchanged
    assert aggregate(rows, Gating(), run_id="r", models={"one": "m1"}, segments={"a": 300}).verdict == "passed"


def test_a_run_stopped_before_its_candidates_first_call_is_stored_as_incomplete(world):
    """$0.0005 pays the re-run baseline's probe only: the candidate is never called. The run row (and every
    format) said "inconclusive"."""
    from replay.store import get_run
    run_id = unique("nocall")
    res = invoke("run", "--spec", world["spec"], *world["common"], "--run-id", run_id, "--max-cost", "0.0005",
                 "--concurrency", "1", "--format", "json")
    assert res.exit_code == 3, res.output
    rep = orjson.loads(res.stdout)
    assert rep["verdict"] == "incomplete" and rep["candidates"][0]["rows"][0]["verdict"] == NOT_RUN, rep["verdict"]
    assert "candidate cand has no result: the run stopped before any of its calls; nothing to gate on" in \
        rep["reasons"]
    assert get_run(world["store"], run_id).verdict == "incomplete"
    res = invoke("report", run_id, "--dsn", world["dsn"])
    assert res.exit_code == 3 and "VERDICT: INCOMPLETE (exit 3)" in res.stdout, res.stdout


def test_report_on_a_running_run_says_not_run_yet(world):
    """`report RUN_ID` on a run still running said its unreached segments and candidate were left because "the run
    stopped before" them. It has not stopped: they are not run yet."""
    import dataclasses

    from replay.pipeline import GateState
    from replay.store import get_run, write_run
    run_id = unique("live")
    res = invoke("run", "--spec", world["spec"], *world["common"], "--run-id", run_id, "--max-cost", "0.0015",
                 "--concurrency", "1")
    assert res.exit_code == 3, res.output
    store = world["store"]
    run = get_run(store, run_id)
    # as the row reads while the run is under way: running, what it wrote before its first report
    write_run(store, dataclasses.replace(run, status="running", verdict="",
                                         report_json=GateState.from_report_json(run.report_json).stored_json()))
    assert get_run(store, run_id).status == "running"
    res = invoke("report", run_id, "--dsn", world["dsn"])
    assert res.exit_code == 3, res.output
    out = res.stdout
    assert "stopped" not in out, out
    ran = [c for c in world["customers"] if any(c in line and "1.000" in line for line in out.splitlines())]
    missing = sorted(set(world["customers"]) - set(ran))
    assert len(ran) == 1, out
    for seg in missing:
        row = next(line for line in out.splitlines() if line.strip().startswith(seg))
        assert "not run yet (6 case(s))" in row, row
    assert f"not run yet: segment(s) {', '.join(missing)} (12 case(s)): none of them has run for candidate cand " \
        "yet (the run is still running)" in out, out
    rep = orjson.loads(invoke("report", run_id, "--dsn", world["dsn"], "--format", "json").stdout)
    rows = {r["segment"]: r for r in rep["candidates"][0]["rows"]}
    assert rows[missing[0]]["why"].startswith("not run yet:") and rows[missing[0]]["not_run_yet"] is True
    assert "5 not run yet" in invoke("report", run_id, "--dsn", world["dsn"], "--format", "md").stdout

    # a candidate not called yet: "not run yet", and the run's verdict is incomplete
    only_base = unique("live0")
    assert invoke("run", "--spec", world["spec"], *world["common"], "--run-id", only_base, "--max-cost", "0.0005",
                  "--concurrency", "1").exit_code == 3
    run = get_run(store, only_base)
    write_run(store, dataclasses.replace(run, status="running", verdict="",
                                         report_json=GateState.from_report_json(run.report_json).stored_json()))
    rep = orjson.loads(invoke("report", only_base, "--dsn", world["dsn"], "--format", "json").stdout)
    assert rep["verdict"] == "incomplete"
    assert "candidate cand has no result: not run yet (the run is still running); nothing to gate on" in \
        rep["reasons"], rep["reasons"]
    assert not any("stopped" in x for x in rep["reasons"]), rep["reasons"]


# -- 2: plan checks the models, as run does ------------------------------------------------------------------------

@pytest.fixture()
def real_gateway(chdb_dsn, chdb_store, tmp_path):
    from gateway.app import TagwayApp
    from gateway.auth import hash_key
    from gateway.config import GatewayConfig
    from tests.gateway_fixture import GatewayServer
    key = "tw-trial-fixes-platform-0123456789abcdef"
    os.environ["TRIAL_FIXES_UPSTREAM_KEY"] = "sk-upstream"
    with FakeLLM({"mini-up": lambda u, h: "approved"}, require_key=None) as upstream:
        up = {"provider": "openai", "base_url": upstream.url + "/v1", "api_key_env": "TRIAL_FIXES_UPSTREAM_KEY"}
        cfg = GatewayConfig(models=[{"name": "gpt-4o-mini", "model": "mini-up", **up}],
                            tenants=[{"customer": "platform", "may_set_customer": True,
                                      "keys": [{"id": "platform-1", "hash": hash_key(key)}]}],
                            storage={"dsn": chdb_dsn, "spool_dir": str(tmp_path / "spool")})
        server = GatewayServer(TagwayApp(cfg)).start()
        try:
            yield server, key
        finally:
            server.stop()


def test_plan_reports_a_model_the_gateway_does_not_serve(real_gateway, chdb_store, tmp_path):
    server, key = real_gateway
    customer = unique("planco")
    record(chdb_store, [call_span(customer=customer, intent="refund", user=f"q{i}", answer="ok") for i in range(4)])
    spec = {"slice": {"customer": [customer], "since": "1h", "segment_by": ["customer"]},
            "candidates": [{"name": "mini", "model": "gpt-4o-minii"}],
            "evaluators": [{"type": "icontains", "value": "ok"}]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    gw = ["--dsn", chdb_store.dsn, "--gateway", server.url, "--api-key", key]
    res = invoke("plan", "--spec", path, *gw)
    assert res.exit_code == 2 and one_error_line(res) == (
        "error: candidate mini: model 'gpt-4o-minii' is not served by the gateway (or not to this key); did you "
        "mean 'gpt-4o-mini'?: GET /v1/models lists the models it serves"), res.output
    # a judge's model is checked too, as `run` checks it
    spec["candidates"][0]["model"] = "gpt-4o-mini"
    spec["evaluators"] = [{"type": "llm_judge", "value": "ok?", "model": "judge-x", "judge_version": "j1"}]
    path.write_text(yaml.safe_dump(spec))
    res = invoke("plan", "--spec", path, *gw)
    assert res.exit_code == 2 and "judge llm_judge: model 'judge-x' is not served" in one_error_line(res)
    spec["evaluators"] = [{"type": "icontains", "value": "ok"}]
    path.write_text(yaml.safe_dump(spec))
    res = invoke("plan", "--spec", path, *gw)
    assert res.exit_code == 0 and customer in res.stdout and "not checked" not in res.output, res.output
    # without a gateway plan still plans, and says the models went unchecked
    res = invoke("plan", "--spec", path, "--dsn", chdb_store.dsn, "--format", "json")
    assert res.exit_code == 0 and orjson.loads(res.stdout)["models_checked"] is False
    assert "the models the spec calls were not checked (no gateway)" in res.stderr


# -- 3: a flag's bad value names the flag ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,line", [
    (["run", "--since", "7x"], "error: --since 7x: invalid window '7x'"),
    (["run", "--segment-by", "colour"], "error: --segment-by colour: unknown group-by column 'colour'"),
    (["run", "--segment-by", ""], "error: --segment-by '': segment_by needs at least one key"),
    (["run", "--tag", "Region Name=eu"], "error: --tag 'Region Name=eu': invalid tag key 'Region Name'"),
    (["plan", "--since", "3q"], "error: --since 3q: invalid window '3q'"),
    (["plan", "--segment-by", "colour"], "error: --segment-by colour: unknown group-by column"),
    (["dataset", "save", "some-id", "--limit", "0"], "error: --limit 0: Input should be greater than or equal to 1"),
    (["dataset", "save", "some-id", "--since", "7x"], "error: --since 7x: invalid window"),
    (["report", "--shadow", "--alpha", "0.7"], "error: --alpha 0.7: Input should be less than 0.5"),
    (["report", "--shadow", "--segment-by", "colour"], "error: --segment-by colour: unknown group-by column"),
    (["trend", "--dataset", "x", "--alpha", "0.7"], "error: --alpha 0.7: Input should be less than 0.5"),
])
def test_an_invalid_flag_value_names_the_flag_not_the_spec_file(args, line, chdb_store, tmp_path):
    spec = tmp_path / "flags.yaml"
    spec.write_text(yaml.safe_dump({"slice": {"customer": ["acme"], "since": "1h"},
                                    "candidates": [{"name": "c", "model": "m"}],
                                    "evaluators": [{"type": "icontains", "value": "ok"}]}))
    extra = [] if args[0] == "trend" else ["--spec", spec]
    res = invoke(*args, *extra, "--dsn", chdb_store.dsn)
    got = one_error_line(res)
    assert res.exit_code == 2 and got.startswith(line) and str(spec) not in got, got


# -- 6: report --out ------------------------------------------------------------------------------------------------

def test_report_out_writes_the_file_and_prints_one_line(world):
    run_id = unique("out")
    assert invoke("run", "--spec", world["spec"], *world["common"], "--run-id", run_id,
                  "--customer", world["customers"][1]).exit_code == 0
    target = world["tmp"] / "r.json"
    res = invoke("report", run_id, "--dsn", world["dsn"], "--format", "json", "--out", target)
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and res.stderr == f"report written to {target}\n", res.output
    assert orjson.loads(target.read_text())["run_id"] == run_id


# -- 7: python evaluators load before any call: resume and the pytest plugin ------------------------------------------

def test_resume_loads_python_evaluators_before_any_call(world, tmp_path, monkeypatch):
    """The run loaded `mod:fn` from beside its spec; a resume from elsewhere (no --spec-dir) paid for every case
    left and failed each in the evaluator. Now it is exit 2 first, naming where it looked."""
    mod = "trialeval_" + unique("m").replace("-", "_")
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / f"{mod}.py").write_text("def fn(output, context):\n    return 'approved' in output\n")
    spec = yaml.safe_load(world["spec"].read_text())
    spec["evaluators"] = [{"type": "python", "value": f"{mod}:fn"}]
    (evals / "spec.yaml").write_text(yaml.safe_dump(spec))
    run_id = unique("pyeval")
    res = invoke("run", "--spec", evals / "spec.yaml", *world["common"], "--run-id", run_id, "--max-cost", "0.004",
                 "--concurrency", "1")
    assert res.exit_code == 3, res.output
    # another process, elsewhere: the module is not importable from there
    sys.modules.pop(mod, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(evals), str(evals.resolve()))])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sent = len(world["gw"].chat_requests())
    res = invoke("resume", run_id, *world["common"], "--max-cost", "1")
    line = one_error_line(res)
    assert res.exit_code == 2 and line.startswith(
        f"error: run {run_id} spec: evaluators: python: cannot load '{mod}:fn': No module named '{mod}' (looked in "
        f"{elsewhere.resolve()}"), line
    assert "--spec-dir DIR" in line and len(world["gw"].chat_requests()) == sent  # nothing paid for
    res = invoke("resume", run_id, *world["common"], "--max-cost", "1", "--spec-dir", evals)
    assert res.exit_code == 0, res.output
    assert len(world["gw"].chat_requests()) == 36


def test_the_pytest_plugin_loads_python_evaluators_before_any_call(pytester, tmp_path, monkeypatch):
    """The gate ran every case through the gateway and failed each in the evaluator; now the test fails with the
    one line and the gateway gets no request."""
    from replay.datasets import save_jsonl
    from replay.slice import Case
    for var in ("TAGWAY_CONFIG", "TAGWAY_DSN", "TAGWAY_GATEWAY_URL", "TAGWAY_API_KEY", "TAGWAY_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    out = [{"role": "assistant", "parts": [{"type": "text", "content": "approved"}], "finish_reason": "stop"}]
    save_jsonl(pytester.path / "cases.jsonl",
               [Case(unique("case"), "acme", customer="acme", model="prod-model",
                     messages=[{"role": "user", "content": f"refund #{i}"}], baseline_output=out) for i in range(3)])
    (pytester.path / "gate.yaml").write_text(yaml.safe_dump({
        "dataset": "cases.jsonl", "candidates": [{"name": "cand", "model": "cand-model"}],
        "evaluators": [{"type": "python", "value": "nomodule_here:fn"}]}))
    pytester.makepyfile(test_gate="""
        def test_gate(tagway_gate):
            tagway_gate(spec="gate.yaml")
    """)
    with FakeLLM({"cand-model": lambda u, h: "approved"}) as gw:
        res = pytester.runpytest_subprocess("--tagway-gateway", gw.url, "--tagway-api-key", API_KEY,
                                            "--tagway-dsn", f"chdb://{tmp_path / 'store'}", "-p", "no:cacheprovider")
        requests = list(gw.requests)
    res.assert_outcomes(failed=1)
    text = res.stdout.str()
    assert "gate.yaml: evaluators: python: cannot load 'nomodule_here:fn': No module named 'nomodule_here'" in text
    assert "nothing was run" in text and "Traceback" not in text
    assert requests == []  # no call, not even the gateway check
