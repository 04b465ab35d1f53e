"""Auto-populating datasets (issue 13, seed 002: a delta run "is started automatically when a dataset
auto-populates"): production calls driven through the real gateway with the openai SDK (recording into the shared
chDB store), the deterministic judge double behind it, `tagway dataset auto-populate` / `populate`, and the
versions, eval runs, tags and audit log read back from the store."""
from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid

import orjson
import pytest
import typer
from typer.testing import CliRunner

from exporters import datasets as core
from exporters import tagstate as ts
from exporters.autopopulate import last_population
from exporters.evals import get_run, list_runs
from exporters.vocabulary import JUDGE_SOURCE, NON_PRODUCTION_SOURCES, REPLAY_SOURCE
from replay.datasets import cli as datasets_cli
from replay.datasets.autopopulate import is_sampled
from replay.datasets.populate import GRACE, Row, lock_key, pick, populate
from replay.datasets.populate_cli import watch
from replay.evals.cli import eval_app
from replay.evals.populate import populate_and_evaluate
from replay.evals.run import EvalOptions
from replay.runner import FatalRunError
from tests.gateway_fixture import ADMIN_KEY, recorded_gateway
from tests.replay_support import call_span, record
from tests.tag_rules_support import JUDGE_MODEL, JudgeDouble, Traffic, seed_evaluator, unique

cli = CliRunner()
app = typer.Typer()
datasets_cli.register(app)
NEG = {"user_sentiment": "negative", "expected_helpfulness": 2, "confidence_score": 0.3}  # meets all three rules
POS = {"user_sentiment": "positive", "expected_helpfulness": 5, "confidence_score": 0.95}  # meets none
ALL_THREE = {"negative-sentiment", "low-helpfulness", "low-confidence"}


@pytest.fixture(scope="module")
def world(upstream, chdb_store, tmp_path_factory):
    judge = JudgeDouble()
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("autopop-spool")),
                          providers={"judge-double": judge.provider}, models=[JUDGE_MODEL]) as gw:
        yield {"gw": gw, "judge": judge, "store": chdb_store}


@pytest.fixture()
def w(world, tmp_path):
    run = uuid.uuid4().hex
    return {**world, "run": run, "traffic": Traffic(world["gw"], run), "tmp": tmp_path, "a": f"ap-{run[:8]}-a",
            "dsn": ["--dsn", world["store"].dsn],
            "gateway": ["--gateway", world["gw"].url, "--api-key", ADMIN_KEY]}


def tw(w, *args):
    return cli.invoke(app, [str(a) for a in args] + w["dsn"], catch_exceptions=False)


def error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def calls(w, n, customer=None):
    out = [w["traffic"].call(customer or w["a"]) for _ in range(n)]
    w["traffic"].flush(w["store"], [t for t, _ in out])
    return out


def non_production_call(w, source):
    """A call tagged like the run's traffic but marked as a replayed or judge call (as the runner marks them)."""
    m = w["traffic"].marker()
    raw = w["traffic"].client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": f"{m}: replayed"}],
        extra_headers={"x-tagway-tags": f"run={w['run']}", "x-tagway-customer": w["a"], "x-tagway-source": source})
    tid = raw.headers["x-tagway-trace-id"]
    w["traffic"].flush(w["store"], [tid])
    return tid


def dataset_with(w, trace_ids):
    name = unique("autopop")
    res = tw(w, "dataset", "add", name, *[x for t in trace_ids for x in ("--trace", t)], "--author", "tester")
    assert res.exit_code == 0, res.output
    return name


def saved_evaluator(w, prefix="autopop"):
    name = unique(prefix)
    res = cli.invoke(eval_app, ["save", str(seed_evaluator(w["tmp"] / f"{name}.yaml", name)), *w["dsn"]])
    assert res.exit_code == 0, res.output
    return name


def declare(w, name, *args):
    res = tw(w, "dataset", "auto-populate", name, *args, "--author", "tester")
    assert res.exit_code == 0, res.output
    return res


def populate_cmd(w, name, *extra):
    res = tw(w, "dataset", "populate", name, *w["gateway"], "--json", *extra)
    docs = orjson.loads(res.stdout[res.stdout.index("["):]) if "[" in res.stdout else None
    return res, docs


def versions(w, name):
    return [v.ref for v in core.history(w["store"], name)]


