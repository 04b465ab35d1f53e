"""`tagway replay trend` on seeded runs in chDB (issue 16): three runs of refunds@1 and one of refunds@2, stored as
the pipeline stores them (results, and the gate's report from replay.report.aggregate). Per segment: the pass rate
per run, the change against the previous run and the pinned run, the drop the gate's paired test calls a
regression, and a break where the dataset version changes; every number checked, in JSON and in the table."""
from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from replay.cli import replay_app
from replay.render import render_json
from replay.report import aggregate
from replay.spec import Gating
from replay.store import ResultRow, RunRow, read_results, write_results, write_run
from tests.replay_support import unique

N = 40


def seed_run(store, run_id: str, dataset: str, created_at: float, passes: dict[str, int],
             base_passes: dict[str, int], prefix: str, evaluators: list | None = None) -> None:
    """Per customer N cases (ids shared by every run of one dataset version); the first `passes` pass."""
    rows = []
    for customer in passes:
        for i in range(N):
            cid = f"{prefix}-{customer}-{i:02d}"
            intent = "refund" if i % 2 else "billing"
            for cand, k in (("baseline", base_passes[customer]), ("cand", passes[customer])):
                rows.append(ResultRow(run_id, cid, cand, customer, "passed" if i < k else "failed",
                                      customer=customer, intent=intent, dataset_id=dataset))
    write_results(store, rows)
    report = aggregate(read_results(store, run_id), Gating(), run_id=run_id, segment_by=["customer"],
                       dataset=dataset)
    spec = {"name": "refunds-gate", **({"evaluators": evaluators} if evaluators else {})}
    write_run(store, RunRow(run_id, "complete", orjson.dumps(spec).decode(), dataset, "",
                            ["cand"], ["customer"], 2 * N, report.verdict, render_json(report),
                            created_at=created_at, finished_at=created_at + 1))


@pytest.fixture()
def seeded(chdb_store):
    name = unique("refunds")
    runs = [unique("r1"), unique("r2"), unique("r3"), unique("r4")]
    base = {"acme": 36, "globex": 30}
    seed_run(chdb_store, runs[0], f"{name}@1", 1000.0, {"acme": 36, "globex": 30}, base, name + "v1")
    seed_run(chdb_store, runs[1], f"{name}@1", 2000.0, {"acme": 36, "globex": 30}, base, name + "v1")
    seed_run(chdb_store, runs[2], f"{name}@1", 3000.0, {"acme": 24, "globex": 32}, base, name + "v1")
    seed_run(chdb_store, runs[3], f"{name}@2", 4000.0, {"acme": 38, "globex": 20}, {"acme": 38, "globex": 20},
             name + "v2")
    return {"name": name, "runs": runs, "dsn": chdb_store.dsn}


def trend(seeded, *args: str):
    return CliRunner().invoke(replay_app, ["trend", "--dataset", seeded["name"], "--dsn", seeded["dsn"], *args],
                              catch_exceptions=False)


def test_trend_numbers_on_seeded_runs(seeded):
    res = trend(seeded, "--by", "customer", "--format", "json")
    assert res.exit_code == 0, res.output
    d = orjson.loads(res.stdout)
    assert [r["run_id"] for r in d["runs"]] == seeded["runs"]  # oldest first
    s = {x["segment"]: x for x in d["series"]}
    acme, globex = s["acme"], s["globex"]
    assert [p["rate"] for p in acme["points"]] == [0.9, 0.9, 0.6, 0.95]
    assert [p["n"] for p in acme["points"]] == [N] * 4
    assert acme["sparkline"] == "██▅|█"  # int(rate * 8): 0.9 and 0.95 -> █, 0.6 -> ▅; a break before @2
    assert [p["breaks"] for p in acme["points"]] == [False, False, False, True]
    assert [p["vs_previous"] for p in acme["points"]] == [None, 0.0, pytest.approx(-0.3), None]
    assert [p["vs_pinned"] for p in acme["points"]] == [None, 0.0, pytest.approx(-0.3), None]  # run 1 is pinned
    # run 3 dropped 12 cases that passed in run 2 (paired, 12 pass->fail, none back): a regression by the gate's test
    assert [p["previous_regression"] for p in acme["points"]] == [False, False, True, False]
    assert [p["pinned_regression"] for p in acme["points"]] == [False, False, True, False]
    assert [p["gate"] for p in acme["points"]] == ["ok", "ok", "regression", "ok"]  # each run's own gate
    assert [p["dataset"] for p in acme["points"]] == [f"{seeded['name']}@1"] * 3 + [f"{seeded['name']}@2"]
    assert acme["regressed"] is False  # the newest run (refunds@2) is fine
    assert [p["rate"] for p in globex["points"]] == [0.75, 0.75, 0.8, 0.5]
    assert globex["sparkline"] == "▇▇▇|▅"
    assert [p["vs_previous"] for p in globex["points"]] == [None, 0.0, pytest.approx(0.05), None]
    assert not any(p["previous_regression"] or p["pinned_regression"] for p in globex["points"])


