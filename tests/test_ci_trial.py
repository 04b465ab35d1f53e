"""What a team adopting the replay gate in CI tripped on (a trial run as a new user, from the README), each against
the real `tagway serve` (subprocess, embedded chDB) and a real HTTP upstream on 127.0.0.1, through the `tagway` CLI
and pytest as CI runs them:

- `tagway replay resume RUN_ID`, run where the run was started (as the run's own message says), read the spec's
  prompt file relative to its working directory instead of the spec's: exit 2 "cannot read prompt file", or a file
  of the same name there sent as the candidate's prompt for the rest of the run;
- the pytest plugin, loaded wherever tagway is installed, took `--gateway`: a project whose conftest has its own
  `--gateway` could not start pytest at all (argparse "conflicting option string");
- `tagway_gate` with a spec that is not there (or not valid) failed with a traceback through the plugin;
- `replay plan` refused `--limit` and `--tag`, which `replay run` takes;
- `replay trend --spec FILE` of a spec without `name:` stopped, even with `--dataset`;
- `replay report RUN_ID` dropped the notes and skipped counts the run had reported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import openai
import orjson
import pytest
import yaml

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

pytest_plugins = ["pytester"]

ADMIN = "tw-ci-trial-admin-0123456789abcdefghijklmn"
KEYS = {c: f"tw-ci-trial-{c}-0123456789abcdefghijklmnopq" for c in ("acme", "globex")}
PRICE = {"input_cost_per_token": 0.001, "output_cost_per_token": 0.001}  # a budget can stop a run


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci-trial")
    with Upstream() as up:
        base = {"provider": "openai", "base_url": up.base_url, "api_key_env": "CT_UPSTREAM_KEY", **PRICE}
        config = {"admin_key_hash": hash_key(ADMIN),
                  "models": [{"name": "gpt-test", "model": "ok-model", **base},
                             {"name": "refund-bad", "model": "refund-bad-model", **base}],
                  "tenants": [{"customer": c, "keys": [{"id": f"{c}-k", "hash": hash_key(k)}]}
                              for c, k in KEYS.items()]}
        with GatewayProcess(tmp, config, env={"CT_UPSTREAM_KEY": "sk-up", "TAGWAY_ADMIN_KEY": ADMIN}) as g:
            for customer, intent, region in (("acme", "refund", "eu"), ("globex", "billing", "us")):
                c = openai.OpenAI(base_url=g.url + "/v1", api_key=KEYS[customer], max_retries=0)
                for i in range(8):
                    c.chat.completions.create(model="gpt-test", messages=[
                        {"role": "user", "content": f"{intent} question #{i}"}],
                        extra_headers={"x-tagway-intent": intent, "x-tagway-tags": f"region={region}"})
            for _ in range(100):  # recorded in batches
                if g.query("SELECT count() AS n FROM llm_calls", ADMIN)[0]["n"] >= 16:
                    break
                time.sleep(0.2)
            p = g.cli("dataset", "add", "refunds", "--since", "1h", "-m", "seed")
            assert p.returncode == 0, p.stderr
            g.upstream = up
            yield g


def tagway(gw: GatewayProcess, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The `tagway` CLI as a CI step runs it: in `cwd`, the gateway's config and admin key in the environment."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**gw.env, "TAGWAY_CONFIG": gw.config_path, "TAGWAY_ADMIN_KEY": ADMIN})


def test_resume_where_the_run_started_reads_the_prompt_file_beside_the_spec(gw, tmp_path):
    """The spec in ci/ names its prompt file relative to itself (ci/prompts/v5.txt); the job runs from the
    repository root, where prompts/v5.txt is another file. The run read ci/prompts/v5.txt; the resume, from the same
    directory, read prompts/v5.txt (or, without it, stopped with exit 2 "cannot read prompt file")."""
    (tmp_path / "ci" / "prompts").mkdir(parents=True)
    (tmp_path / "ci" / "prompts" / "v5.txt").write_text("You are the v5 agent.")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "v5.txt").write_text("DECOY: not this run's prompt.")
    (tmp_path / "ci" / "replay.yaml").write_text(yaml.safe_dump({
        "slice": {"customer": ["acme", "globex"], "since": "1h", "segment_by": ["customer"]},
        "candidates": [{"name": "v5", "model": "gpt-test", "prompt": {"file": "prompts/v5.txt", "version": "v5"}}],
        "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    run_id = f"ci-trial-{os.getpid()}-{time.monotonic_ns()}"
    p = tagway(gw, tmp_path, "replay", "run", "--spec", "ci/replay.yaml", "--gateway", gw.url, "--no-progress",
               "--run-id", run_id, "--max-cost", "0.03", "--concurrency", "1")
    assert p.returncode == 3, p.stderr  # the budget stopped it
    assert f"`tagway replay resume {run_id}` runs the rest" in p.stderr
    # the run stored its prompt's text, not a path: the file may even be gone (another checkout, a later commit)
    (tmp_path / "ci" / "prompts" / "v5.txt").unlink()
    p = tagway(gw, tmp_path, "replay", "resume", run_id, "--gateway", gw.url, "--no-progress", "--max-cost", "10",
               "--format", "json")
    assert p.returncode == 0, p.stderr
    report = orjson.loads(p.stdout)
    assert report["status"] == "complete" and report["verdict"] == "passed"
    assert sum(r["n"] for r in report["candidates"][0]["rows"]) == 16
    systems = [m["content"] for r in gw.upstream.requests if r["path"] == "/v1/chat/completions"
               for m in (r["body"] or {}).get("messages", []) if m.get("role") == "system"]
    assert systems.count("You are the v5 agent.") == 16 and not [s for s in systems if "DECOY" in s]


def test_resume_with_spec_dir_reads_the_jsonl_dataset_the_run_read(gw, tmp_path):
    """`--dataset datasets/refunds.jsonl` is read from the working directory; `resume --spec-dir ci` (what python
    evaluators beside the spec need) read it from ci/ instead: exit 2 "cannot read .../ci/datasets/refunds.jsonl".
    A resume reads it where the run did, from the working directory, and beside the spec only when it is not
    there."""
    (tmp_path / "ci").mkdir()
    (tmp_path / "datasets").mkdir()
    (tmp_path / "ci" / "replay.yaml").write_text(yaml.safe_dump({
        "slice": {"customer": ["acme", "globex"], "since": "1h", "segment_by": ["customer"]},
        "candidates": [{"name": "same", "model": "gpt-test"}],
        "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    p = tagway(gw, tmp_path, "replay", "dataset", "save", "datasets/refunds.jsonl", "--spec", "ci/replay.yaml")
    assert p.returncode == 0, p.stderr
    run_id = f"ci-trial-jsonl-{os.getpid()}-{time.monotonic_ns()}"
    p = tagway(gw, tmp_path, "replay", "run", "--spec", "ci/replay.yaml", "--dataset", "datasets/refunds.jsonl",
               "--gateway", gw.url, "--no-progress", "--run-id", run_id, "--max-cost", "0.03", "--concurrency", "1")
    assert p.returncode == 3, p.stderr
    p = tagway(gw, tmp_path, "replay", "resume", run_id, "--spec-dir", "ci", "--gateway", gw.url, "--no-progress",
               "--max-cost", "10", "--format", "json")
    assert p.returncode == 0, p.stderr
    report = orjson.loads(p.stdout)
    assert report["status"] == "complete" and sum(r["n"] for r in report["candidates"][0]["rows"]) == 16
    assert report["dataset"] == "datasets/refunds.jsonl"  # as given: runs of one file stay one trend


def test_the_plugin_leaves_a_project_its_own_gateway_option(gw, pytester, monkeypatch):
    """A project's conftest with `--gateway` (its own API gateway): pytest stopped before collecting anything,
    argparse "conflicting option string: --gateway", in every project of an environment with tagway installed."""
    monkeypatch.setenv("TAGWAY_CONFIG", gw.config_path)
    monkeypatch.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    (pytester.path / "good.yaml").write_text(yaml.safe_dump({
        "candidates": [{"name": "good", "model": "gpt-test"}], "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    pytester.makeconftest("""
        def pytest_addoption(parser):
            parser.addoption("--gateway", default="http://api.internal", help="our own API gateway")
    """)
    pytester.makepyfile(test_project="""
        def test_our_option(request):
            assert request.config.getoption("--gateway") == "http://api.internal"

        def test_the_gate(tagway_gate):
            assert tagway_gate(spec="good.yaml", dataset="refunds@1").verdict == "passed"
    """)
    res = pytester.runpytest_subprocess("--tagway-gateway", gw.url, "-p", "no:cacheprovider")
    res.assert_outcomes(passed=2)
    assert "conflicting option" not in res.stderr.str()


def test_the_gate_s_bad_spec_fails_its_test_with_one_line(gw, pytester, monkeypatch):
    monkeypatch.setenv("TAGWAY_CONFIG", gw.config_path)
    monkeypatch.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    (pytester.path / "bad.yaml").write_text(yaml.safe_dump({
        "candidates": [{"name": "c", "model": "gpt-test"}], "evaluators": [{"type": "icontain", "value": "x"}]}))
    pytester.makepyfile(test_specs="""
        import pytest

        def test_missing(tagway_gate):
            tagway_gate(spec="nope.yaml", dataset="refunds@1")

        @pytest.mark.tagway_gate(spec="bad.yaml", dataset="refunds@1")
        def test_invalid():
            pass
    """)
    res = pytester.runpytest_subprocess("--gateway", gw.url, "-p", "no:cacheprovider")
    res.assert_outcomes(failed=2)
    out = res.stdout.str()
    assert "tagway_gate: spec file 'nope.yaml' not found" in out
    assert "evaluators.0.type: unknown evaluator type 'icontain'" in out
    assert "UsageError" not in out and "pytest_plugin.py" not in out and "During handling" not in out


def test_plan_takes_the_slice_flags_run_takes(gw, tmp_path):
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump({
        "slice": {"since": "1h", "segment_by": ["customer"], "sampling": {"min_per_segment": 2}},
        "candidates": [{"name": "c", "model": "gpt-test"}], "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    p = tagway(gw, tmp_path, "replay", "plan", "--spec", "replay.yaml", "--tag", "region=eu", "--limit", "5",
               "--format", "json")
    assert p.returncode == 0, p.stderr
    rows = orjson.loads(p.stdout)["rows"]
    assert [(r["segment"], r["available"], r["sampled"]) for r in rows] == [("acme", 8, 5)]
    p = tagway(gw, tmp_path, "replay", "plan", "--spec", "replay.yaml", "--limit", "0")
    assert p.returncode == 2 and p.stderr.strip() == "error: --limit 0: Input should be greater than or equal to 1"


def test_trend_of_a_spec_file_without_a_name(gw, tmp_path):
    """The README's spec has no `name:`; `trend --spec replay.yaml --dataset refunds` stopped with "the spec has
    no name:" though the dataset says which runs; the spec's alpha now applies to them."""
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump({
        "candidates": [{"name": "bad", "model": "refund-bad"}], "evaluators": [{"type": "contains", "value": "Echo:"}],
        "gating": {"alpha": 0.01}}))
    for _ in range(2):
        p = tagway(gw, tmp_path, "replay", "run", "--spec", "replay.yaml", "--dataset", "refunds@1", "--gateway",
                   gw.url, "--no-progress")
        assert p.returncode == 1, p.stderr  # acme's refunds answered WRONG
    p = tagway(gw, tmp_path, "replay", "trend", "--spec", "replay.yaml", "--dataset", "refunds", "--format", "json",
               "--candidate", "bad")
    assert p.returncode == 0, p.stderr
    trend = orjson.loads(p.stdout)
    assert trend["dataset"] == "refunds" and len(trend["runs"]) >= 2
    assert {s["segment"]: s["points"][-1]["rate"] for s in trend["series"]} == {"acme": 0.0, "globex": 1.0}
    p = tagway(gw, tmp_path, "replay", "trend", "--spec", "replay.yaml")
    assert p.returncode == 2 and "has no `name:`" in p.stderr and "--dataset" in p.stderr


