"""`tagway replay` commands end to end on chDB and a real HTTP server playing the gateway: exit codes 0/1/2/3,
one-line errors, flags overriding the spec, report / resume / dataset commands."""
from __future__ import annotations

import fcntl
import os

import orjson
import pytest
import typer
import yaml
from typer.testing import CliRunner

from replay.cli import register, replay_app
from tests.test_replay_support import API_KEY, FakeLLM, call_span, record, unique

cli = CliRunner()


def invoke(*args: str):
    return cli.invoke(replay_app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def world(chdb_store, tmp_path):
    """Two customers: the candidate is better for `b` and worse for `a`; a spec file; a fake gateway."""
    a, b = unique("acme"), unique("globex")
    spans = []
    for i in range(20):
        spans.append(call_span(customer=a, intent="refund", user=f"refund #{i}", answer="approved"))
        spans.append(call_span(customer=b, intent="invoice", user=f"invoice #{i}",
                               answer="approved" if i % 4 else "denied"))
    record(chdb_store, spans)

    def cand(user: str, headers: dict) -> str:
        n = int(user.split("#")[-1])
        return "denied" if headers.get("x-tagway-customer") == a and n % 4 == 0 else "approved"

    spec = {"slice": {"customer": [a, b], "since": "1h", "segment_by": ["customer"],
                      "sampling": {"min_per_segment": 10, "seed": 3}},
            "candidates": [{"name": "cand", "model": "cand-model"}],
            "evaluators": [{"type": "icontains", "value": "approved"}],
            "gating": {"aggregate": "min_segment", "threshold": 0.85, "min_cases_per_segment": 10}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with FakeLLM({"cand-model": cand}) as gw:
        yield {"a": a, "b": b, "spec": path, "gw": gw, "dsn": chdb_store.dsn, "tmp": tmp_path,
               "common": ["--dsn", chdb_store.dsn, "--gateway", gw.url, "--api-key", API_KEY, "--no-progress"]}


def test_min_segment_gate_fails_with_exit_1_and_names_the_segment(world):
    md = world["tmp"] / "report.md"
    res = invoke("run", "--spec", world["spec"], *world["common"], "--format", "md", "--out", md)
    assert res.exit_code == 1, res.output
    row = next(line for line in res.output.splitlines() if world["a"] in line and "0.750" in line)
    assert "1.000" in row and "-0.250" in row and "❌" in row
    text = md.read_text()
    assert f"| {world['a']} | 20 | 1.000 | 0.750 | -0.250 |" in text and "**Verdict: FAILED**" in text
    assert f"| {world['b']} | 20 | 0.750 | 1.000 | +0.250 |" in text


def test_mean_gate_passes_and_flags_override_the_spec(world):
    res = invoke("run", "--spec", world["spec"], *world["common"], "--gate-aggregate", "mean", "--format", "json")
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    assert report["verdict"] == "passed" and report["gating"]["aggregate"] == "mean"
    assert report["candidates"][0]["overall"]["n"] == 40

    res = invoke("run", "--spec", world["spec"], *world["common"], "--customer", world["b"], "--threshold", "0.9",
                 "--format", "json")
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    assert [r["segment"] for r in report["candidates"][0]["rows"]] == [world["b"]]


def test_report_rebuilds_and_regates_a_run(world):
    res = invoke("run", "--spec", world["spec"], *world["common"], "--run-id", unique("run"), "--format", "json")
    run_id = orjson.loads(res.output[res.output.index("{"):])["run_id"]
    res = invoke("report", run_id, "--dsn", world["dsn"], "--format", "md")
    assert res.exit_code == 1 and world["a"] in res.output and "FAILED" in res.output
    res = invoke("report", run_id, "--dsn", world["dsn"], "--gate-aggregate", "mean", "--format", "html",
                 "--out", world["tmp"] / "r.html")
    assert res.exit_code == 0
    assert f'data-segment="{world["a"]}"' in (world["tmp"] / "r.html").read_text()


def test_budget_makes_the_run_incomplete_and_resume_finishes_it(world):
    run_id = unique("run")
    res = invoke("run", "--spec", world["spec"], *world["common"], "--run-id", run_id, "--max-cost", "0.0095",
                 "--concurrency", "1")
    assert res.exit_code == 3, res.output
    assert "budget reached" in res.output and "incomplete" in res.output
    sent = len(world["gw"].chat_requests())
    res = invoke("resume", run_id, *world["common"], "--max-cost", "1")
    assert res.exit_code == 1, res.output  # complete now, and the gate fails on customer a
    assert len(world["gw"].chat_requests()) == 40 and sent == 10


def test_datasets_pin_a_slice(world):
    ds = unique("ds")
    res = invoke("dataset", "save", ds, "--spec", world["spec"], "--dsn", world["dsn"], "--customer", world["b"],
                 "--description", "invoices")
    assert res.exit_code == 0 and f"saved 20 case(s) in 1 segment(s) as {ds}" in res.output
    assert invoke("dataset", "save", ds, "--spec", world["spec"], "--dsn", world["dsn"]).exit_code == 2
    listing = invoke("dataset", "list", "--dsn", world["dsn"]).output
    assert f"{ds}\t20 cases\t1 segments\tinvoices" in listing and "run-" not in listing
    res = invoke("run", "--spec", world["spec"], *world["common"], "--dataset", ds, "--format", "json")
    assert res.exit_code == 0, res.output
    report = orjson.loads(res.output[res.output.index("{"):])
    assert [r["segment"] for r in report["candidates"][0]["rows"]] == [world["b"]]

    jsonl = world["tmp"] / "cases.jsonl"
    res = invoke("dataset", "save", jsonl, "--spec", world["spec"], "--dsn", world["dsn"], "--customer", world["a"])
    assert res.exit_code == 0 and len(jsonl.read_text().splitlines()) == 20
    res = invoke("run", "--spec", world["spec"], *world["common"], "--dataset", jsonl, "--format", "json")
    assert res.exit_code == 1, res.output


@pytest.mark.parametrize("args,message", [
    (["--candidate-model", "gpt-nope"], "model 'gpt-nope' is not served by the gateway (404 model_not_found)"),
    (["--tag", "region"], "--tag 'region': expected key=value"),
    (["--segment-by", "customer,colour"], "bad segment key 'colour'"),
    (["--customer", "nobody-at-all"], "the slice matched no replayable call"),
    (["--gate-aggregate", "median"], "gating.aggregate"),
    (["--format", "pdf"], "--format 'pdf'"),
])
def test_bad_input_is_one_line_and_exit_2(world, args, message):
    res = invoke("run", "--spec", world["spec"], *world["common"], *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1


def test_bad_spec_file_and_unknown_run(world, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("slice: [unclosed\n")
    res = invoke("run", "--spec", bad, *world["common"])
    assert res.exit_code == 2 and "invalid YAML" in res.output and "Traceback" not in res.output
    bad.write_text(yaml.safe_dump({"slice": {}, "candidates": [], "evaluators": [{"type": "contains", "value": 1}]}))
    res = invoke("run", "--spec", bad, *world["common"])
    assert res.exit_code == 2 and "candidates: List should have at least 1 item" in res.output
    assert invoke("resume", "no-such-run", *world["common"]).exit_code == 2


def test_a_locked_embedded_store_says_what_to_do(world, tmp_path):
    data = tmp_path / "held"
    data.mkdir()
    fd = os.open(data / "tagway.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another holder (as the gateway would be)
    try:
        res = invoke("report", "x", "--dsn", f"chdb://{data}")
    finally:
        os.close(fd)
    assert res.exit_code == 2 and "in use by another process" in res.output
    assert "server DSN" in res.output and "--in-process" in res.output


def test_register_adds_the_replay_sub_app():
    app = typer.Typer()

    @app.command()
    def serve() -> None:  # the gateway's own command
        pass

    register(app)
    res = cli.invoke(app, ["replay", "--help"])
    assert res.exit_code == 0 and "run" in res.output and "resume" in res.output and "dataset" in res.output
