"""The /ui dashboard in headless Chromium against a real server (uvicorn on 127.0.0.1 in a thread) serving the stats
router over the shared chDB store: the dumped DOM must show the seeded numbers, the same cells `tagway stats`
prints, and nothing without the admin key."""
from __future__ import annotations

import html
import html.parser
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse

import pytest
import typer
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from gateway import stats_cli
from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.stats_api import build_stats_router
from exporters import queries as q
from tests.calls_seed import Seeded, call_row, insert_calls, seed_calls

ADMIN = "tw-admin-ui-test-key"


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def seeded(chdb_store) -> Seeded:
    return seed_calls(chdb_store)


@pytest.fixture(scope="module")
def server(chdb_store):
    mp = pytest.MonkeyPatch()
    mp.setenv("TAGWAY_ADMIN_KEY", ADMIN)
    keyring = KeyRing(GatewayConfig())  # admin key from $TAGWAY_ADMIN_KEY
    mp.undo()
    app = FastAPI()
    app.include_router(build_stats_router(keyring, lambda: chdb_store))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def dump_dom(url: str) -> str:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the page test needs one")
    with tempfile.TemporaryDirectory(prefix="tagway-chromium-") as profile:
        proc = subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class _Dom(html.parser.HTMLParser):
    """Collects table rows (id of the table, section, attributes, cell texts) and a few element texts by id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.by_id: dict[str, str] = {}
        self.attrs_by_id: dict[str, dict] = {}
        self.series: list[str] = []
        self.chart_series: list[str] = []
        self._table: str | None = None
        self._section: str | None = None
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self._capture: list[tuple[str, str, int, list[str]]] = []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("br", "input", "img", "meta", "link", "path", "circle", "line"):
            self._depth += 1
        if "id" in a:
            self.attrs_by_id[a["id"]] = a
            self._capture.append((a["id"], tag, self._depth, []))
        if tag == "table":
            self._table = a.get("id")
        elif tag in ("thead", "tbody", "tfoot"):
            self._section = tag
        elif tag == "tr":
            self._row = {"table": self._table, "section": self._section, "attrs": a, "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "g" and "data-series" in a:
            self.chart_series.append(a["data-series"])
        elif tag == "span" and "data-series" in a:
            self.series.append(a["data-series"])  # the legend, worst first

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        if self._capture and self._capture[-1][2] == self._depth:
            ident, _, _, text = self._capture.pop()
            self.by_id[ident] = "".join(text).strip()
            if self._capture:
                self._capture[-1][3].extend(text)
        if tag not in ("br", "input", "img", "meta", "link", "path", "circle", "line"):
            self._depth -= 1

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._capture:
            self._capture[-1][3].append(data)

    def table(self, ident: str, section: str = "tbody") -> list[dict]:
        return [r for r in self.rows if r["table"] == ident and r["section"] == section]


def parse(dom: str) -> _Dom:
    p = _Dom()
    p.feed(dom)
    return p


def page_url(base: str, **state: str) -> str:
    return f"{base}/ui#" + urllib.parse.urlencode(state)


def test_page_shows_the_seeded_numbers(server, seeded, chdb_dsn):
    where = f"tag.run={seeded.run} customer!={seeded.spans}"
    dom = parse(dump_dom(page_url(server, key=ADMIN, since="1h", by="customer,intent", where=where)))
    body = dom.attrs_by_id.get("key-panel", {})
    assert "hidden" in body, "the key form should be hidden once a key is given"
    rows = dom.table("segments")
    assert rows, "no segment rows rendered; error banner: " + dom.by_id.get("error", "")
    # worst segment on top: acme on intent refund, 30 of 100 calls, Wilson 95% interval 21.9-39.6%
    top = rows[0]
    assert top["attrs"]["data-segment"] == f"{seeded.acme}|refund"
    assert top["cells"][:6] == [seeded.acme, "refund", "100", "30", "30.0%", "21.9-39.6%"]
    assert [r["attrs"]["data-segment"] for r in rows] == [
        f"{seeded.acme}|refund", f"{seeded.initech}|chat", f"{seeded.acme}|chat", f"{seeded.globex}|chat",
        f"{seeded.globex}|refund"]
    low = rows[1]
    assert "low-confidence" in low["attrs"]["class"] and low["cells"][-1] == "low n (<20)"
    assert low["cells"][2:6] == ["10", "3", "30.0%", "10.8-60.3%"]
    (total,) = dom.table("segments", "tfoot")
    assert total["cells"][:6] == ["all", "", "1,000", "33", "3.3%", "2.4-4.6%"]  # the mean that hides it
    assert dom.by_id["m-rate"] == "3.3%" and dom.by_id["m-calls"] == "1,000"
    # every time on the page in UTC, the refresh time too (it was the browser's local 12-hour clock)
    assert re.search(r" · updated \d\d:\d\d:\d\d UTC$", dom.by_id["status-line"]), dom.by_id["status-line"]
    assert dom.by_id["m-worst"] == f"{seeded.acme} · refund"
    # error rate over time: one series per tenant, worst first
    assert dom.series[:1] == [seeded.acme] and set(dom.series) == {seeded.acme, seeded.globex, seeded.initech}
    assert sorted(dom.chart_series) == sorted(dom.series) and dom.chart_series[-1] == seeded.acme  # drawn on top
    # top error types with example trace ids
    errors = dom.table("errors")
    assert [r["cells"][:2] for r in errors] == [["upstream_5xx", "20"], ["timeout", "10"], ["rate_limited", "3"]]

    # the same cells as `tagway stats` prints for the same filters
    app = typer.Typer()
    stats_cli.register(app)
    res = CliRunner().invoke(app, ["stats", "--since", "1h", "--by", "customer", "--by", "intent", "--where",
                                   f"tag.run={seeded.run}", "--where", f"customer!={seeded.spans}", "--dsn",
                                   chdb_dsn])
    assert res.exit_code == 0, res.output
    cli_rows = [[c.strip() for c in ln.strip().strip("│").split("│")] for ln in res.stdout.splitlines()
                if ln.strip().startswith("│")]
    page_rows = [r["cells"] for r in rows] + [total["cells"]]
    assert [r[:-1] for r in cli_rows] == [r[:-1] for r in page_rows]


def test_page_compare_and_filters(server, seeded):
    dom = parse(dump_dom(page_url(server, key=ADMIN, since="24h", by="customer",
                                  where=f"tag.run={seeded.run},intent=refund", compare="1")))
    rows = dom.table("segments")
    heads = dom.table("segments", "thead")[0]["cells"]
    assert "prev rate" in heads and "delta" in heads
    top = rows[0]
    assert top["cells"][:7] == [seeded.acme, "100", "30", "30.0%", "21.9-39.6%", "5.0%", "+25.0 pp"]
    assert {r["attrs"]["data-segment"] for r in rows} == {seeded.acme, seeded.globex, seeded.spans}


def test_page_takes_its_filters_from_the_query_string(server, seeded):
    """/ui?by=intent&since=7d&where=... (the query string, as every other board page and the README's links take
    filters) shows that grouping, window and filter; it showed the default (24 h, by customer, unfiltered), as the
    page read only the fragment. The key stays in the fragment. The filters then move into the fragment, which the
    form keeps up to date: a reload after a change shows the change, not the query string's filters again; the
    fragment wins over the query string where both name a filter."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (tests/run.sh installs it)")
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the page test needs one")
    query = urllib.parse.urlencode([("by", "intent"), ("since", "7d"), ("where", f"tag.run={seeded.run}"),
                                    ("where", f"customer={seeded.acme}")])

    def segments(pg) -> dict[str, list[str]]:
        pg.wait_for_selector("body[data-loaded]", timeout=20_000)
        assert pg.get_attribute("body", "data-loaded") == "1", pg.text_content("#error")
        return {tr.get_attribute("data-segment"): [td.text_content().strip() for td in tr.query_selector_all("td")]
                for tr in pg.query_selector_all("#segments tbody tr[data-segment]")}

    def form(pg) -> tuple[str, str, str]:
        return pg.input_value("#f-since"), pg.input_value("#f-by"), pg.input_value("#f-where")

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--no-sandbox", "--disable-gpu",
                                                                  "--disable-dev-shm-usage"])
        try:
            pg = browser.new_context().new_page()
            pg.goto(f"{server}/ui?{query}#key={ADMIN}")
            # by intent, acme only, over 7 days: the refund calls of 36 h ago count too (24 h: 100 calls, 30 errors)
            got = segments(pg)
            assert {k: v[:4] for k, v in got.items()} == {"refund": ["refund", "200", "35", "17.5%"],
                                                          "chat": ["chat", "400", "0", "0.0%"]}, got
            assert form(pg) == ("7d", "intent", f"tag.run={seeded.run} customer={seeded.acme}")
            url = urllib.parse.urlsplit(pg.url)
            assert url.query == "" and "key" not in url.fragment
            assert dict(urllib.parse.parse_qsl(url.fragment)) == {
                "since": "7d", "by": "intent", "where": f"tag.run={seeded.run} customer={seeded.acme}"}
            # a change in the form, then a reload: the change holds
            pg.fill("#f-by", "customer")
            pg.evaluate("document.body.removeAttribute('data-loaded')")
            pg.press("#f-by", "Enter")
            assert list(segments(pg)) == [seeded.acme]
            pg.evaluate("document.body.removeAttribute('data-loaded')")
            pg.reload()
            assert form(pg) == ("7d", "customer", f"tag.run={seeded.run} customer={seeded.acme}")
            assert segments(pg)[seeded.acme][:3] == [seeded.acme, "600", "35"]
            # both: the fragment's by, the query string's window and filters
            pg.goto(f"{server}/ui?{query}#by=prompt_version")
            assert form(pg) == ("7d", "prompt_version", f"tag.run={seeded.run} customer={seeded.acme}")
            assert sorted(segments(pg)) == ["v1", "v2"]
        finally:
            browser.close()