def test_report_of_a_stored_run_is_the_run_s_own_report(gw, tmp_path):
    """`replay report RUN_ID --format json` rebuilt the report without what the run said about its cases: its notes
    (here the per-segment floor that overrode --limit; a resume's kept and recorded results; a shadow window's
    dropped calls) and its skipped counts, so the JSON a CI job stored differed from the one it fetched later."""
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump({
        "slice": {"since": "1h", "segment_by": ["customer"], "sampling": {"min_per_segment": 8}},
        "candidates": [{"name": "bad", "model": "refund-bad"}], "evaluators": [{"type": "contains", "value": "Echo:"}],
        "gating": {"escalation": {"enabled": False}}}))
    p = tagway(gw, tmp_path, "replay", "run", "--spec", "replay.yaml", "--gateway", gw.url, "--no-progress",
               "--limit", "2", "--format", "json")
    assert p.returncode == 1, p.stderr
    ran = orjson.loads(p.stdout)
    assert ran["notes"] == ["the per-segment floor (8 x 2 segments = 16) exceeds limit 2; the floor wins"]
    p = tagway(gw, tmp_path, "replay", "report", ran["run_id"], "--format", "json")
    assert p.returncode == 1, p.stderr
    assert orjson.loads(p.stdout) == ran
    p = tagway(gw, tmp_path, "replay", "report", ran["run_id"], "--format", "md")
    assert "- note: the per-segment floor (8 x 2 segments = 16) exceeds limit 2; the floor wins" in p.stdout


