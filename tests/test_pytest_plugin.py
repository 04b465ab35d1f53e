"""The pytest plugin (issue 16): projects' tests run a gate through `pytester` (a pytest subprocess with the plugin
loaded from tagway's `pytest11` entry point) against the real `tagway serve` (subprocess, embedded store, real
HTTP upstream) holding a versioned dataset built from real traffic: acme asks about refunds, globex about billing.
The candidate `refund-bad` answers WRONG about refunds, so acme regresses and globex does not; `gpt-test` passes.
A passing and a failing gate through the fixture, a marker, per-segment test ids with -k and -x, and xdist."""
from __future__ import annotations

import time

import openai
import pytest
import yaml

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

pytest_plugins = ["pytester"]

ADMIN = "tw-pp-admin-0123456789abcdefghijklmnopqrs"
KEYS = {c: f"tw-pp-{c}-0123456789abcdefghijklmnopqrstu" for c in ("acme", "globex")}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plugin")
    with Upstream() as up:
        base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "PP_UPSTREAM_KEY"}
        config = {"admin_key_hash": hash_key(ADMIN),
                  "models": [{"name": "gpt-test", "model": "ok-model", **base},
                             {"name": "refund-bad", "model": "refund-bad-model", **base}],
                  "tenants": [{"customer": c, "keys": [{"id": f"{c}-k", "hash": hash_key(k)}]}
                              for c, k in KEYS.items()]}
        with GatewayProcess(tmp, config, env={"PP_UPSTREAM_KEY": "sk-up", "TAGWAY_ADMIN_KEY": ADMIN}) as g:
            for customer, intent in (("acme", "refund"), ("globex", "billing")):
                c = openai.OpenAI(base_url=g.url + "/v1", api_key=KEYS[customer], max_retries=0)
                for i in range(8):
                    c.chat.completions.create(model="gpt-test", messages=[
                        {"role": "user", "content": f"{intent} question #{i}"}],
                        extra_headers={"x-tagway-intent": intent})
            rows = []
            for _ in range(100):  # recorded in batches
                rows = g.query("SELECT count() AS n FROM llm_calls", ADMIN)
                if rows[0]["n"] >= 16:
                    break
                time.sleep(0.2)
            p = g.cli("dataset", "add", "refunds", "--since", "1h", "-m", "seed")
            assert p.returncode == 0, p.stderr
            yield g


