"""Versioned datasets (issue 12) over the shared chDB store: the storage core (immutable versions, concurrent
writers), building from traces (a stratified sample, a run's flipped cases, named traces), the lock, labels (CLI,
admin API, the `label` evaluator through the real runner), export/import, targets and coverage, difficulty from
history, and the bad input the issue lists. The end-to-end path through the real gateway is test_datasets_e2e."""
from __future__ import annotations

import asyncio
import os
import uuid

import orjson
import pytest
import typer
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from exporters import datasets as core
from exporters.feedback import feedback_row, insert_feedback, parse_feedback
from exporters.vocabulary import QueryInputError
from gateway.auth import KeyRing, hash_key
from gateway.config import GatewayConfig, KeyConfig, TenantConfig
from gateway.datasets_api import build_datasets_router
from gateway.recent import RecentCalls
from replay.datasets.cli import register
from replay.datasets import capture, load
from replay.datasets.design import propose_difficulty
from replay.datasets.resolve import resolve
from replay.gate import BROKEN, HELD, UNDECIDED, Evidence, check_locks, decide, pairs_from
from replay.pipeline import RunOptions, start_run
from replay.spec import parse_spec
from replay.store import ResultRow, RunRow, read_results, write_results, write_run
from tests.replay_support import API_KEY, FakeLLM, call_span, record

app = typer.Typer()
register(app)
cli = CliRunner()
ADMIN = "tw-admin-datasets-test-0123456789"


def tw(*args, **kw):
    return cli.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)


def error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def world(chdb_store):
    """Production traces for three customers of one run tag: a 10 calls, b 6, c 2 (one of c's without content), all
    intent refund with tag tier; the answers say 'approved' except every 4th of a."""
    run = uid("ds")
    a, b, c = uid("acme"), uid("globex"), uid("initech")
    spans = []
    for cust, n in ((a, 10), (b, 6), (c, 2)):
        for i in range(n):
            spans.append(call_span(customer=cust, intent="refund", user=f"refund #{i} for {cust}",
                                   answer="denied" if cust == a and i % 4 == 0 else "approved",
                                   tags={"run": run, "tier": "enterprise" if cust == a else "smb"},
                                   capture=not (cust == c and i == 1)))
    ids = record(chdb_store, spans)
    by = {a: ids[:10], b: ids[10:16], c: ids[16:18]}
    return {"run": run, "a": a, "b": b, "c": c, "ids": by, "dsn": chdb_store.dsn, "store": chdb_store,
            "common": ["--dsn", chdb_store.dsn]}


def add(world, name, *args):
    return tw("dataset", "add", name, *args, *world["common"], "--author", "tester")


# -- the storage core ---------------------------------------------------------------------------------------------
def test_versions_are_immutable_and_a_concurrent_writer_lands_on_top(world):
    store, name = world["store"], uid("core")
    caps, problems = capture(store, world["ids"][world["a"]][:3], origin="trace", added_by="t")
    assert problems == {}
    from replay.datasets import add_cases
    add_cases(store, name, caps[:1], message="first", author="t")
    raced = []

    def change(latest, cases):  # the first attempt is overtaken by another writer of the same version
        if not raced:
            raced.append(add_cases(store, name, caps[1:2], message="other writer", author="u").version)
        return cases + [caps[2].record], latest.targets

    v = core.commit(store, name, change, author="t", message="mine", op="add")
    assert raced[0].version == 2 and v.version == 3  # retried on top of the winner
    assert [c.trace_id for c in core.read_cases(store, core.get_version(store, f"{name}@2"))] == \
        [caps[0].trace_id, caps[1].trace_id]  # the loser's rows of version 2 are never read
    assert [x.trace_id for x in load(store, name).cases] == [c.trace_id for c in caps]
    assert [c.trace_id for c in load(store, f"{name}@1").cases] == [caps[0].trace_id]
    with pytest.raises(core.DatasetStoreError, match="empty version"):
        core.commit(store, name, lambda latest, cases: ([], {}), author="t", message="", op="remove")
    for bad in ("a b", "x@y", "-lead", "n" * 65):
        with pytest.raises(core.DatasetStoreError):
            core.parse_ref(bad)
    assert core.parse_ref("refunds@3") == ("refunds", 3) and core.parse_ref("refunds") == ("refunds", None)