def tags(w, trace_id):
    return set(ts.tags_of(w["store"], ts.parse_target(trace_id)))


def audit(w, trace_id):
    return [(e["tag"], e["action"], e["run_id"]) for e in ts.audit(w["store"], ts.parse_target(trace_id))]


# -- the path of the issue -----------------------------------------------------------------------------------------
def test_population_adds_the_new_matching_traces_and_a_delta_run_tags_only_them(w):
    (t1, m1), (t2, m2) = calls(w, 2)
    w["judge"].answers.update({m1: NEG, m2: POS})
    name, ev = dataset_with(w, [t1, t2]), saved_evaluator(w)
    full = cli.invoke(eval_app, ["run", "--evaluator", ev, "--dataset", name, *w["dsn"], *w["gateway"],
                                 "--format", "json"])
    assert full.exit_code == 0, full.output
    first = orjson.loads(full.stdout[full.stdout.index("{"):])
    assert (first["dataset"], first["dataset_version"]) == (name, f"{name}@1")  # a versioned dataset, by name
    assert tags(w, t1) == ALL_THREE and tags(w, t2) == set()
    declare(w, name, "--where", f"tag.run={w['run']}", "--sample", "1", "--evaluator", ev)
    w["judge"].answers[m1] = POS  # a full run would now remove t1's tags: a delta run must not look at t1
    (t3, m3), (t4, m4), (t5, m5) = calls(w, 3)
    w["judge"].answers.update({m3: NEG, m4: POS, m5: POS})
    elsewhere = w["traffic"].client.chat.completions.with_raw_response.create(  # another run's traffic: no match
        model="gpt-test", messages=[{"role": "user", "content": "not ours"}],
        extra_headers={"x-tagway-tags": "run=someone-else", "x-tagway-customer": w["a"]}).headers["x-tagway-trace-id"]
    replayed = [non_production_call(w, s) for s in NON_PRODUCTION_SOURCES]
    w["traffic"].flush(w["store"], [elsewhere])
    prompts = len(w["judge"].prompts)

    res, docs = populate_cmd(w, name)
    assert res.exit_code == 0, res.output
    (doc,) = docs
    assert doc["version"] == f"{name}@2" and doc["added"] == [t3, t4, t5]  # oldest first
    assert doc["matched"] == doc["sampled"] == 3
    assert not set(replayed) & set(core.ever_held(w["store"], name)) and elsewhere not in doc["added"]
    v = core.get_version(w["store"], name)
    assert (v.message, v.author, v.op, v.n_cases) == ("auto-populate: 3 new traces", "auto-populate", "auto-populate",
                                                      5)
    (run,) = doc["runs"]
    assert run["status"] == "complete" and run["summary"]["scored"] == 3 and run["evaluator"] == f"{ev}@1"
    stored = get_run(w["store"], run["run_id"])
    assert (stored.mode, stored.dataset, stored.dataset_version) == ("delta", name, f"{name}@2")
    # only the new rows were scored and reconciled: t1 keeps the tags a full run would now remove
    assert len(w["judge"].prompts) - prompts == 3
    assert {m for ms in w["judge"].markers_seen()[prompts:] for m in ms} == {m3, m4, m5}
    assert tags(w, t1) == ALL_THREE and tags(w, t2) == set()
    assert tags(w, t3) == ALL_THREE and tags(w, t4) == tags(w, t5) == set()
    events = ts.run_events(w["store"], run["run_id"])
    assert {e["target_id"] for e in events} == {t3} and len(events) == 3
    assert [e[2] for e in audit(w, t1)] == [first["run_id"]] * 3  # t1's audit log has the full run's rows only

    # nothing new since: no version, no run, no judge call
    runs_before = len(list_runs(w["store"], limit=1000))
    res, docs = populate_cmd(w, name)
    assert res.exit_code == 0, res.output
    assert docs[0]["version"] is None and docs[0]["added"] == [] and docs[0]["runs"] == []
    assert versions(w, name) == [f"{name}@2", f"{name}@1"]
    assert len(list_runs(w["store"], limit=1000)) == runs_before and len(w["judge"].prompts) - prompts == 3
    text = tw(w, "dataset", "populate", name, *w["gateway"])
    assert text.exit_code == 0 and f"{name}: nothing new" in text.output and "no version, no run" in text.output