def test_page_without_key_shows_no_data(server, seeded):
    dom = parse(dump_dom(f"{server}/ui"))
    assert "hidden" not in dom.attrs_by_id["key-panel"], "the page should ask for the admin key"
    assert dom.table("segments") == [] and dom.by_id["m-calls"] == "-"


def test_page_with_a_wrong_key_asks_again(server, seeded):
    dom = parse(dump_dom(page_url(server, key="tw-not-the-key", since="1h")))
    assert "hidden" not in dom.attrs_by_id["key-panel"]
    assert "Incorrect API key" in dom.by_id["key-error"]
    assert dom.table("segments") == []


def test_top_errors_say_what_the_ten_rows_leave_out(server, chdb_store):
    """12 error types, the page lists the top 10: a last row says the 2 more and their calls, so the shares shown
    need not add up to 100% unexplained (the CLI says the same under its table)."""
    run = "et" + os.urandom(5).hex()
    rows = [call_row(run, "acme", i, status="error", error_type=f"kind_{t:02d}")
            for t in range(12) for i in range(20 - t)]  # kind_00: 20 calls ... kind_11: 9
    insert_calls(chdb_store, rows)
    dom = parse(dump_dom(page_url(server, key=ADMIN, since="1h", by="customer", where=f"tag.run={run}")))
    errors = dom.table("errors")
    assert [r["cells"][0] for r in errors[:10]] == [f"kind_{t:02d}" for t in range(10)]
    assert errors[10]["attrs"].get("class") == "more"
    assert errors[10]["cells"] == ["+2 more error type(s) with 19 call(s)"]
    assert len(errors) == 11