def test_trend_pinned_baseline_and_one_version(seeded):
    r2 = seeded["runs"][1]
    res = trend(seeded, "--baseline", r2, "--format", "json")
    d = orjson.loads(res.stdout)
    acme = next(x for x in d["series"] if x["segment"] == "acme")
    assert d["pinned"] == r2
    assert [p["vs_pinned"] for p in acme["points"]] == [0.0, None, pytest.approx(-0.3), None]
    # one version only: no break, the newest run of it is the last point, and it regressed
    res = CliRunner().invoke(replay_app, ["trend", "--dataset", f"{seeded['name']}@1", "--dsn", seeded["dsn"],
                                          "--format", "json"])
    acme = next(x for x in orjson.loads(res.stdout)["series"] if x["segment"] == "acme")
    assert acme["sparkline"] == "██▅" and acme["regressed"] is True


def test_trend_regroups_runs_by_another_key(seeded):
    res = trend(seeded, "--by", "intent", "--format", "json")
    s = {x["segment"]: x for x in orjson.loads(res.stdout)["series"]}
    assert set(s) == {"billing", "refund"}
    # run 3: acme passes cases 0-23 (12 billing, 12 refund), globex 0-31 (16 and 16): 28 of 40 per intent
    assert [p["n"] for p in s["refund"]["points"]] == [2 * N // 2] * 4
    assert s["refund"]["points"][2]["rate"] == pytest.approx(28 / 40)
    assert s["refund"]["points"][2]["gate"] == ""  # regrouped: the run's gate decided other segments


def test_trend_table(seeded):
    res = trend(seeded, "--by", "customer")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if " acme " in f" {x} ")
    assert "██▅|█" in line and "0.950" in line
    assert "| = a new dataset version" in " ".join(res.stdout.split())


def test_a_mark_from_the_last_runs_own_gate_says_so(chdb_store):
    """Two runs whose candidate is worse than their baseline by the same amount: no drop between them (+0.000), and
    a bare "❌ regression" beside +0.000 read as one (a replay trial). The mark says it is the run's own gate."""
    name = unique("samedrop")
    runs = [unique("s1"), unique("s2")]
    for i, run in enumerate(runs):
        seed_run(chdb_store, run, f"{name}@1", 1000.0 * (i + 1), {"acme": 10}, {"acme": 36}, name + "v1")
    res = CliRunner().invoke(replay_app, ["trend", "--dataset", name, "--dsn", chdb_store.dsn], env={"COLUMNS": "250"},
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    line = " ".join(next(x for x in res.stdout.splitlines() if " acme " in f" {x} ").split())
    # vs previous, vs pinned (no drop: no ❌ of their own), then the mark
    assert "+0.000 +0.000 ❌ last run's gate: regression vs its baseline" in line, line


@pytest.mark.parametrize("args, message", [
    ([], "error: a trend needs --spec or --dataset"),
    (["--dataset", "nothing-here"], "error: no replay run of dataset 'nothing-here'"),
    (["--dataset", "DATASET", "--baseline", "nope"], "error: --baseline 'nope' is not one of the trend's runs"),
    (["--dataset", "DATASET", "--by", "colour"], "error: a trend segments by one of customer, intent, "
                                                 "prompt_version, model or tag.<key>, not 'colour'"),
    (["--dataset", "DATASET", "--alpha", "0.9"], "error: --alpha 0.9: Input should be less than 0.5"),
])
def test_trend_bad_input_is_one_line(seeded, args, message):
    args = [seeded["name"] if a == "DATASET" else a for a in args]
    res = CliRunner().invoke(replay_app, ["trend", "--dsn", seeded["dsn"], *args], catch_exceptions=False)
    assert res.exit_code == 2
    assert res.stderr.startswith(message) and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_series_breaks_where_the_evaluators_change(chdb_store):
    """Runs of one dataset version scored by different evaluators measure different things: the trend compared them
    and marked a -0.967 "regression" when a label evaluator replaced icontains. The series now breaks there."""
    name = unique("evals")
    runs = [unique("e1"), unique("e2"), unique("e3")]
    contains = [{"type": "icontains", "value": "approved"}]
    label = [{"type": "label"}]
    for run, at, evaluators, passes in ((runs[0], 1000.0, contains, 36), (runs[1], 2000.0, contains, 36),
                                        (runs[2], 3000.0, label, 2)):
        seed_run(chdb_store, run, f"{name}@1", at, {"acme": passes}, {"acme": 36}, name, evaluators)
    res = CliRunner().invoke(replay_app, ["trend", "--dataset", name, "--dsn", chdb_store.dsn, "--format", "json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (acme,) = orjson.loads(res.stdout)["series"]
    assert [p["breaks"] for p in acme["points"]] == [False, False, True]
    last = acme["points"][-1]
    assert last["vs_previous"] is None and not last["previous_regression"] and not last["pinned_regression"]