def test_the_cap_leaves_the_rest_for_the_next_population_and_what_came_before_stays_out(w):
    (before, _), = calls(w, 1)
    name = dataset_with(w, [before])
    (earlier, _), = calls(w, 1)  # recorded before the declaration, which has no --since: never taken
    time.sleep(0.05)
    declare(w, name, "--where", f"tag.run={w['run']}", "--max", "3")
    new = [t for t, _ in calls(w, 5)]
    assert [d["added"] for d in populate_cmd(w, name)[1]] == [new[:3]]
    assert [d["added"] for d in populate_cmd(w, name)[1]] == [new[3:]]
    res, docs = populate_cmd(w, name)
    assert docs[0]["version"] is None and versions(w, name) == [f"{name}@3", f"{name}@2", f"{name}@1"]
    assert earlier not in core.ever_held(w["store"], name)
    # a declaration that reaches back takes it; a case removed by hand is never added again
    declare(w, name, "--where", f"tag.run={w['run']}", "--since", "1h")
    assert tw(w, "dataset", "remove", name, new[0], "--author", "tester").exit_code == 0
    core_last = last_population(w["store"], name)
    assert core_last is not None  # the watermark survives a new declaration: what was looked at stays looked at
    res, docs = populate_cmd(w, name)
    assert docs[0]["added"] == [] and new[0] not in {c.trace_id for c in core.read_cases(
        w["store"], core.get_version(w["store"], name))}


def test_sampling_is_a_function_of_the_trace_id(w):
    run = uuid.uuid4().hex
    spans = [call_span(customer=w["a"], intent="refund", user=f"ticket {i}", answer="ok", tags={"run": run})
             for i in range(60)]
    ids = record(w["store"], spans)
    names = {}
    for key, rate in (("a", "0.3"), ("b", "0.3"), ("c", "0.6")):
        names[key] = dataset_with(w, [ids[0]])
        declare(w, names[key], "--where", f"tag.run={run}", "--sample", rate, "--since", "1h")
    added = {k: set(populate(w["store"], n).added) for k, n in names.items()}
    expect = {t for t in ids[1:] if is_sampled(t, 0.3)}
    assert added["a"] == added["b"] == expect and 0 < len(expect) < 59
    assert added["a"] < added["c"] and added["c"] == {t for t in ids[1:] if is_sampled(t, 0.6)}
    assert populate(w["store"], names["a"]).version is None  # again: the same choice, nothing new
    more = record(w["store"], [call_span(customer=w["a"], intent="refund", user=f"more {i}", answer="ok",
                                         tags={"run": run}) for i in range(20)])
    again = populate(w["store"], names["a"])
    assert set(again.added) == {t for t in more if is_sampled(t, 0.3)}
    # the stretch before the watermark is looked at again (late spans): what it left out is left out again
    assert again.record.matched > 20 and again.record.sampled == len(again.added)


def test_pick_takes_the_oldest_and_stops_the_watermark_at_the_first_left_out():
    rows = [Row(f"t{i}", 1000.0 + i, has_content=i != 2) for i in range(6)]
    everything = pick(rows, 1.0, {"t0"}, None, 900.0, 2000.0, full_page=False)
    assert everything.take == ["t1", "t3", "t4", "t5"] and everything.matched == everything.sampled == 5
    assert everything.no_content == 1 and everything.watermark == 2000.0 - GRACE  # looked at again next time
    assert pick(rows, 1.0, set(), None, 1900.0, 2000.0, full_page=False).watermark == 1900.0  # never before start
    capped = pick(rows, 1.0, {"t0"}, 2, 900.0, 2000.0, full_page=False)
    assert capped.take == ["t1", "t3"] and capped.watermark == 1004.0  # t4 waits for the next population
    page = pick(rows, 1.0, set(), None, 900.0, 2000.0, full_page=True)
    assert page.watermark == 1005.0  # a full page: the next population goes on from its last row
    none = pick(rows, 0.0, set(), None, 900.0, 2000.0, full_page=False)
    assert none.take == [] and none.matched == 6 and none.sampled == 0