# -- building from traces -----------------------------------------------------------------------------------------
def test_add_a_stratified_sample_never_twice_and_name_what_cannot_be_a_case(world):
    name = uid("sample")
    where = ["--where", f"tag.run={world['run']}", "--since", "1h", "--stratify", "customer"]
    res = add(world, name, *where, "--sample", "8", "--min-per-segment", "2", "--seed", "4")
    assert res.exit_code == 0 and f"{name}@1: added 8 case(s)" in res.output, res.output
    counts = lambda: {cust: sum(1 for x in load(world["store"], name).cases if x.record.customer == cust)  # noqa: E731
                      for cust in (world["a"], world["b"], world["c"])}
    first = counts()
    assert first[world["c"]] == 1 and first[world["a"]] >= 2 and first[world["b"]] >= 2  # c holds one with content
    assert "skipped 1: no captured content" in res.output
    res = add(world, name, *where, "--sample", "8", "--seed", "4")
    assert res.exit_code == 0 and f"{name}@2: added 8 case(s)" in res.output, res.output
    res = add(world, name, *where, "--sample", "8")
    assert res.exit_code == 0 and f"{name}@3: added 1 case(s)" in res.output, res.output
    assert counts() == {world["a"]: 10, world["b"]: 6, world["c"]: 1}
    res = add(world, name, *where, "--sample", "8")
    assert res.exit_code == 0 and "nothing new" in res.output and "no new version" in res.output
    assert core.get_version(world["store"], name).version == 3
    # named traces: one never recorded, one without content: named, nothing added
    ghost, bare = "0" * 32, world["ids"][world["c"]][1]
    res = add(world, uid("named"), "--trace", world["ids"][world["b"]][0], "--trace", ghost, "--trace", bare)
    line = error_line(res)
    assert res.exit_code == 2 and "nothing added" in line and ghost in line and "removed by the TTL" in line
    assert f"{bare}: recorded without content" in line
    res = add(world, name, "--trace", world["ids"][world["b"]][0])
    assert res.exit_code == 0 and "nothing new" in res.output
    for bad, msg in ((["--where", "tier=x"], "unknown filter column"), (["--sample", "0"], "at least 1"),
                     (["--flipped"], "--from-run"), (["--where", "intent=refund", "--trace", "x"], "one way"),
                     (["--from-feedback", "angry"], "complaints, negative, any")):
        res = add(world, name, *bad)
        assert res.exit_code == 2 and msg in error_line(res), (bad, res.output)


def test_from_run_flipped_takes_the_cases_the_gate_found(world):
    store, rid = world["store"], uid("run")
    ids = world["ids"][world["b"]][:4]
    write_run(store, RunRow(rid, "complete", orjson.dumps({"gating": {"errors": "fail"}}).decode()))
    rows = [ResultRow(rid, t, "baseline", "s", "passed") for t in ids]
    rows += [ResultRow(rid, t, "cand", "s", status) for t, status in zip(ids, ("failed", "passed", "errored",
                                                                               "passed"))]
    write_results(store, rows)
    name = uid("flips")
    res = add(world, name, "--from-run", rid, "--flipped")
    assert res.exit_code == 0 and f"{name}@1: added 2 case(s)" in res.output, res.output
    assert set(load(store, name).trace_ids) == {ids[0], ids[2]}  # failed, and errored (errors: fail)
    res = add(world, name, "--from-run", rid)
    assert res.exit_code == 0 and "added 2 case(s), 2 already in it" in res.output, res.output
    assert error_line(add(world, name, "--from-run", "no-such-run")).endswith("(see `tagway replay report`)")