def test_a_run_given_only_the_gateway_is_stored_where_the_gateway_records(gw, tmp_path):
    """The README's CI line names the gateway and no store: the run went into a new ./tagway-data in the job's
    directory, so `replay report RUN --config` (and the dashboard link of a PR comment) said "no replay run" and a
    slice found no call there (a replay trial). The gateway names its store to the admin key; a key it names it to
    nobody else gets one line asking for --config or --dsn, and no store is made."""
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump({
        "slice": {"customer": ["acme"], "since": "1h", "segment_by": ["customer"]},
        "candidates": [{"name": "same", "model": "gpt-test"}],
        "evaluators": [{"type": "contains", "value": "Echo:"}]}))
    env = {k: v for k, v in gw.env.items() if k not in ("TAGWAY_CONFIG", "TAGWAY_DSN")}
    run_id = f"ci-trial-gw-only-{os.getpid()}-{time.monotonic_ns()}"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env=env)

    p = run("replay", "run", "--spec", "replay.yaml", "--gateway", gw.url, "--api-key", ADMIN, "--no-progress",
            "--run-id", run_id, "--format", "json")
    assert p.returncode == 0, p.stderr
    assert sum(r["n"] for r in orjson.loads(p.stdout)["candidates"][0]["rows"]) == 8  # acme's 8 calls: its store
    assert not (tmp_path / "tagway-data").exists()
    p = tagway(gw, tmp_path, "replay", "report", run_id, "--format", "json")  # through the gateway's config
    assert p.returncode == 0 and orjson.loads(p.stdout)["run_id"] == run_id, p.stderr

    p = run("replay", "run", "--spec", "replay.yaml", "--gateway", gw.url, "--api-key", KEYS["acme"],
            "--no-progress")
    assert p.returncode == 2, p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.strip()]
    assert f"which store? --gateway {gw.url} was given but no store (it names its store only to the admin key): " \
           "pass the gateway's --config, or --dsn" in line, line
    assert not (tmp_path / "tagway-data").exists()