def test_non_production_sources_are_never_added(w):
    run = uuid.uuid4().hex
    prod = record(w["store"], [call_span(customer=w["a"], intent="x", user="p", answer="a", tags={"run": run})])
    record(w["store"], [call_span(customer=w["a"], intent="x", user="q", answer="a", tags={"run": run},
                                  capture=False)])  # production, but recorded without content: named, skipped
    others = record(w["store"], [call_span(customer=w["a"], intent="x", user=f"{s}", answer="a", tags={"run": run},
                                           source=s) for s in NON_PRODUCTION_SOURCES])
    seed = record(w["store"], [call_span(customer=w["a"], intent="x", user="s", answer="a")])
    a, b = dataset_with(w, seed), dataset_with(w, seed)
    declare(w, a, "--where", f"tag.run={run}", "--since", "1h")
    declare(w, b, "--where", f"tag.run={run}", "--where", "source!=production", "--since", "1h")
    pa = populate(w["store"], a)
    assert pa.added == prod and pa.record.notes == ["skipped 1: recorded without content (content capture was off "
                                                    "for that call): nothing to replay"]
    pb = populate(w["store"], b)
    assert pb.version is None and pb.record.matched == 0
    assert not set(others) & (core.ever_held(w["store"], a) | core.ever_held(w["store"], b))
    assert {REPLAY_SOURCE, JUDGE_SOURCE} <= set(NON_PRODUCTION_SOURCES)