# -- the lock -----------------------------------------------------------------------------------------------------
def test_a_locked_case_goes_only_with_force_and_a_reason_kept_in_the_log(world):
    name, t = uid("locks"), world["ids"][world["a"]][1]
    res = tw("dataset", "lock", t, "--dataset", name, "--expect", "pass", *world["common"])
    assert res.exit_code == 2 and f"no dataset {name!r}" in error_line(res) and "--create" in error_line(res)
    assert name not in core.dataset_names(world["store"])  # a mistyped name makes no dataset
    res = tw("dataset", "lock", t, "--dataset", name, "--expect", "pass", "--note", "refund-v4 dropped the clause",
             "--create", *world["common"])
    assert res.exit_code == 0 and f"{name}@1: locked {t}" in res.output, res.output
    add(world, name, "--trace", world["ids"][world["a"]][2])
    assert load(world["store"], name).locks()[t].note == "refund-v4 dropped the clause"
    for extra in ([], ["--force"], ["--reason", "obsolete"]):
        res = tw("dataset", "remove", name, t, *extra, *world["common"])
        assert res.exit_code == 2 and "--force and --reason" in error_line(res)
    res = tw("dataset", "remove", name, t, "--force", "--reason", "the flow was retired", *world["common"])
    assert res.exit_code == 0 and f"{name}@3: removed 1 case(s)" in res.output
    log = core.history(world["store"], name)
    assert "forced: the flow was retired" in log[0].message and log[0].op == "remove"
    res = tw("dataset", "lock", t, "--dataset", name, "--expect", "maybe", *world["common"])
    assert res.exit_code == 2 and "pass or fail" in error_line(res)


def test_locks_decide_the_gate_whatever_the_statistics():
    """Pure: a segment that improved (8 fail->pass) with one broken lock is a regression; held and undecided locks
    change nothing."""
    improved = Evidence("acme", (pairs_from([(False, True)] * 8 + [(True, True)] * 6),))  # 6 passes: can be judged
    locks = check_locks({"t1": {"expect": "pass", "note": "bug 1"}, "t2": {"expect": "fail"}, "t3": {}},
                        {"t1": False, "t2": False, "t3": None}, {"t1": "acme", "t2": "acme", "t3": "acme"})
    assert [(lk.trace_id, lk.state) for lk in locks] == [("t1", BROKEN), ("t2", HELD), ("t3", UNDECIDED)]
    d = decide([improved], alpha=0.05, margin=0.05, locks=locks)
    assert d.status == "regression" and d.segments[0].verdict == "regression" and "bug 1" in d.segments[0].why
    d = decide([improved], alpha=0.05, margin=0.05, locks=locks[1:])
    assert d.status == "ok"


