"""Applied tags on the case board, in real headless Chromium: an evaluation run's page with its Applied Tags
column, and a call page where a person sees the rule tags, adds and removes tags (audited) on the call and its
session, with the admin key and with the tenant's own key."""
from __future__ import annotations

import uuid

import orjson
import pytest
from typer.testing import CliRunner

from exporters import tagstate as ts
from replay.datasets import save_dataset
from replay.slice import Sampled
from replay.evals.cli import eval_app
from tests.gateway_fixture import ADMIN_KEY, KEYS, recorded_gateway
from tests.tag_rules_support import JUDGE_MODEL, JudgeDouble, Traffic, seed_evaluator, unique
from tests.test_board_ui import cells, goto, loaded, page  # noqa: F401 - fixtures and helpers (browser: conftest)

NEG = {"user_sentiment": "negative", "expected_helpfulness": 2, "confidence_score": 0.3}


@pytest.fixture(scope="module")
def tagged(upstream, chdb_store, tmp_path_factory):
    """A gateway with the judge double, three acme calls (two in one session) and a full run of the seed's rules."""
    judge = JudgeDouble()
    tmp = tmp_path_factory.mktemp("tag-ui")
    with recorded_gateway(upstream, chdb_store, str(tmp / "spool"), providers={"judge-double": judge.provider},
                          models=[JUDGE_MODEL]) as gw:
        traffic = Traffic(gw, uuid.uuid4().hex)
        sid = unique("ui-sess")
        (t1, m1), (t2, _) = (traffic.call("", key=KEYS["acme"], session=sid),
                             traffic.call("", key=KEYS["acme"], session=sid))
        judge.answers[m1] = NEG
        traffic.flush(chdb_store, [t1, t2])
        ds = unique("ui")
        save_dataset(chdb_store, ds, [Sampled(t1, "x"), Sampled(t2, "x")])
        name = unique("ui")
        res = CliRunner().invoke(eval_app, ["run", "-e", str(seed_evaluator(tmp / "e.yaml", name)), "-d", ds,
                                            "--dsn", chdb_store.dsn, "--gateway", gw.url, "--api-key", ADMIN_KEY,
                                            "--format", "json"])
        assert res.exit_code == 0, res.output
        preview = CliRunner().invoke(eval_app, ["run", "-e", str(tmp / "e.yaml"), "-d", ds, "--mode", "preview",
                                                "--dsn", chdb_store.dsn, "--gateway", gw.url, "--api-key", ADMIN_KEY,
                                                "--format", "json"])
        assert preview.exit_code == 0, preview.output
        yield {"gw": gw, "t1": t1, "t2": t2, "sid": sid, "name": name, "store": chdb_store,
               "report": orjson.loads(res.stdout), "preview": orjson.loads(preview.stdout)}


def test_the_run_page_shows_the_applied_tags_column(tagged, page):  # noqa: F811
    run_id = tagged["report"]["run_id"]
    assert goto(page, f"{tagged['gw'].url}/ui/evals#key={ADMIN_KEY}") == "1"
    with page.expect_navigation():
        page.click(f'tr[data-run="{run_id}"] a.run-link')
    assert loaded(page) == "1"
    heads = page.eval_on_selector_all("#eval-rows th", "hs => hs.map(h => h.textContent)")
    assert heads[-1] == "Applied Tags" and "user_sentiment" in heads
    rows = {r[1]: r for r in cells(page, "#eval-rows tbody tr")}
    assert rows[f"message:{tagged['t1']}"][-1] == "negative-sentiment, low-helpfulness, low-confidence"
    assert rows[f"message:{tagged['t2']}"][-1] == "—"
    assert len(cells(page, "#tag-changes tbody tr")) == 3


def test_a_preview_runs_page_has_no_tag_changes_card(tagged, page):  # noqa: F811
    """A preview changes no tag: its page has no such card, and nothing in its place (it printed "null")."""
    run_id = tagged["preview"]["run_id"]
    assert goto(page, f"{tagged['gw'].url}/ui/evals/{run_id}#key={ADMIN_KEY}") == "1"
    assert len(cells(page, "#eval-rows tbody tr")) == 2 and page.query_selector("#tag-changes") is None
    assert "null" not in page.text_content("main")


def test_a_person_tags_a_call_and_its_session_on_the_call_page(tagged, page):  # noqa: F811
    t1, store = tagged["t1"], tagged["store"]
    assert goto(page, f"{tagged['gw'].url}/ui/calls/{t1}#key={ADMIN_KEY}") == "1"
    shown = {r[0]: r[1] for r in cells(page, "#tags-message tbody tr")}
    assert shown == {t: f"rule:{tagged['name']}/{t}" for t in ("negative-sentiment", "low-helpfulness",
                                                               "low-confidence")}
    page.fill("#tag-input-message", "needs-review")
    page.click("#add-tag-message button")
    page.wait_for_selector('#tags-message tr[data-tag="needs-review"]')
    page.click('#tags-message tr[data-tag="low-confidence"] button.remove-tag')
    page.wait_for_selector('#tags-message tr[data-tag="low-confidence"]', state="detached")
    now = ts.tags_of(store, ts.parse_target(t1))
    assert set(now) == {"negative-sentiment", "low-helpfulness", "needs-review"}
    assert now["needs-review"]["actor"] == "human:admin"
    log = [(e["tag"], e["action"], e["actor"]) for e in ts.audit(store, ts.parse_target(t1))][-2:]
    assert log == [("needs-review", "apply", "human:admin"), ("low-confidence", "remove", "human:admin")]
    # the case view's tag audit section has one row per change
    assert goto(page, f"{tagged['gw'].url}/ui/cases/{t1}") == "1"
    audit_rows = cells(page, '[data-section="tag_audit"] tbody tr')
    assert [(r[1], r[2], r[3]) for r in audit_rows][-2:] == [("needs-review", "apply", "human:admin"),
                                                             ("low-confidence", "remove", "human:admin")]
    assert len(audit_rows) == 5 and audit_rows[0][4].endswith("(full)")
    assert goto(page, f"{tagged['gw'].url}/ui/calls/{t1}") == "1"
    # a bad tag name is refused with the API's message, nothing changes
    page.fill("#tag-input-message", "Not A Tag")
    page.click("#add-tag-message button")
    page.wait_for_selector("#error:not([hidden])")
    assert "invalid tag name 'Not A Tag'" in page.text_content("#error")
    # the session card, with the tenant's own key: its session is named without the customer
    assert goto(page, f"{tagged['gw'].url}/ui/calls/{tagged['t2']}#key={KEYS['acme']}") == "1"
    assert page.text_content("#no-tags-session") == "no applied tag"
    # no audit log yet: nothing in its place (a `null` child of append() printed the word "null" after the form)
    assert page.query_selector("#audit-session") is None and "null" not in page.text_content("main")
    page.fill("#tag-input-session", "angry-user")
    page.click("#add-tag-session button")
    page.wait_for_selector('#tags-session tr[data-tag="angry-user"]')
    session = ts.parse_target(f"session:acme/{tagged['sid']}")
    assert ts.tags_of(store, session)["angry-user"]["actor"] == "human:acme-1"