@pytest.fixture()
def project(gw, pytester, monkeypatch):
    monkeypatch.setenv("TAGWAY_CONFIG", gw.config_path)
    monkeypatch.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    for name, model in (("good", "gpt-test"), ("bad", "refund-bad")):
        (pytester.path / f"{name}.yaml").write_text(yaml.safe_dump({
            "dataset": "refunds", "candidates": [{"name": name, "model": model}],
            "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    return pytester


def run(project, gw, *args):
    return project.runpytest_subprocess("--gateway", gw.url, "-p", "no:cacheprovider", *args)


def test_a_passing_and_a_failing_gate_through_the_fixture(gw, project):
    project.makepyfile(test_gate="""
        def test_good(tagway_gate):
            report = tagway_gate(spec="good.yaml", dataset="refunds@1")
            assert report.verdict == "passed" and report.dataset == "refunds@1"

        def test_bad(tagway_gate):
            tagway_gate(spec="bad.yaml", dataset="refunds@1")
    """)
    res = run(project, gw)
    res.assert_outcomes(passed=1, failed=1)
    out = res.stdout.str()
    # the assertion message is the per-segment table: acme regressed 8 -> 0, globex held 8 of 8
    assert "tagway gate REGRESSION" in out and "segment acme: regression" in out
    line = next(x for x in res.stdout.lines if x.strip().startswith("acme"))
    assert "1.000" in line and "0.000" in line and "regression" in line
    assert "Traceback" not in out


def test_a_marker_with_one_test_per_segment(gw, project):
    project.makepyfile(test_segments="""
        import pytest

        @pytest.mark.tagway_gate(spec="bad.yaml", dataset="refunds@1")
        def test_refunds(tagway_segment):
            pass

        @pytest.mark.tagway_gate(spec="good.yaml", dataset="refunds")
        def test_good_gate():
            pass
    """)
    res = run(project, gw, "-v")
    res.assert_outcomes(passed=2, failed=1)
    res.stdout.fnmatch_lines(["*test_refunds?acme? FAILED*", "*test_refunds?globex? PASSED*",
                              "*test_good_gate PASSED*"])
    assert "segment 'acme': regression" in res.stdout.str()
    run(project, gw, "-k", "globex").assert_outcomes(passed=1, deselected=2)
    run(project, gw, "-x").assert_outcomes(failed=1)  # acme first: -x stops there


def test_the_gate_under_xdist(gw, project):
    project.makepyfile(test_segments="""
        import pytest

        @pytest.mark.tagway_gate(spec="bad.yaml", dataset="refunds@1")
        def test_refunds(tagway_segment):
            pass
    """)
    res = run(project, gw, "-n", "2")
    res.assert_outcomes(passed=1, failed=1)


def test_without_gateway_the_gateway_serving_the_store_takes_the_calls(gw, project):
    """With no --gateway the plugin ran the gateway in-process, which cannot start beside `tagway serve` on the
    same embedded store: every test failed with "... use --gateway". It now replays through the serving gateway,
    as `tagway replay run` does."""
    project.makepyfile(test_gate="""
        def test_good(tagway_gate):
            report = tagway_gate(spec="good.yaml", dataset="refunds@1")
            assert report.verdict == "passed"
    """)
    res = project.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=1)
    assert "use --gateway" not in res.stdout.str()


def test_bad_input_is_one_line(gw, project):
    project.makepyfile(test_bad_input="""
        def test_missing_dataset(tagway_gate):
            tagway_gate(spec="good.yaml", dataset="nope@1")
    """)
    res = run(project, gw)
    res.assert_outcomes(failed=1)
    assert "tagway_gate: the gate could not run: " in res.stdout.str() and "nope" in res.stdout.str()


def test_the_github_actions_example_gates_a_committed_dataset(gw, tmp_path):
    """examples/github-actions.yml's replay step, run as written (bash, the `tagway` CLI) against the gateway on its
    embedded store, with a dataset JSONL exported from it: the PR comment is written and the step records exit 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    workflow = yaml.safe_load((Path(__file__).parent.parent / "examples" / "github-actions.yml").read_text())
    step = next(s for s in workflow["jobs"]["gate"]["steps"] if s.get("id") == "gate")
    (tmp_path / "ci").mkdir()
    (tmp_path / "datasets").mkdir()
    (tmp_path / "ci" / "replay.yaml").write_text(yaml.safe_dump({
        "candidates": [{"name": "cand", "model": "refund-bad"}],
        "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    p = gw.cli("dataset", "export", "refunds@1", "--out", str(tmp_path / "datasets" / "refunds.jsonl"))
    assert p.returncode == 0, p.stderr
    out = tmp_path / "github_output"
    env = {**gw.env, "TAGWAY_CONFIG": gw.config_path, "TAGWAY_ADMIN_KEY": ADMIN, "GITHUB_OUTPUT": str(out),
           "TAGWAY_DASHBOARD_URL": "https://tw.example", "PATH": os.path.dirname(sys.executable) + ":" +
           os.environ["PATH"]}
    script = step["run"].replace("http://127.0.0.1:4000", gw.url)
    res = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr  # the step itself succeeds; the next one fails the job
    assert out.read_text() == "exit=1\n"
    comment = (tmp_path / "gate.md").read_text()
    assert comment.startswith("## ❌ tagway gate: REGRESSION")
    assert "| acme | 8 | 1.000 | 0.000 |" in comment and "https://tw.example/ui/replays/" in comment