# -- labels -------------------------------------------------------------------------------------------------------
def test_labels_from_the_cli_and_the_admin_api_are_versions(world, monkeypatch):
    store, name = world["store"], uid("labels")
    t0, t1 = world["ids"][world["a"]][:2]
    add(world, name, "--trace", t0, "--trace", t1)
    res = tw("dataset", "label", name, t0, "--fail", "--critique", "promised a refund the policy forbids",
             "--adjudicated", *world["common"], "--author", "ana")
    assert res.exit_code == 0 and f"{name}@2: labelled 1 case(s) fail" in res.output
    rec = load(store, name).cases[0].record
    assert (rec.label, rec.critique, rec.labeller, rec.adjudicated) == (
        "fail", "promised a refund the policy forbids", "ana", True)
    for bad in (["--label", "maybe"], ["--label", "good"]):
        res = tw("dataset", "label", name, t0, *bad, *world["common"])
        assert res.exit_code == 2 and "pass or fail" in error_line(res)
    for twice in (["--pass", "--fail"], ["--fail", "--label", "fail"], []):  # never the last one, silently
        res = tw("dataset", "label", name, t0, *twice, *world["common"])
        assert res.exit_code == 2 and "give the label once" in error_line(res), res.output
    res = tw("dataset", "label", name, "nope", "--pass", *world["common"])
    assert res.exit_code == 2 and "not in this dataset: nope" in error_line(res)

    monkeypatch.setenv("TAGWAY_DS_TEST_ADMIN", ADMIN)
    ring = KeyRing(GatewayConfig(admin_key_env="TAGWAY_DS_TEST_ADMIN", tenants=[
        TenantConfig(customer="acme", keys=[KeyConfig(id="acme-1", hash=hash_key("tw-acme-ds-test"))])]))
    api = FastAPI()
    api.include_router(build_datasets_router(ring, lambda: store))
    with TestClient(api) as c:
        h = {"Authorization": f"Bearer {ADMIN}"}
        r = c.post(f"/admin/datasets/{name}/labels", json={"trace_ids": [t1], "label": "pass", "labeller": "bo",
                                                           "critique": "cites the policy"}, headers=h)
        assert r.status_code == 201 and r.json()["ref"] == f"{name}@3", r.text
        assert load(store, name).cases[1].record.label == "pass"
        r = c.post(f"/admin/datasets/{name}/labels", json={"trace_ids": [t1], "label": "meh"}, headers=h)
        assert r.status_code == 400 and "pass or fail" in r.json()["error"]["message"]
        r = c.post(f"/admin/datasets/{name}x/labels", json={"trace_ids": [t1], "label": "pass"}, headers=h)
        assert r.status_code == 404 and f"did you mean {name}" in r.json()["error"]["message"]
        r = c.post(f"/admin/datasets/{name}/labels", json={"trace_ids": [t1], "label": "pass", "labeller": "bo",
                                                           "critique": "cites the policy"}, headers=h)
        assert r.status_code == 409  # the same label again changes nothing: no version
        r = c.post(f"/admin/datasets/{name}/labels", json={"trace_ids": [t1], "label": "fail"},
                   headers={"Authorization": "Bearer tw-acme-ds-test"})
        assert r.status_code == 403
        got = c.get(f"/admin/datasets/{name}@2", headers=h).json()
        assert [x["label"] for x in got["cases"]] == ["fail", ""]
        assert [v["version"] for v in c.get(f"/admin/datasets/{name}/log", headers=h).json()["data"]] == [3, 2, 1]


def test_the_label_evaluator_uses_the_human_label_as_the_reference(world, tmp_path):
    """Through the real runner: the logged answer takes its label as the verdict; a candidate passes when it is
    like a pass-labelled answer and unlike a fail-labelled one; an unlabelled case is an evaluator error."""
    store, name = world["store"], uid("labref")
    good, bad, none = world["ids"][world["b"]][:3]
    add(world, name, "--trace", good, "--trace", bad, "--trace", none)
    tw("dataset", "label", name, good, "--pass", *world["common"])
    tw("dataset", "label", name, bad, "--fail", "--critique", "approves without checking", *world["common"])
    spec = parse_spec({"dataset": name, "candidates": [{"name": "cand", "model": "m"}],
                       "evaluators": [{"type": "label", "threshold": 0.9}], "gating": {"margin": 0.9}})

    with FakeLLM({"m": lambda user, h: "approved"}) as gw:  # repeats the production answer everywhere
        rid = uid("lab")
        asyncio.run(start_run(store, spec, RunOptions(gateway_url=gw.url, api_key=API_KEY, progress=False, run_id=rid)))
    got = {(r.candidate, r.case_id): r.status for r in read_results(store, rid)}
    assert got == {("baseline", good): "passed", ("baseline", bad): "failed", ("baseline", none): "errored",
                   ("cand", good): "passed", ("cand", bad): "failed", ("cand", none): "errored"}
    res = next(r for r in read_results(store, rid) if r.case_id == bad and r.candidate == "cand")
    assert "approves without checking" in res.evaluations[0]["reason"]