class _Whoami:
    """A server posing as a gateway: its whoami says what the test wants (admin or not, a store)."""

    def __init__(self, answer: dict, status: int = 200) -> None:
        from aiohttp import web  # noqa: PLC0415

        from tests.http_server import ThreadedServer  # noqa: PLC0415

        class Server(ThreadedServer):
            def routes(self, app: web.Application) -> None:
                async def whoami(_: web.Request) -> web.Response:
                    return web.json_response(answer, status=status)
                app.router.add_get("/v1/tagway/whoami", whoami)

        self.server = Server()

    def __enter__(self) -> str:
        return self.server.start().url

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def test_a_gateway_naming_a_store_is_believed_only_for_the_store_it_announces_here(gw, tmp_path, monkeypatch):
    """The store a gateway names is used only when it is the store a gateway on this machine announces at that
    address: a remote gateway (or a server posing as one) naming an existing local path got that path opened, and
    a store named but unusable here fell back to a leftover ./tagway-data (a review)."""
    from exporters.dsn import resolve_dsn  # noqa: PLC0415
    from replay.runner import store_dsn_for  # noqa: PLC0415
    from replay.spec import SpecError  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAGWAY_CONFIG", raising=False)
    monkeypatch.delenv("TAGWAY_DSN", raising=False)
    default = resolve_dsn()
    store = os.path.realpath(os.path.join(os.path.dirname(gw.config_path), "data", "clickhouse"))
    assert store_dsn_for(default, gw.url, ADMIN) == f"chdb://{store}"  # the real one: announced here, same port
    (tmp_path / "tagway-data" / "clickhouse").mkdir(parents=True)  # a leftover local store
    for answer, said in (({"admin": True, "store": {"embedded": str(tmp_path)}}, "is not the one a gateway on this "
                                                                                   "machine announces"),
                         ({"admin": True, "store": {"embedded": store}}, "is not the one a gateway on this machine "
                                                                          "announces"),  # another port than gw's
                         ({"admin": True, "store": {"server": "http://ch:8123/tagway"}}, "it records to http://ch")):
        with _Whoami(answer) as url, pytest.raises(SpecError) as e:
            store_dsn_for(default, url, ADMIN)
        assert said in str(e.value) and "pass the gateway's --config, or --dsn" in str(e.value), e.value
    with _Whoami({"admin": False, "store": {"embedded": store}}) as url:  # not admin: its store is not taken
        assert store_dsn_for(default, url, ADMIN) == default.dsn  # nothing named: the local store, as before
    with _Whoami({"error": {}}, status=401) as url:
        (tmp_path / "tagway-data" / "clickhouse").rmdir()
        with pytest.raises(SpecError) as e:
            store_dsn_for(default, url, "wrong")
        assert "the gateway refused the key (HTTP 401)" in str(e.value)
    assert store_dsn_for(default, "localhost:4000", ADMIN) == default.dsn  # not a URL: said where it is used
    assert store_dsn_for(default, "http://[::1", ADMIN) == default.dsn  # nor this (it was a traceback)
