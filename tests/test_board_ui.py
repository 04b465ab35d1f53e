"""The case board in real headless Chromium (driven by Playwright over the system's chromium), against the real
gateway seeded with realistic traffic and two replay runs (tests/board_seed.py). Each test clicks through the pages
as a person would and checks what is shown against the CLI (`tagway show`, `tagway replay report`) and the API.
Screenshots of every page go to $TAGWAY_SCREENSHOTS (default: a pytest tmp dir); their paths are printed.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.parse

import httpx
import orjson
import pytest
import typer
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from exporters import calls as c
from gateway import stats_cli
from gateway.board_api import Limits
from gateway.stats_api import build_stats_router
from replay.cli import replay_app
from tests.board_seed import ADMIN_KEY, HUGE_CHARS, XSS


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    path = os.environ.get("TAGWAY_SCREENSHOTS") or str(tmp_path_factory.mktemp("board-screenshots"))
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    context.close()


def loaded(pg, timeout: float = 20_000) -> str:
    pg.wait_for_selector("body[data-loaded]", timeout=timeout)
    return pg.get_attribute("body", "data-loaded")


def goto(pg, url: str) -> str:
    pg.goto(url)
    return loaded(pg)


def click(pg, selector: str) -> str:
    with pg.expect_navigation():
        pg.click(selector)
    return loaded(pg)


def shot(pg, shots: str, name: str) -> None:
    path = os.path.join(shots, f"{name}.png")
    pg.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


def cells(pg, selector: str) -> list[list[str]]:
    return pg.eval_on_selector_all(selector, "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))")


def cli(args: list[str], app=None) -> str:
    if app is None:
        app = typer.Typer()
        stats_cli.register(app)
    res = CliRunner().invoke(app, args)
    assert res.exit_code in (0, 1), res.output
    return res.stdout


def admin_api(board, path: str) -> dict:
    res = httpx.get(board.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert res.status_code == 200, res.text
    return res.json()


def fmt3(x):
    return "—" if x is None else f"{x:.3f}"


def ci(pair):
    return "—" if pair is None else f"{pair[0]:.3f}–{pair[1]:.3f}"


def fmt_delta(x):
    return "—" if x is None else f"{x:+.3f}"


def test_from_a_failing_segment_to_a_case_and_back(board, page, shots, chdb_dsn):
    """Replays -> the failing run -> its regressed segment's calls -> one call -> its case view -> back to the run,
    every page checked against `tagway replay report` and `tagway show`."""
    bad_run = board.runs[1]
    assert goto(page, f"{board.url}/ui/replays#key={ADMIN_KEY}") == "1"
    assert "key=" not in page.url, "the key must leave the address bar at once"
    runs = {r["run"]: r for r in page.eval_on_selector_all("#runs tbody tr", "rs => rs.map(r => ({run: r.dataset.run, "
                                                           "cells: [...r.cells].map(c => c.textContent.trim())}))")}
    assert set(board.runs) <= set(runs)
    assert runs[bad_run]["cells"][7] == "regression" and runs[board.runs[0]]["cells"][7] == "passed"
    assert runs[bad_run]["cells"][4] == "cand (cand-bad)" and runs[bad_run]["cells"][2] == board.spec_name
    shot(page, shots, "01-replays")

    assert click(page, f"#runs tr[data-run='{bad_run}'] a.run-link") == "1"
    assert page.url.endswith(f"/ui/replays/{bad_run}")
    # the per-segment table is the report `tagway replay report RUN --format json` prints
    report = orjson.loads(cli(["report", bad_run, "--dsn", chdb_dsn, "--format", "json"], replay_app))
    want = [[r["segment"], str(r["n"]), fmt3(r["before"]), fmt3(r["after"]), ci(r["after_ci"]), fmt_delta(r["delta"]),
             ci(r["delta_ci"]), str(r["errored"]), f"↓{r['pass_fail']} ↑{r['fail_pass']}", r["verdict"]]
            for r in report["candidates"][0]["rows"]]
    got = cells(page, "#segments-cand tbody tr")
    assert got == want
    refund = next(row for row in got if row[0] == "refund")
    assert refund[:6] == ["refund", "24", "1.000", "0.500", "0.314–0.686", "-0.500"]
    assert refund[8:] == ["↓12 ↑0", "regression"]
    assert page.get_attribute("#segments-cand tr[data-segment='refund']", "class") == "failing"
    assert page.eval_on_selector_all("#reasons li", "x => x.map(e => e.textContent)") == report["reasons"]
    flipped = page.eval_on_selector_all("#flipped tbody tr", "rs => rs.map(r => r.dataset.case)")
    assert len(flipped) == 12
    assert page.eval_on_selector_all("#segment-chart g[data-segment='refund'] rect.bar-bad", "x => x.length") == 1
    shot(page, shots, "02-run")

    # the failing segment's calls: exactly the cases the run replayed in that segment
    assert click(page, "#segments-cand tr[data-segment='refund'] a.segment-link") == "1"
    listed = page.eval_on_selector_all("#calls tbody tr", "rs => rs.map(r => r.dataset.traceId)")
    api = admin_api(board, "/admin/calls?" + urllib.parse.urlparse(page.url).query)
    assert listed == [x["trace_id"] for x in api["calls"]] and len(listed) == 24
    assert set(flipped) < set(listed)
    assert {r[3] for r in cells(page, "#calls tbody tr")} == {"refund"}
    shot(page, shots, "03-segment-calls")

    case_id = flipped[0]
    assert click(page, f"#calls tr[data-trace-id='{case_id}'] a.call-link") == "1"
    assert page.text_content("#trace-id") == case_id
    shown = orjson.loads(cli(["show", case_id, "--json", "--dsn", chdb_dsn]))
    facts = dict(zip(page.eval_on_selector_all("dl.kv dt", "x => x.map(e => e.textContent)"),
                     page.eval_on_selector_all("dl.kv dd", "x => x.map(e => e.textContent)")))
    assert facts["customer"] == shown["customer"] and facts["intent"] == "refund"
    assert facts["prompt version"] == shown["prompt_version"] and facts["model"] == shown["model_requested"]
    assert facts["latency"] == f"{shown['latency_ms']:,.0f} ms"
    assert facts["tokens"] == f"{shown['input_tokens']:,} in / {shown['output_tokens']:,} out"
    assert facts["cost"] == stats_cli.fmt_cost(shown["cost_usd"]) and shown["cost_known"]  # as `tagway show` says it
    roles = page.eval_on_selector_all("#conversation .msg", "x => x.map(e => e.dataset.role)")
    assert roles == ["system", "user", "assistant"]
    assert "refund" in page.text_content("#conversation .msg[data-role='user']")
    assert page.eval_on_selector_all("#replays tbody tr", "rs => rs.map(r => r.dataset.run + '/' + r.dataset.candidate)") \
        == [f"{board.runs[0]}/baseline", f"{board.runs[0]}/cand", f"{bad_run}/baseline", f"{bad_run}/cand"]
    shot(page, shots, "04-call")

    assert click(page, "#to-case") == "1"
    box = f"section[data-run='{bad_run}'] .compare[data-candidate='cand']"
    assert page.text_content(f"{box} .side[data-candidate='cand'] pre.output") == "WRONG"
    assert page.text_content(f"{box} .side[data-candidate='baseline'] pre.output") == shown_output(shown)
    assert "regressed" in page.text_content(f"{box} .side[data-candidate='cand'] h3")
    reason = page.text_content(f"{box} .side[data-candidate='cand'] td.reason")
    assert "WRONG" in reason
    assert page.text_content(f"section[data-run='{bad_run}'] .diff del") == shown_output(shown)
    assert page.text_content(f"section[data-run='{bad_run}'] .diff ins") == "WRONG"
    assert page.get_attribute("[data-section='datasets']", "data-section") == "datasets"
    assert f"run-{bad_run}" in page.text_content("[data-section='datasets']")
    # every section's table exists on a migrated store: each is shown, empty for this case, none called missing
    for name in ("labels", "feedback", "tag_audit"):
        assert page.text_content(f"[data-section='{name}'] p.muted") == "none"
    assert page.query_selector("#sections-missing") is None
    shot(page, shots, "05-case")

    assert click(page, f"section[data-run='{bad_run}'] a.run-link") == "1"
    assert page.url.endswith(f"/ui/replays/{bad_run}") and page.text_content("#run-id") == bad_run
    assert not page.dialogs


def shown_output(call: dict) -> str:
    return orjson.loads(call["response_json"])[0]["parts"][0]["content"]


def test_calls_list_filters_pages_and_search(board, page, shots, chdb_store):
    """Filters in the URL, keyset pages of 7 followed to the end (every call once, newest first), free-text search."""
    acme = board.customers["acme"]
    q = urllib.parse.urlencode([("since", "1h"), ("where", f"customer={acme}"), ("where", board.where),
                                ("limit", "7")])
    assert goto(page, f"{board.url}/ui/calls?{q}#key={ADMIN_KEY}") == "1"
    assert page.input_value("#f-customer") == acme and page.input_value("#f-where") == board.where
    seen, pages = [], 0
    while True:
        pages += 1
        seen += page.eval_on_selector_all("#calls tbody tr", "rs => rs.map(r => r.dataset.traceId)")
        if pages == 2:
            shot(page, shots, "06-calls-page-2")
        if not page.query_selector("#next-page"):
            break
        assert click(page, "#next-page") == "1"
        assert "cursor=" in page.url
    want = chdb_store.query("SELECT trace_id FROM llm_calls WHERE customer = {c:String} AND tags['run'] = {r:String} "
                            "AND source = 'production' ORDER BY Timestamp DESC, trace_id DESC",
                            {"c": acme, "r": board.run})
    assert seen == [r["trace_id"] for r in want] and pages == -(-len(want) // 7)
    assert page.query_selector("#first-page") is not None

    # filters typed into the form land in the URL
    goto(page, f"{board.url}/ui/calls?since=1h&where={urllib.parse.quote(board.where)}")
    page.fill("#f-intent", "refund")
    page.select_option("#f-status", "ok")
    page.fill("#f-q", "money back")
    with page.expect_navigation():
        page.click("#filters button[type=submit]")
    assert loaded(page) == "1"
    qs = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
    assert qs["where"] == ["intent=refund", board.where] and qs["status"] == ["ok"] and qs["q"] == ["money back"]
    rows = cells(page, "#calls tbody tr")
    assert len(rows) == 12 and all("money back" in r[12] for r in rows)  # 4 per customer
    shot(page, shots, "07-calls-search")


def test_call_page_fallback_tools_redaction_errors_and_show_all(board, page, shots):
    assert goto(page, f"{board.url}/ui/calls/{board.traces['fallback']}#key={ADMIN_KEY}") == "1"
    attempts = cells(page, "#attempts tbody tr")
    assert [(a[1], a[4], a[6]) for a in attempts] == [("flaky", "error", "503"), ("gpt-prod", "ok", "200")]
    assert page.text_content("dd[data-field='attempts']") == "2"
    shot(page, shots, "08-call-fallback")
    streamed = admin_api(board, f"/admin/calls?since=1h&where={board.where}&where=stream=true&limit=1")["calls"][0]
    goto(page, f"{board.url}/ui/calls/{streamed['trace_id']}")
    assert page.text_content("dd[data-field='time to first byte']") == f"{streamed['ttft_ms']:,.0f} ms"

    goto(page, f"{board.url}/ui/calls/{board.traces['tools']}")
    assert page.eval_on_selector_all("#conversation .msg", "x => x.map(e => e.dataset.role)") == [
        "system", "user", "assistant", "tool", "user", "assistant"]
    tool_call = page.text_content("#conversation .msg[data-role='assistant'] .tool-call")
    assert "get_weather" in tool_call and '"city": "Paris"' in tool_call  # arguments pretty-printed
    assert '"temp": 21' in page.text_content("#conversation .msg[data-role='tool'] .tool-result pre")
    params = page.text_content("#request-params")  # the request parameters, pretty-printed JSON
    assert '"tools": [' in params and '"name": "get_weather"' in params
    shot(page, shots, "09-call-tools")

    goto(page, f"{board.url}/ui/calls/{board.traces['error']}")
    message = page.text_content("dd[data-field='message']")
    assert "upstream says 500" in message and "sk-upstream" not in page.content()
    assert page.text_content("dd[data-field='error type']") == "http_500"
    # no usage, so the gateway recorded no cost: said so, as `tagway show` says it, not $0
    assert page.text_content("dd[data-field='cost']") == "unknown (no token usage recorded)"
    shot(page, shots, "10-call-error")

    goto(page, f"{board.url}/ui/calls/{board.traces['redacted']}")
    assert page.text_content("#conversation mark.redacted") == "[REDACTED:email]"
    assert "jane.doe" not in page.content()

    goto(page, f"{board.url}/ui/calls/{board.traces['huge']}")
    user = page.text_content("#conversation .msg[data-role='user'] .text")
    assert len(user) < 21_000 and user.endswith("more characters]") and page.query_selector("#truncated")
    shot(page, shots, "11-call-truncated")
    assert click(page, "#show-all") == "1"
    assert page.text_content("#conversation .msg[data-role='user'] .text") == "long " + "x" * HUGE_CHARS + " end"
    assert page.query_selector("#truncated") is None

    goto(page, f"{board.url}/ui/calls/{board.traces['session']}")
    assert click(page, "#to-session") == "1"
    assert sorted(page.eval_on_selector_all("#calls tbody tr", "rs => rs.map(r => r.dataset.traceId)")) == sorted(
        [board.traces["session"], board.traces["session2"]])


def test_markup_in_filters_and_content_renders_as_text(board, page, shots):
    """XSS: markup and quotes in filter values, the search box and recorded content stay text in a real browser."""
    q = urllib.parse.urlencode([("since", "1h"), ("where", f"intent={XSS}"), ("where", 'tag.x="><svg onload=alert(1)>'),
                                ("q", '"><img src=x onerror=alert(2)>')])
    assert goto(page, f"{board.url}/ui/calls?{q}#key={ADMIN_KEY}") == "1"
    assert page.input_value("#f-intent") == XSS
    assert page.input_value("#f-q") == '"><img src=x onerror=alert(2)>'
    assert page.evaluate("window.pwned") is None and page.title() != "pwned" and not page.dialogs
    assert page.eval_on_selector_all("main img, main script, main svg[onload]", "x => x.length") == 0
    assert "no calls match" in page.text_content("#calls")

    goto(page, f"{board.url}/ui/calls/{board.traces['xss']}")
    assert page.text_content("#conversation .msg[data-role='user'] .text") == XSS
    assert page.eval_on_selector_all("#conversation img, #conversation script", "x => x.length") == 0
    assert page.evaluate("window.pwned") is None and page.title() != "pwned" and not page.dialogs
    shot(page, shots, "12-xss-as-text")

    # a bad filter value comes back as the API's one-line message, shown as text
    goto(page, f"{board.url}/ui/calls?since=1h&where={urllib.parse.quote('tag.<b>=1')}")
    assert "invalid tag key '<b>'" in page.text_content("#error") and page.get_attribute("body", "data-loaded") == "error"


def test_unknown_ids_and_other_tenants_traces_are_404_pages(board, page, shots, chdb_store):
    goto(page, f"{board.url}/ui/calls/{'f' * 32}#key={ADMIN_KEY}")
    assert page.get_attribute("body", "data-loaded") == "404" and "No call with trace id" in page.text_content("#not-found")
    shot(page, shots, "13-not-found")
    goto(page, f"{board.url}/ui/cases/{'e' * 32}")
    assert page.get_attribute("body", "data-loaded") == "404"
    goto(page, f"{board.url}/ui/replays/no-such-run")
    assert page.get_attribute("body", "data-loaded") == "404" and "No replay run" in page.text_content("#not-found")
    assert page.text_content("#status-line") == ""  # not "loading…" beside "Not found (404)"

    # a tenant key: the same pages, limited to its customer; another tenant's trace is a 404 like an unknown one
    acme, globex = board.customers["acme"], board.customers["globex"]
    goto(page, f"{board.url}/ui/calls?since=1h#key={board.keys['acme']}")
    assert page.text_content("#key-state") == f"tenant key: {acme}"
    assert page.is_disabled("#f-customer") and page.input_value("#f-customer") == acme
    assert {r[2] for r in cells(page, "#calls tbody tr")} == {acme}
    shot(page, shots, "14-tenant-calls")
    goto(page, f"{board.url}/ui/calls/{board.traces['error']}")  # globex's call
    assert page.get_attribute("body", "data-loaded") == "404"
    assert globex not in page.content()
    goto(page, f"{board.url}/ui/replays/{board.runs[1]}")
    assert page.text_content("#tenant-note").startswith(f"Limited to {acme}'s cases")
    rows = cells(page, "#segments-cand tbody tr")
    mine = chdb_store.query("SELECT segment, count() AS n, countIf(status = 'passed') AS k FROM replay_results "
                            "WHERE run_id = {r:String} AND candidate = 'cand' AND customer = {c:String} "
                            "GROUP BY segment ORDER BY segment", {"r": board.runs[1], "c": acme})
    assert [r[:4] for r in rows] == [[m["segment"], str(m["n"]), "1.000", f"{m['k'] / m['n']:.3f}"] for m in mine]
    assert rows[1][:4] == ["refund", "8", "1.000", "0.500"] and rows[1][8] == "↓4 ↑0"
    assert all(r[9] == "" for r in rows)  # no verdicts: those were decided over every customer
    assert page.query_selector("#reasons") is None
    shot(page, shots, "15-tenant-run")
    goto(page, f"{board.url}/ui#since=1h&by=customer")  # the overview, limited the same way
    assert page.get_attribute("body", "data-loaded") == "1"
    assert page.eval_on_selector_all("#segments tbody tr", "rs => rs.map(r => r.dataset.segment)") == [acme]
    # the overview's own page links every page the others do (it lacked Coverage and Evaluations)
    nav = "ns => ns.map(a => a.textContent + ' ' + new URL(a.href).pathname)"
    overview = page.eval_on_selector_all("nav a", nav)
    goto(page, f"{board.url}/ui/calls?since=1h")
    assert overview == page.eval_on_selector_all("nav a", nav) and len(overview) == 6, overview


def test_a_segment_too_thin_to_judge_says_so_on_the_run_page(board, page, chdb_store):
    """A 3-case segment with no drop is inconclusive (its test could not have called a regression), and the run
    page says why beside the verdict, not "ok": at 0.05 / 2 segments the exact test needs 6 flips, 3 more cases."""
    from replay.render import render_json
    from replay.report import aggregate
    from replay.spec import Gating
    from replay.store import ResultRow, RunRow, read_results, write_results, write_run
    run_id = f"{board.run}-thin"
    rows = [ResultRow(run_id, f"{run_id}-{seg}-{i}", cand, seg, "passed", customer=seg, dataset_id=f"run-{run_id}")
            for seg, n in (("wide", 30), ("tiny", 3)) for i in range(n) for cand in ("baseline", "cand")]
    write_results(chdb_store, rows)
    report = aggregate(read_results(chdb_store, run_id), Gating(), run_id=run_id, segment_by=["customer"])
    now = time.time()
    write_run(chdb_store, RunRow(run_id, "complete", orjson.dumps({"name": f"thin-{board.run}"}).decode(),
                                 f"run-{run_id}", "", ["cand"], ["customer"], 66, report.verdict, render_json(report),
                                 created_at=now, finished_at=now))
    assert goto(page, f"{board.url}/ui/replays/{run_id}#key={ADMIN_KEY}") == "1"
    verdicts = {r[0]: r[9] for r in cells(page, "#segments-cand tbody tr")}
    assert verdicts == {"tiny": "inconclusive too few cases to judge: ~3 more", "wide": "ok"}, verdicts
    assert "too few cases to tell: the baseline passed 3 of 3" in page.get_attribute(
        "#segments-cand tr[data-segment='tiny'] td.marks", "title")


def test_charts_and_trend(board, page, shots):
    q = urllib.parse.urlencode([("since", "1h"), ("by", "customer"), ("top", "2"), ("where", board.where)])
    assert goto(page, f"{board.url}/ui/charts?{q}#key={ADMIN_KEY}") == "1"
    api = admin_api(board, f"/admin/charts?{q}")
    keys = [s["key"] for s in api["series"]]
    stats = admin_api(board, f"/admin/stats?since=1h&by=customer&where={board.where}")
    assert len(keys) == 3 and keys[-1] == "(other)" and keys[:2] == [s["key"]["customer"] for s in sorted(
        stats["segments"], key=lambda s: (-s["calls"], s["key"]["customer"]))][:2]
    assert sum(s["calls"] for s in api["series"]) == stats["total"]["calls"] == 80  # top 2 + other = everything
    assert sum(s["errors"] for s in api["series"]) == stats["total"]["errors"]
    for chart in ("chart-calls", "chart-errors", "chart-cost"):
        assert page.eval_on_selector_all(f"#{chart} g[data-series]", "x => x.map(g => g.dataset.series)") == keys
    assert len(page.eval_on_selector_all("#chart-latency g[data-series]", "x => x")) == 6  # p50 and p95 per series
    legend = page.eval_on_selector_all(".legend span[data-series]", "x => x.map(e => e.textContent)")
    assert legend[0].startswith(keys[0]) and f"{api['series'][0]['calls']} calls" in legend[0]
    shot(page, shots, "16-charts")

    goto(page, f"{board.url}/ui/trend?spec={urllib.parse.quote(board.spec_name)}")
    rows = {r[0]: r[1:] for r in cells(page, "#trend tbody tr")}
    assert rows["refund"] == ["1.000 (+0.000)", "0.500 (-0.500) regression"] and rows["billing"] == ["1.000 (+0.000)"] * 2
    assert page.eval_on_selector_all("#trend-chart g[data-series='refund'] circle.regression-point", "x => x.length") == 1
    shot(page, shots, "17-trend")
    goto(page, f"{board.url}/ui#since=1h&by=customer&where={urllib.parse.quote(board.where)}")
    assert page.get_attribute("body", "data-loaded") == "1"
    shot(page, shots, "18-overview")
    # the overview's worst segment links to its calls
    with page.expect_navigation():
        page.click("#segments tbody tr:first-child td.seg a")
    assert loaded(page) == "1" and "/ui/calls?" in page.url


def _serve(app: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    return srv, thread, f"http://127.0.0.1:{port}"


def test_a_query_over_its_budget_shows_a_message_not_a_spinner(board, page, shots, chdb_store):
    """A search limited (by ClickHouse itself: max_rows_to_read) to fewer rows than the window holds is stopped,
    and the page says what to narrow."""
    app = FastAPI()
    app.include_router(build_stats_router(board.app.keyring, lambda: chdb_store,
                                          limits=Limits(search=c.Budget(20.0, max_rows=10))))
    srv, thread, url = _serve(app)
    try:
        assert goto(page, f"{url}/ui/calls?since=1h&q=refund#key={ADMIN_KEY}") == "error"
        text = page.text_content("#error")
        assert "took too long" in text and "narrow the time window" in text
        assert page.text_content("#status-line") == ""
        assert page.get_attribute("body", "data-error-code") == "query_timeout"
        shot(page, shots, "19-query-too-heavy")
        assert goto(page, f"{url}/ui/calls?since=1h&limit=3") == "1"  # without the search: fine
    finally:
        srv.should_exit = True
        thread.join(10)


def test_key_in_a_query_string_is_refused(board, page):
    res = page.goto(f"{board.url}/ui/calls?key={ADMIN_KEY}")
    assert res.status == 400 and "Keys do not go in a URL" in page.content()
    assert re.search(r"tw-board-admin", page.content()) is None


def test_coverage_page_shows_the_map_with_its_gaps(board, page, shots, chdb_store):
    """The coverage map (issue 12) on the board: the same slices as /admin/coverage, gaps first and marked; a
    dataset holding the erroring call's trace closes that slice's gap."""
    from exporters.feedback import feedback_row, insert_feedback, parse_feedback
    from replay.datasets import add_cases, capture

    name = f"cov-{board.run}"
    caps, problems = capture(chdb_store, [board.traces["fallback"]], origin="trace", added_by="test")
    assert problems == {}
    add_cases(chdb_store, name, caps, message="one case", author="test")
    initech = board.customers["initech"]
    complained = chdb_store.query("SELECT trace_id FROM llm_calls WHERE customer = {c:String} AND intent = 'refund' "
                                  "AND source = 'production' LIMIT 1", {"c": initech})[0]["trace_id"]
    insert_feedback(chdb_store, [feedback_row(parse_feedback({"trace_id": complained, "complaint": True}),
                                              customer=initech, key_id="k", by_admin=False)])
    q = urllib.parse.urlencode([("since", "1h"), ("by", "customer"), ("by", "intent"), ("dataset", name),
                                ("where", board.where)])
    assert goto(page, f"{board.url}/ui/coverage?{q}#key={ADMIN_KEY}") == "1"
    api = admin_api(board, f"/admin/coverage?{q}")
    rows = cells(page, "#coverage tbody tr")
    assert [r[:2] for r in rows] == [[s["key"]["customer"], s["key"]["intent"]] for s in api["slices"]]
    assert [r[2] for r in rows] == [f"{s['calls']:,}" for s in api["slices"]]
    gaps = page.eval_on_selector_all("#coverage tbody tr[data-gap='1']", "rs => rs.map(r => r.cells[0].textContent "
                                     "+ '/' + r.cells[1].textContent)")
    assert api["gaps"] == len(gaps) >= 2 and rows[0][-1].startswith("gap: 1 missing")
    assert f"{board.customers['globex']}/support" in gaps  # the broken call's slice: no case
    assert f"{initech}/refund" in gaps  # a complaint, no case
    covered = next(s for s in api["slices"] if s["cases"] == 1)
    assert covered["gap"] is False and covered["key"] == {"customer": board.customers["acme"], "intent": "billing"}
    assert f"against {name}@1" in page.text_content("#status-line")
    shot(page, shots, "19-coverage")
    goto(page, f"{board.url}/ui/coverage?since=1h#key={board.keys['acme']}")  # datasets are the operator's
    assert page.text_content("#admin-only") == "The coverage map needs the admin key."