# -- export / import ----------------------------------------------------------------------------------------------
def test_export_import_carry_content_labels_and_locks_and_a_bad_line_imports_nothing(world, tmp_path):
    store, name = world["store"], uid("ship")
    ids = world["ids"][world["b"]][:3]
    add(world, name, "--trace", ids[0], "--trace", ids[1])
    tw("dataset", "lock", ids[2], "--dataset", name, "--expect", "pass", "--note", "n", *world["common"])
    tw("dataset", "label", name, ids[0], "--fail", "--critique", "c", *world["common"])
    tw("dataset", "targets", name, "--target", "tier=smb: 5", "--mix", "easy=50%,hard=50%", *world["common"])
    # a version that changes only the targets is a change diff shows (it said "0 added, 0 removed, 0 changed")
    res = tw("dataset", "diff", f"{name}@3", f"{name}@4", *world["common"])
    assert res.exit_code == 0 and res.stdout.splitlines() == [
        f"{name}@3 -> {name}@4: 0 added, 0 removed, 0 changed, 2 target(s) changed",
        "~ target mix: None -> {'easy': 0.5, 'hard': 0.5}",
        "~ target slices: None -> [{'filters': ['tag.tier=smb'], 'n': 5}]"], res.output
    out = tmp_path / "ship.jsonl"
    res = tw("dataset", "export", name, "--out", out, *world["common"])
    assert res.exit_code == 0, res.output
    lines = out.read_bytes().splitlines()
    head = orjson.loads(lines[0])
    assert head["tagway_dataset"] == 1 and head["ref"] == f"{name}@4" and len(lines) == 4
    assert head["targets"] == {"slices": [{"filters": ["tag.tier=smb"], "n": 5}], "mix": {"easy": 0.5, "hard": 0.5}}
    res = tw("dataset", "export", name, "--out", "-", *world["common"])  # "-": stdout, not a file named "-"
    assert res.exit_code == 0 and res.stdout.encode().splitlines() == lines, res.output
    assert not os.path.exists("-")
    found = resolve(store, str(out))  # replay run --dataset FILE: cases and locks from the file alone
    assert [c.case_id for c in found.cases] == ids[:2] + [ids[2]] and set(found.locks) == {ids[2]}
    assert found.cases[0].label == "fail" and found.cases[0].messages[-1]["content"].startswith("refund #0")

    copy = uid("copy")
    res = tw("dataset", "import", out, "--name", copy, *world["common"])
    assert res.exit_code == 0 and f"{copy}@1: imported 3 case(s)" in res.output, res.output
    a, b = load(store, name), load(store, copy)
    assert [(c.trace_id, c.record.label, c.record.locked, c.record.customer, c.record.tags) for c in b.cases] == \
        [(c.trace_id, c.record.label, c.record.locked, c.record.customer, c.record.tags) for c in a.cases]
    assert b.version.targets == a.version.targets and b.version.message.endswith(f"(exported from {name}@4)")
    assert [c.case.messages for c in b.cases] == [c.case.messages for c in a.cases]

    # an older export imported over a dataset that moved on: a lock it does not keep goes only with --force and
    # --reason (as with remove); the cases and labels it drops are said
    older = tmp_path / "older.jsonl"
    assert tw("dataset", "export", f"{name}@1", "--out", older, *world["common"]).exit_code == 0
    res = tw("dataset", "import", older, "--name", name, *world["common"])
    assert res.exit_code == 2 and error_line(res) == (
        f"error: the file does not keep 1 lock(s) of {name}@4 ({ids[2]}): a locked case goes only with --force and "
        "--reason, which the log keeps")
    assert load(store, name).version.version == 4  # nothing imported
    res = tw("dataset", "import", older, "--name", name, "--reason", "why", *world["common"])
    assert res.exit_code == 2 and error_line(res) == "error: --reason goes with --force (it says why locks go)"
    res = tw("dataset", "import", older, "--name", name, "--force", "--reason", "back to the first cut",
             *world["common"])
    assert res.exit_code == 0 and res.output.strip() == (
        f"{name}@5: imported 2 case(s) from {older}; against {name}@4: 1 case(s) removed, 1 lock(s) dropped, "
        "1 label(s) cleared or changed (2 case(s))"), res.output
    assert load(store, name).version.message.endswith("(forced: back to the first cut)")
    # forced, with no lock to drop: the version says nothing of it
    res = tw("dataset", "import", out, "--name", name, "--force", "--reason", "again", *world["common"])
    assert res.exit_code == 0 and "forced" not in load(store, name).version.message, res.output

    bad = tmp_path / "bad.jsonl"
    text = out.read_text().splitlines()
    bad.write_text("\n".join(text[:2] + ['{"trace_id": "x1", "messages": [{"role": "user", "content": "hi"}], '
                                         '"label": "great"}'] + text[2:]) + "\n")
    other = uid("bad")
    res = tw("dataset", "import", bad, "--name", other, *world["common"])
    assert res.exit_code == 2 and f"{bad}:3: bad case (label 'great' is not one of pass, fail)" in error_line(res)
    assert tw("dataset", "show", other, *world["common"]).exit_code == 2  # nothing imported
    bad.write_text(text[1] + "\n" + text[1] + "\n")
    res = tw("dataset", "import", bad, "--name", other, *world["common"])
    assert res.exit_code == 2 and ":2: trace" in error_line(res) and "already on line 1" in error_line(res)
    bad.write_text(text[1] + "\nnot json\n")
    assert ":2: not JSON" in error_line(tw("dataset", "import", bad, "--name", other, *world["common"]))