# -- concurrency ---------------------------------------------------------------------------------------------------
def test_two_populations_at_once_make_one_version_and_one_run(w):
    (t0, _), = calls(w, 1)
    name, ev = dataset_with(w, [t0]), saved_evaluator(w, "twice")
    declare(w, name, "--where", f"tag.run={w['run']}", "--evaluator", ev)
    new = calls(w, 3)
    for _, m in new:
        w["judge"].answers[m] = NEG
    prompts = len(w["judge"].prompts)
    outcomes: list = []
    opts = EvalOptions(gateway_url=w["gw"].url, api_key=ADMIN_KEY)

    def one() -> None:  # the Python API: typer's CliRunner swaps sys.stdout, one at a time
        outcomes.append(asyncio.run(populate_and_evaluate(w["store"], name, opts, lock_wait=60)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 2
    made = [o for o in outcomes if o.population.version is not None]
    assert len(made) == 1 and made[0].population.added == [t for t, _ in new] and len(made[0].runs) == 1
    assert versions(w, name) == [f"{name}@2", f"{name}@1"]
    assert len(w["judge"].prompts) - prompts == 4  # t0 (the evaluator's first run on it) and the three new rows


def test_a_population_waits_for_the_one_holding_the_dataset_then_says_so(w):
    (t0, _), = calls(w, 1)
    name = dataset_with(w, [t0])
    declare(w, name, "--where", f"tag.run={w['run']}")
    calls(w, 2)
    holder = ts.TagLock(w["store"], [lock_key(name)], run_id="", holder="another populate").acquire()
    try:
        res = tw(w, "dataset", "populate", name, "--lock-wait", "0.3")
    finally:
        holder.release()
    assert res.exit_code == 3 and "is being reconciled by another populate" in error_line(res)
    assert versions(w, name) == [f"{name}@1"]
    res = tw(w, "dataset", "populate", name)
    assert res.exit_code == 0 and f"{name}@2: auto-populate: 2 new traces" in res.output, res.output


def test_watch_populates_each_round(w):
    (t0, _), = calls(w, 1)
    name = dataset_with(w, [t0])
    declare(w, name, "--where", f"tag.run={w['run']}")
    stop, rounds = threading.Event(), []

    def once() -> int:
        rounds.append(populate(w["store"], name))
        return 0

    loop = threading.Thread(target=lambda: rounds.append(watch(once, 0.1, stop)))
    loop.start()
    try:
        added = []
        for _ in range(2):
            (t, _), = calls(w, 1)
            added.append(t)
            deadline = time.monotonic() + 30
            while t not in core.ever_held(w["store"], name) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        stop.set()
        loop.join(30)
    assert rounds[-1] == 0 and not loop.is_alive()
    made = [p.version.ref for p in rounds[:-1] if p.version is not None]
    assert made == [f"{name}@2", f"{name}@3"] and core.ever_held(w["store"], name) == {t0, *added}


# -- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_2(w):
    (t0, _), = calls(w, 1)
    name, ev = dataset_with(w, [t0]), saved_evaluator(w, "bad")
    cases = [
        (["auto-populate", name + "x", "--sample", "0.1"], f"no dataset '{name}x' (did you mean {name}"),
        (["populate", name + "x"], f"no dataset '{name}x' (did you mean {name}"),
        (["auto-populate", name, "--evaluator", "no-such-evaluator"], "no evaluator 'no-such-evaluator'"),
        (["auto-populate", name, "--evaluator", "x.yaml"], "--evaluator x.yaml: name a saved evaluator"),
        (["auto-populate", name, "--sample", "1.5"], "--sample 1.5: a rate between 0 and 1"),
        (["auto-populate", name, "--sample", "-0.1"], "--sample -0.1: a rate between 0 and 1"),
        (["auto-populate", name, "--sample", "nan"], "--sample nan: a rate between 0 and 1"),
        (["auto-populate", name, "--where", "nosuch=1"], "unknown filter column 'nosuch'"),
        (["auto-populate", name, "--where", "status=weird"], "status is one of ok, error, cancelled"),
        (["auto-populate", name, "--where", "intent"], "invalid filter 'intent'"),
        (["auto-populate", name, "--where", "source=replay"], "production traffic only"),
        (["auto-populate", name, "--since", "soon"], "invalid window 'soon'"),
        (["auto-populate", name, "--max", "0"], "--max 0: at least 1"),
        (["auto-populate", name, "--off", "--sample", "1"], "--off stops auto-population: give it alone"),
        (["populate", name], f"dataset '{name}' does not auto-populate"),
        (["populate"], "give a dataset NAME or --all"),
        (["populate", name, "--all"], "give a dataset NAME or --all"),
    ]
    for args, message in cases:
        res = tw(w, "dataset", *args)
        assert res.exit_code == 2, (args, res.output)
        assert message in error_line(res), (args, res.output)
    assert orjson.loads(tw(w, "dataset", "auto-populate", name, "--json").stdout)["auto_populate"] is None
    declare(w, name, "--evaluator", ev, "--sample", "0.5")
    shown = tw(w, "dataset", "auto-populate", name)
    assert f"{name} auto-populates: all production calls; sample 0.5; evaluators {ev}" in shown.output
    res = tw(w, "dataset", "populate", name)  # its evaluator's judge is reached through a gateway: none given
    assert res.exit_code == 2 and f"no gateway for the judge of {ev}@1 (declared by {name})" in error_line(res)
    assert versions(w, name) == [f"{name}@1"]
    # a judge's gateway that refuses the key, or is not there: said before anything is added (a version added and
    # never scored would be skipped by the next population as not new)
    gw = w["gw"].url
    for args, message in ((["--gateway", gw, "--api-key", "tw-wrong-key-0123456789abcdefghijkl"],
                           f"the gateway at {gw} rejected the API key (HTTP 401)"),
                          (["--gateway", "http://127.0.0.1:1", "--api-key", ADMIN_KEY],
                           "cannot reach the gateway at http://127.0.0.1:1")):
        res = tw(w, "dataset", "populate", name, *args)
        assert res.exit_code == 2 and message in error_line(res), res.output
        assert versions(w, name) == [f"{name}@1"]
        # `--all` populates one dataset after another through the same check (not run here: it would populate
        # every other test's datasets in the session's store)
        with pytest.raises(FatalRunError, match=re.escape(message)):
            asyncio.run(populate_and_evaluate(w["store"], name, EvalOptions(gateway_url=args[1], api_key=args[3])))
        assert versions(w, name) == [f"{name}@1"]
    res = tw(w, "dataset", "populate", name, "--watch", "0")
    assert res.exit_code == 2 and "--watch 0: seconds between populations" in error_line(res)
    off = tw(w, "dataset", "auto-populate", name, "--off")
    assert off.exit_code == 0 and "does not auto-populate (switched off)" in off.output
    assert "does not auto-populate" in error_line(tw(w, "dataset", "populate", name))


def test_the_rate_is_independent_of_the_samplers_order():
    """`dataset add --sample N` keeps the traces first in the sampler's order (`order_key`, seed 0); auto-population
    drew its rate from the same hash, so the traces left out passed ~2% of a 50% rate. Its own hash now."""
    from replay.slice import order_key  # noqa: PLC0415

    ids = [f"{i:032x}" for i in range(4000)]
    left_out = sorted(ids, key=lambda t: order_key(0, t))[2000:]  # what a --sample 2000 dataset did not take
    share = sum(is_sampled(t, 0.5) for t in left_out) / len(left_out)
    assert 0.45 < share < 0.55, share