# -- number formatting: the page prints what the CLI prints ----------------------------------------------------
def test_page_rounds_rates_like_the_cli(server, chdb_store, chdb_dsn):
    """1 error in 2000 calls is 0.05% as a double a little above 0.05: the CLI prints 0.1%, and so must the page
    (it printed 0.0%); 13 in 2000 (0.65...) is 0.7% in both, 3 in 2000 (0.15, a little below) 0.1% in both."""
    run = "fm" + os.urandom(5).hex()
    rows = []
    for errors in (1, 3, 13):
        rows += [call_row(run, f"{run}-{errors:02d}", i, status="error" if i < errors else "ok")
                 for i in range(2000)]
    insert_calls(chdb_store, rows)
    dom = parse(dump_dom(page_url(server, key=ADMIN, since="1h", by="customer", where=f"tag.run={run}",
                                  min_calls="1")))
    got = {r["attrs"]["data-segment"]: r["cells"][1:5] for r in dom.table("segments")}
    assert got == {f"{run}-13": ["2,000", "13", "0.7%", "0.4-1.1%"], f"{run}-03": ["2,000", "3", "0.1%", "0.1-0.4%"],
                   f"{run}-01": ["2,000", "1", "0.1%", "0.0-0.3%"]}, got
    (total,) = dom.table("segments", "tfoot")
    assert "source not replay, replay-judge" in dom.by_id["status-line"]

    app = typer.Typer()
    stats_cli.register(app)
    res = CliRunner().invoke(app, ["stats", "--since", "1h", "--where", f"tag.run={run}", "--min-calls", "1",
                                   "--dsn", chdb_dsn])
    assert res.exit_code == 0, res.output
    cli_rows = [[c.strip() for c in ln.strip().strip("│").split("│")] for ln in res.stdout.splitlines()
                if ln.strip().startswith("│")]
    page_rows = [r["cells"] for r in dom.table("segments")] + [total["cells"]]
    assert [r[:-1] for r in cli_rows] == [r[:-1] for r in page_rows]