# -- targets, coverage, difficulty --------------------------------------------------------------------------------
def test_targets_and_dataset_coverage(world):
    store, name = world["store"], uid("cov")
    a_ids = world["ids"][world["a"]]
    add(world, name, "--trace", a_ids[0], "--trace", a_ids[1], "--trace", world["ids"][world["b"]][0])
    insert_feedback(store, [feedback_row(parse_feedback({"trace_id": a_ids[5], "complaint": True}),
                                         customer=world["a"], key_id="k", by_admin=False)])
    for bad, msg in (("intnet=refund: 3", "did you mean intent"), ("tag.tierr=smb: 3", "did you mean tag.tier"),
                     ("intent=refund", "FILTERS: N"), ("intent=refund: 0", "FILTERS: N"),
                     ("intent=refund,intent=refund: 3", "repeated")):
        res = tw("dataset", "targets", name, "--target", bad, *world["common"])
        assert res.exit_code == 2 and msg in error_line(res), (bad, res.output)
    res = tw("dataset", "targets", name, "--mix", "easy=0.5,hard=0.4", *world["common"])
    assert res.exit_code == 2 and "adds up to 0.90" in error_line(res)
    res = tw("dataset", "targets", name, "--target", f"customer={world['a']},tier=enterprise: 5",
             "--mix", "easy=0.5,hard=0.25,safety=0.25", *world["common"])
    assert res.exit_code == 0 and "1 slice target(s), difficulty mix" in res.output, res.output
    tw("dataset", "difficulty", name, a_ids[0], "--set", "safety", *world["common"])
    res = tw("dataset", "coverage", name, "--since", "1h", "--json", *world["common"])
    assert res.exit_code == 0, res.output
    cov = orjson.loads(res.output)
    assert cov["dataset"] == f"{name}@3" and cov["cases"] == 3
    assert cov["slices"] == [{"filters": [f"customer={world['a']}", "tag.tier=enterprise"], "target": 5, "have": 2,
                              "production": {"calls": 10, "errors": 0, "complaints": 1}, "missing": 3}]
    mix = {m["difficulty"]: (m["share"], m["target"], m["have"]) for m in cov["difficulty"]}
    assert mix == {"easy": (0.5, 2, 0), "medium": (None, 0, 0), "hard": (0.25, 1, 0), "safety": (0.25, 1, 1)}
    assert cov["difficulty_unset"] == 2
    # the same target on the map: a's slice is below it
    res = tw("coverage", "--by", "customer", "--by", "tag.tier", "--where", f"tag.run={world['run']}", "--dataset",
             name, "--since", "1h", "--json", *world["common"])
    slices = {s["key"]["customer"]: s for s in orjson.loads(res.output)["slices"]}
    assert (slices[world["a"]]["cases"], slices[world["a"]]["target"], slices[world["a"]]["gap"],
            slices[world["a"]]["missing"]) == (2, 5, True, 3)
    assert (slices[world["b"]]["cases"], slices[world["b"]]["gap"]) == (1, False)
    res = tw("coverage", "--by", "nope", *world["common"])
    assert res.exit_code == 2 and "unknown group-by column" in error_line(res)
    res = tw("coverage", "--dataset", "no-such-dataset", *world["common"])
    assert res.exit_code == 2 and "no dataset 'no-such-dataset'" in error_line(res)


