"""`tagway replay plan` and `tagway replay discover` on a real replay (chDB, a real HTTP server playing the gateway):
the candidate fails on long documents, whichever the customer, and discover finds input length before customer."""
from __future__ import annotations

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from replay.cli import replay_app
from tests.replay_support import API_KEY, FakeLLM, call_span, record, unique

cli = CliRunner()
N = 40  # calls per customer; every 4th is a long document


def invoke(*args):
    return cli.invoke(replay_app, [str(a) for a in args], catch_exceptions=False)


def payload(res) -> dict:
    return orjson.loads(res.output[res.output.index("{"):])


@pytest.fixture(scope="module")
def world(chdb_store, tmp_path_factory):
    customers = [unique(c) for c in ("acme", "globex", "initech")]
    spans = []
    for c in customers:
        for i in range(N):
            long = i % 4 == 0
            spans.append(call_span(customer=c, intent="review", answer="approved",
                                   user=("contract clause " * 400 if long else "short note") + f" #{i}",
                                   input_tokens=3000 + i if long else 40 + i, latency_ms=300.0 + 10 * i))
    record(chdb_store, spans)

    def cand(user: str, headers: dict) -> str:
        return "denied" if user.startswith("contract clause") else "approved"

    tmp = tmp_path_factory.mktemp("plan")
    spec = tmp / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "slice": {"customer": customers, "since": "1h", "segment_by": ["customer"],
                  "sampling": {"min_per_segment": N, "seed": 1}},
        "candidates": [{"name": "cand", "model": "cand-model"}],
        "evaluators": [{"type": "icontains", "value": "approved"}]}))
    with FakeLLM({"cand-model": cand}) as gw:
        common = ["--dsn", chdb_store.dsn, "--gateway", gw.url, "--api-key", API_KEY, "--no-progress"]
        run_id = unique("disc")
        res = invoke("run", "--spec", spec, *common, "--run-id", run_id, "--format", "json")
        assert res.exit_code == 1, res.output
        yield {"customers": customers, "spec": spec, "dsn": chdb_store.dsn, "run_id": run_id, "tmp": tmp}


def test_discover_finds_the_input_length_the_segments_were_not_cut_by(world):
    res = invoke("discover", world["run_id"], "--dsn", world["dsn"], "--format", "json")
    assert res.exit_code == 0, res.output
    cells = payload(res)["candidates"]["cand"]
    top = cells[0]
    assert top["dimension"] == "input_length" and top["value"].startswith("q4 3000-")
    assert (top["n"], top["pass_fail"], top["fail_pass"], top["before"], top["after"]) == (30, 30, 0, 1.0, 0.0)
    assert top["regression"] and top["lift"] == pytest.approx(4.0)
    assert top["p_value"] == pytest.approx(0.5 ** 30)
    by = {(c["dimension"], c["value"]): c for c in cells}
    for c in world["customers"]:  # each customer dropped too, but far less sharply
        assert by[("customer", c)]["p_value"] > top["p_value"] and by[("customer", c)]["lift"] == pytest.approx(1.0)
    assert all(not by[k]["regression"] for k in by if k[0] == "input_length" and k != ("input_length", top["value"]))
    # what the production answer was (its length, latency, status) is not a dimension: cut by it, a cell can only
    # flip one way (see test_an_honest_candidate_gets_no_lead_from_what_the_baseline_answered)
    assert not any(k[0] in ("latency", "output_length", "status", "error_type", "model_served") for k in by)
    assert not any(k[0] in ("operation", "turns") for k in by)  # one value only: nothing to compare

    table = invoke("discover", world["run_id"], "--dsn", world["dsn"], "--top", "3")
    assert table.exit_code == 0 and "where the flips concentrate" in table.output
    row = next(line for line in table.output.splitlines() if "input_length" in line)
    assert "q4 3000-" in row and "↓30 ↑0" in row and "regression" in row