def _format_cases() -> list[list]:
    """[formatter, value] pairs: every k/n rate for small n and for n = 2000, Wilson bounds, deltas, exact binary
    ties (0.125, 2.5, ...), latencies, costs and negative values."""
    rng = random.Random(7)
    cases: list[list] = []
    fractions = [(k, n) for n in range(1, 41) for k in range(n + 1)] + [(k, 2000) for k in range(2001)]
    fractions += [(k, n) for n in (1000, 4000, 10_000, 12_345) for k in rng.sample(range(n + 1), 300)]
    for k, n in fractions:
        cases.append(["rate", k / n])
        cases.append(["ci", list(q.wilson_interval(k, n))])
    rates = [k / n for k, n in fractions]
    cases += [["delta", a - b] for a, b in zip(rng.sample(rates, 2000), rng.sample(rates, 2000))]
    cases += [["delta", x] for x in (0.0, -0.0, 0.0005, -0.0005, 0.00125, -0.00125, 0.25, -0.015)]
    ties = [i / 8 for i in range(-80, 81)] + [i / 2 for i in range(-40, 41)] + [i / 64 for i in range(0, 200)]
    cases += [["ms", x] for x in ties + [rng.uniform(0, 1e6) for _ in range(500)] + [0.5, 1.5, 2.5, 1234567.5]]
    costs = ties + [i * 0.00005 for i in range(400)] + [0.0001 * i + 0.00005 for i in range(200)]
    costs += [rng.uniform(0, 5) for _ in range(500)] + [99.995, 99.99995, 100.005, 123.455, 1234567.125, 1e22]
    # under a dollar: two significant digits, carries across a power of ten, tiny costs
    costs += [2.7e-05, 4.11e-05, 0.0996, 0.000999999, 0.00995, 0.995, 0.9951, 1e-9, 3.15e-06, 0.125, 0.0125,
              9.96e-21, 9.999e-21, 1e-20]  # where 10**k is not exact in floating point
    costs += [rng.uniform(0, 1) * 10 ** -rng.randrange(1, 9) for _ in range(500)]
    cases += [["cost", abs(x)] for x in costs] + [["fixed6", abs(x)] for x in costs]
    return cases


def _python_format(kind: str, x) -> str:
    if kind == "rate":
        return stats_cli.fmt_rate(x)
    if kind == "ci":
        return stats_cli.fmt_ci(*x)
    if kind == "delta":
        return stats_cli.fmt_delta(x)
    if kind == "ms":
        return stats_cli.fmt_ms(x)
    if kind == "cost":
        return stats_cli.fmt_cost(x)
    return f"{x:.6f}"  # `tagway show` prints the cost as ${x:.6f}; the page's call panel as "$" + fixed(x, 6)


def test_ui_js_formats_numbers_like_the_cli(tmp_path):
    """common.js's formatters (shared by every page) in Chromium (no node needed) against stats_cli's for thousands of values, including
    1/2000 and 13/2000 (which the page printed as 0.0% and 0.6% while the CLI said 0.1% and 0.7%)."""
    cases = _format_cases()
    assert ["rate", 1 / 2000] in cases and ["rate", 13 / 2000] in cases
    ui_js = os.path.join(os.path.dirname(stats_cli.__file__), "static", "common.js")  # the formatters
    page = tmp_path / "formats.html"
    page.write_text(
        f'<!doctype html><html><body><pre id="out"></pre><script src="file://{ui_js}"></script><script>\n'
        f"const CASES = {json.dumps(cases)};\n"
        "const F = {rate: fmtRate, ci: (b) => fmtCI({low: b[0], high: b[1]}), delta: fmtDelta, ms: fmtMs,\n"
        "  cost: fmtCost, fixed6: (x) => fixed(x, 6)};\n"
        "let out;\n"
        "try { out = CASES.map(([k, x]) => F[k](x)); } catch (e) { out = 'error: ' + e; }\n"
        'document.getElementById("out").textContent = JSON.stringify(out);\n'
        "</script></body></html>\n")
    dom = dump_dom(page.as_uri())
    text = html.unescape(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0])
    got = json.loads(text)
    assert isinstance(got, list) and len(got) == len(cases), str(got)[:500]
    want = [_python_format(k, x) for k, x in cases]
    wrong = [(k, x, g, w) for (k, x), g, w in zip(cases, got, want) if g != w]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. (formatter, value, page, CLI): {wrong[:10]}"
    assert got[cases.index(["rate", 1 / 2000])] == "0.1%" and got[cases.index(["rate", 13 / 2000])] == "0.7%"