def test_difficulty_by_hand_and_proposed_from_history(world):
    store, name = world["store"], uid("diff")
    ids = world["ids"][world["a"]][:4]
    add(world, name, *[x for t in ids for x in ("--trace", t)])
    outcomes = {ids[0]: ["passed"] * 3, ids[1]: ["passed", "failed", "passed"], ids[2]: ["failed", "failed", "passed"],
                ids[3]: ["failed"] * 3}
    for i in range(3):
        rid = uid("hist")
        write_results(store, [ResultRow(rid, t, "cand", "s", outcomes[t][i]) for t in ids] +
                      [ResultRow(rid, t, "baseline", "s", "failed") for t in ids])
    tw("dataset", "difficulty", name, ids[3], "--set", "safety", *world["common"])
    res = tw("dataset", "difficulty", name, "--propose", "--apply", *world["common"])
    assert res.exit_code == 0 and f"{name}@3: difficulty of 3 case(s) from history" in res.output, res.output
    got = {c.trace_id: (c.record.difficulty, c.record.difficulty_source) for c in load(store, name).cases}
    assert got == {ids[0]: ("easy", "history"), ids[1]: ("medium", "history"), ids[2]: ("hard", "history"),
                   ids[3]: ("safety", "hand")}  # a difficulty set by hand is never overwritten by a proposal
    assert propose_difficulty({"x": [True]}) == {}  # one result is not history
    res = tw("dataset", "difficulty", name, ids[0], "--set", "trivial", *world["common"])
    assert res.exit_code == 2 and "easy, medium, hard, safety" in error_line(res)


def test_unknown_datasets_name_the_nearest(world):
    name = uid("near")
    add(world, name, "--trace", world["ids"][world["a"]][0])
    for args, msg in ((["show", name[:-1]], f"did you mean {name}"), (["show", f"{name}@2"], f"{name}@1 to {name}@1"),
                      (["show", f"{name}@x"], "NAME@N"), (["log", "zz-none"], "no dataset 'zz-none'"),
                      (["diff", f"{name}@1", f"{name}@5"], "no version 5"), (["export", name[:-1]], "did you mean")):
        res = tw("dataset", *args, *world["common"])
        assert res.exit_code == 2 and msg in error_line(res), (args, res.output)


def test_a_pinned_and_a_versioned_dataset_never_share_a_name(world):
    """`dataset add NAME` on the name of a pinned dataset (`replay dataset save`) made NAME resolve to the new
    version: `replay run --dataset NAME` silently replayed 1 case instead of the 40 pinned. Both ways are refused."""
    from replay.datasets import DatasetError, save_dataset  # noqa: PLC0415
    from replay.slice import Sampled  # noqa: PLC0415

    pinned, versioned = uid("pinned"), uid("versioned")
    trace = world["ids"][world["a"]][0]
    save_dataset(world["store"], pinned, [Sampled(trace, "x")])
    res = add(world, pinned, "--trace", trace)
    assert res.exit_code == 2 and f"a pinned dataset named {pinned!r} exists" in error_line(res), res.output
    assert add(world, versioned, "--trace", trace).exit_code == 0
    with pytest.raises(DatasetError, match=f"a versioned dataset named {versioned!r} exists"):
        save_dataset(world["store"], versioned, [Sampled(trace, "x")])