def test_plan_reports_detectable_drops_and_coverage(world):
    res = invoke("plan", "--spec", world["spec"], "--dsn", world["dsn"], "--format", "json", "--drop", "0.1")
    assert res.exit_code == 0, res.output
    p = payload(res)
    assert p["alpha"] == 0.05 and p["level"] == pytest.approx(0.05 / 3) and p["pass_rate"] == 0.9
    rows = {r["segment"]: r for r in p["rows"]}
    assert set(rows) == set(world["customers"])
    r = rows[world["customers"][0]]
    assert (r["available"], r["sampled"]) == (N, N) and r["detectable_escalated"] is None  # nothing more to draw
    assert 0.1 < r["detectable"] < 0.9 and r["needed"] > N and r["short"] and r["suggested"] == N
    assert p["coverage"] == {c: N for c in world["customers"]}
    more = payload(invoke("plan", "--spec", world["spec"], "--dsn", world["dsn"], "--format", "json",
                          "--drop", "0.5", "--pass-rate", "0.95"))
    assert more["rows"][0]["needed"] < r["needed"]  # a bigger drop needs fewer cases

    table = invoke("plan", "--spec", world["spec"], "--dsn", world["dsn"])
    assert table.exit_code == 0 and "production too small" in table.output
    assert "# suggested coverage" in table.output and f'  "{world["customers"][0]}": {N}' in table.output


@pytest.mark.parametrize("args,message", [
    (["--pass-rate", "0"], "--pass-rate 0: must be in (0, 1]"),
    (["--drop", "0.95"], "--drop 0.95: must be in (0, --pass-rate]"),
    (["--customer", "nobody-here"], "the slice's segments have no replayable case"),
    (["--format", "md"], "--format 'md': use one of table, json"),
])
def test_plan_bad_input_is_one_line_and_exit_2(world, args, message):
    res = invoke("plan", "--spec", world["spec"], "--dsn", world["dsn"], *args)
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output


def test_discover_bad_input(world):
    res = invoke("discover", "no-such-run", "--dsn", world["dsn"])
    assert res.exit_code == 2 and "no replay run 'no-such-run'" in res.output
    res = invoke("discover", world["run_id"], "--dsn", world["dsn"], "--candidate", "nope")
    assert res.exit_code == 2 and "has no candidate 'nope' (it has: cand)" in res.output


def test_quartile_buckets_keep_ties_together():
    from replay.discover import bucket_labels, turns_label
    assert bucket_labels({"a": 1, "b": 2, "c": 3, "d": 4, "e": None}) == {"a": "q1 1-1", "b": "q2 2-2", "c": "q3 3-3",
                                                                          "d": "q4 4-4"}
    assert set(bucket_labels({k: 7 for k in "abcdef"}).values()) == {"q1 7-7"}
    assert bucket_labels({"a": 12_000, "b": 50}) == {"a": "q2 12.0k-12.0k", "b": "q1 50-50"}
    assert [turns_label(n) for n in (1, 2, 3, 4, 9)] == ["1", "2", "3-4", "3-4", "5+"]


def test_an_honest_candidate_gets_no_lead_from_what_the_baseline_answered():
    """A candidate as good as production, flipping as many cases each way, whose flips line up with how long the
    production answer was (a passing answer is long, a failing one short): bucketed by that length, every cell of
    long answers can only flip down, and the sign test called it a regression (p 3.9e-06 in a trial). Only what was
    known before the answer is a dimension now, so no lead comes out of it."""
    from replay.discover import describe, discover  # noqa: PLC0415

    outcomes, calls = {}, []
    for i in range(120):
        before = i % 2 == 0  # production passed on half the cases...
        after = not before if i < 80 else before  # ...and the candidate flips 40 each way
        outcomes[f"c{i}"] = (before, after)
        calls.append({"trace_id": f"c{i}", "customer": "acme", "status": "ok" if before else "error",
                      "input_tokens": 100 + i % 7, "output_tokens": 400 if before else 20, "latency_ms": 900 if before
                      else 100, "tags": {}, "turns": 1})
    cells = discover(outcomes, describe(calls, ["customer", "status"]), alpha=0.05, margin=0.0)
    assert not any(c.regression for c in cells)
    assert not any(c.dimension in ("output_length", "latency", "status") for c in cells)