# -- feedback pieces ----------------------------------------------------------------------------------------------
def test_feedback_validation_and_recent_calls():
    ok = parse_feedback({"trace_id": "abc", "thumbs": "down", "complaint": True, "comment": "x", "source": "app"})
    assert (ok.thumbs, ok.complaint, ok.score, ok.source) == ("down", True, None, "app")
    for body, param in (({"score": 1}, "trace_id"), ({"trace_id": "a b", "score": 1}, "trace_id"),
                        ({"trace_id": "a", "score": True}, "score"), ({"trace_id": "a", "score": -0.1}, "score"),
                        ({"trace_id": "a", "complaint": "yes"}, "complaint"), ({"trace_id": "a", "comment": "hi"}, "score"),
                        ({"trace_id": "a", "score": 1, "comment": "x" * 5000}, "comment"),
                        ({"trace_id": "a", "score": 1, "source": "Bad Source"}, "source")):
        with pytest.raises(QueryInputError) as e:
            parse_feedback(body)
        assert e.value.param == param, body
    with pytest.raises(QueryInputError, match="trace_id must be a string"):  # a wrong type is not "required"
        parse_feedback({"trace_id": 5, "score": 1})
    r = RecentCalls(size=2)
    for i in range(5):
        r.add(b"t%d" % i, f"c{i}", f"k{i}")
    assert r.get("t4") == ("c4", "k4") and r.get("t3") == ("c3", "k3") and r.get("t2") == ("c2", "k2")
    assert r.get("t0") is None  # two generations of 2: the oldest are gone


def test_the_new_tables_follow_the_cluster_setting():
    from exporters.schema import SchemaSettings, statements_for
    stmts = [sql for v, sql in statements_for(SchemaSettings(cluster="prod", database="tw", ttl_days=30)) if v == 6]
    for table in ("llm_feedback", "dataset_versions", "dataset_cases", "dataset_content"):
        local = next(s for s in stmts if s.startswith(f"CREATE TABLE IF NOT EXISTS `tw`.`{table}_local`"))
        assert " ON CLUSTER `prod`" in local and "ENGINE = Replicated" in local
        assert any(s.startswith(f"CREATE TABLE IF NOT EXISTS `tw`.`{table}` ON CLUSTER `prod` AS") and
                   f"Distributed('prod', 'tw', '{table}_local'" in s for s in stmts)
    ttl = [s for s in stmts if "TTL toDateTime" in s]
    assert len(ttl) == 1 and "`llm_feedback_local`" in ttl[0]  # ratings age with the calls; datasets never do
    single = [sql for v, sql in statements_for(SchemaSettings(ttl_days=30)) if v == 6]
    assert not any("ON CLUSTER" in s or "Distributed" in s for s in single)


@pytest.mark.parametrize("line, says", [
    ({"case_id": 5, "messages": [{"role": "user", "content": "x"}]}, "bad case (no valid case_id"),
    ({"trace_id": "a b", "messages": [{"role": "user", "content": "x"}]}, "bad case (no valid trace_id"),
    ({"messages": [{"role": "user", "content": "x"}]}, "bad case (no valid trace_id"),
])
def test_a_case_line_without_a_usable_id_names_the_field_it_has(tmp_path, line, says):
    """Exported files name a case's id `case_id`: a bad one is called that, not `trace_id`."""
    from replay.datasets.jsonl import parse_file
    from exporters.datasets import DatasetStoreError
    path = tmp_path / "cases.jsonl"
    path.write_bytes(orjson.dumps(line) + b"\n")
    with pytest.raises(DatasetStoreError) as e:
        parse_file(path)
    assert str(e.value).startswith(f"{path}:1: {says}"), str(e.value)
