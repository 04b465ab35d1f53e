"""The case board's API (gateway/board_api.py) and `tagway show --cases`, on the gateway seeded with realistic
traffic and two replay runs (tests/board_seed.py): keyset pages, tenant limits without existence leaks, bad input,
and the pure helpers (cursor, truncation, diff, session link)."""
from __future__ import annotations

import base64
import re
import time

import orjson
import pytest
import typer
import httpx
from typer.testing import CliRunner

from exporters import calls as c
from exporters.cases import word_diff
from exporters.vocabulary import QueryInputError
from gateway import stats_cli
from tests.board_seed import ADMIN_KEY, HUGE_CHARS
from tests.replay_support import unique


def get(board, path: str, key: str = ADMIN_KEY, **params) -> httpx.Response:
    return httpx.get(board.url + path, params=params, headers={"Authorization": f"Bearer {key}"})


def error_of(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_keyset_pages_cover_every_call_once_newest_first(board, chdb_store):
    seen, cursor, pages = [], None, 0
    while True:
        params = {"since": "1h", "where": board.where, "limit": 9}
        if cursor:
            params["cursor"] = cursor
        page = get(board, "/admin/calls", **params).json()
        pages += 1
        seen += [(x["Timestamp"], x["trace_id"]) for x in page["calls"]]
        cursor = page["next"]
        if cursor is None:
            break
    want = chdb_store.query("SELECT trace_id FROM llm_calls WHERE tags['run'] = {r:String} AND source = 'production' "
                            "ORDER BY Timestamp DESC, trace_id DESC", {"r": board.run})
    assert [t for _, t in seen] == [r["trace_id"] for r in want] and len(seen) == 80 and pages == 9
    assert seen == sorted(seen, reverse=True)
    # replayed calls are left out unless a filter names source, as everywhere else
    replayed = get(board, "/admin/calls", since="1h", where=[board.where, "source=replay"], limit=500).json()
    assert len(replayed["calls"]) == 144 and {x["replay_run_id"] for x in replayed["calls"]} == set(board.runs)


def test_a_platform_key_reads_the_calls_it_made(board, chdb_store):
    """A platform key (may_set_customer) records its calls under the customers it names, and was pinned to its own
    customer on every read: 0 calls, its own trace a 404, though feedback on that same trace was accepted. It now
    reads the calls it made (whichever customer), and only those."""
    from tests.board_seed import PLATFORM_KEY  # noqa: PLC0415

    # a customer of its own (the board's tests count the seeded customers' calls), tagged apart from the board's
    customer, run = "pf-" + board.run, "pf-" + board.run
    res = httpx.post(board.url + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {PLATFORM_KEY}", "x-tagway-customer": customer, "x-tagway-intent": "platform-read",
        "x-tagway-tags": f"run={run}"}, json={"model": "gpt-prod", "messages": [{"role": "user", "content": "hi"}]})
    assert res.status_code == 200, res.text
    mine = res.headers["x-tagway-trace-id"]
    assert board.app.recorder.force_flush()
    calls = get(board, "/v1/tagway/calls", PLATFORM_KEY, since="1h", limit=500).json()["calls"]
    assert [(x["trace_id"], x["customer"], x["key_id"]) for x in calls] == [(mine, customer, "platform")]
    replayed = get(board, "/v1/tagway/calls", PLATFORM_KEY, since="1h", where=[board.where, "source=replay"],
                   limit=500).json()["calls"]  # the board's replays ran with this key, for its customers
    assert len(replayed) == 144 and {x["key_id"] for x in replayed} == {"platform"}
    stats = get(board, "/v1/tagway/stats", PLATFORM_KEY, since="1h", by="intent").json()
    assert [(s["key"]["intent"], s["calls"]) for s in stats["segments"]] == [("platform-read", 1)]
    assert get(board, f"/v1/tagway/calls/{mine}", PLATFORM_KEY).json()["customer"] == customer
    assert get(board, f"/v1/tagway/cases/{mine}", PLATFORM_KEY).json()["call"]["trace_id"] == mine
    # a tenant's own call, which this key did not make, answers as an unknown one
    other = get(board, f"/v1/tagway/calls/{board.traces['fallback']}", PLATFORM_KEY)
    assert error_of(other, 404)["code"] == "call_not_found"
    assert other.content == get(board, f"/v1/tagway/calls/{'f' * 32}", PLATFORM_KEY).content
    assert get(board, f"/v1/tagway/cases/{board.traces['fallback']}", PLATFORM_KEY).status_code == 404


@pytest.mark.parametrize("params,param,needle", [
    ({"cursor": "not-a-cursor"}, "cursor", "invalid cursor"),
    # a time past Int64's nanoseconds was an OverflowError: a plain 500 and a traceback in the log
    ({"cursor": base64.urlsafe_b64encode(f"{10**30}:{'a' * 32}".encode()).decode()}, "cursor", "out of range"),
    ({"limit": "0"}, "limit", "limit must be between 1 and 500"),
    ({"q": "x" * 201}, "q", "search text is too long"),
    ({"segment": "refund"}, "segment", "segment needs dataset"),
    ({"where": "tag.<b>=1"}, "where", "invalid tag key '<b>'"),
    ({"offset": "10"}, "offset", "unknown query parameter 'offset'"),
])
def test_calls_bad_input(board, params, param, needle):
    err = error_of(get(board, "/admin/calls", **params), 400)
    assert err["param"] == param and needle in err["message"]


def test_tenant_keys_see_their_own_customer_and_nothing_else(board, chdb_store):
    acme, globex = board.customers["acme"], board.customers["globex"]
    key = board.keys["acme"]
    assert get(board, "/v1/tagway/whoami", key).json() == {"admin": False, "customer": acme, "key_id": "acme-key",
                                                           "may_mark_replay": False}
    mine = get(board, "/v1/tagway/calls", key, since="1h", limit=500).json()
    assert {x["customer"] for x in mine["calls"]} == {acme} and len(mine["calls"]) == 24 + 4  # + fallback, tools, 2 session
    assert error_of(get(board, "/v1/tagway/calls", key, where=f"customer={globex}"), 403)["code"] == "customer_not_allowed"
    own = board.traces["fallback"]
    assert get(board, f"/v1/tagway/calls/{own}", key).json()["customer"] == acme
    # another tenant's trace answers exactly like one that does not exist
    other = get(board, f"/v1/tagway/calls/{board.traces['error']}", key)
    unknown = get(board, f"/v1/tagway/calls/{'f' * 32}", key)
    assert error_of(other, 404)["code"] == "call_not_found" and other.content == unknown.content
    assert get(board, f"/v1/tagway/cases/{board.traces['error']}", key).content == \
        get(board, f"/v1/tagway/cases/{'f' * 32}", key).content
    # replays: its own cases only, no gate verdict decided over other customers
    runs = get(board, "/v1/tagway/replays", key).json()["runs"]
    assert [r["run_id"] for r in runs] == board.runs[::-1] and all(r["verdict"] == "" for r in runs)
    run = get(board, f"/v1/tagway/replays/{board.runs[1]}", key).json()
    # its share of the run: its cases, and what the run's calls for them cost (not the logged baseline's production
    # cost, which the run never paid: that doubled the figure)
    share = chdb_store.query("SELECT count() AS n, sum(cost_usd) AS cost FROM llm_calls WHERE replay_run_id = {r:String} "
                             "AND customer = {c:String}", parameters={"r": board.runs[1], "c": acme})[0]
    cases = chdb_store.query("SELECT uniqExact(case_id) AS n FROM replay_results WHERE run_id = {r:String} "
                             "AND customer = {c:String}", parameters={"r": board.runs[1], "c": acme})[0]["n"]
    admin = get(board, f"/admin/replays/{board.runs[1]}").json()
    assert int(share["n"]) > 0 and float(share["cost"]) > 0 and run["cost_usd"] == pytest.approx(float(share["cost"]))
    # from the other side: the candidate's results for its cases (no judge in this spec; the logged baseline's rows
    # carry production's cost and are not the run's)
    paid = chdb_store.query("SELECT sum(cost_usd) AS c FROM (SELECT cost_usd FROM replay_results WHERE run_id = "
                            "{r:String} AND customer = {c:String} AND candidate != 'baseline' ORDER BY Timestamp DESC "
                            "LIMIT 1 BY candidate, case_id)", parameters={"r": board.runs[1], "c": acme})[0]["c"]
    assert run["cost_usd"] == pytest.approx(float(paid))
    assert run["n_cases"] == cases < admin["n_cases"]
    assert {r["run_id"]: r["cost_usd"] for r in runs}[board.runs[1]] == pytest.approx(run["cost_usd"])
    assert {f["customer"] for f in run["flipped"]} == {acme} and len(run["flipped"]) == 4
    assert "reasons" not in run and run["limited_to_customer"] == acme
    assert sum(r["n"] for r in run["table"]["cand"]["rows"]) == run["table"]["cand"]["overall"]["n"] < 72
    chart = get(board, "/v1/tagway/charts", key, since="1h", by="customer").json()
    assert [s["key"] for s in chart["series"]] == [acme]
    # the overview's other two routes, for the same page with a tenant key
    series = get(board, "/v1/tagway/timeseries", key, since="1h", by="customer", min_calls=0).json()["series"]
    assert [s["key"] for s in series] == [acme]
    globex_errors = get(board, "/v1/tagway/errors", board.keys["globex"], since="1h").json()
    assert globex_errors["total_errors"] == 1 and globex_errors["errors"][0]["example_trace_ids"] == [board.traces["error"]]
    assert get(board, "/v1/tagway/errors", key, since="1h").json()["total_errors"] == 0
    # admin routes stay admin-only
    for path in ("/admin/calls", f"/admin/calls/{own}", f"/admin/cases/{own}", "/admin/replays", "/admin/charts"):
        assert error_of(get(board, path, key), 403)["code"] == "admin_key_required"
    assert error_of(get(board, "/v1/tagway/calls", "tw-not-a-key"), 401)["code"] == "invalid_api_key"


def test_call_detail_and_truncation(board):
    full = get(board, f"/admin/calls/{board.traces['huge']}").json()
    assert len(full["request_json"]) > HUGE_CHARS and full["truncated"] == {}
    cut = get(board, f"/admin/calls/{board.traces['huge']}", max_chars=1000).json()
    text = orjson.loads(cut["request_json"])[0]["parts"][0]["content"]  # still valid JSON
    left_out = cut["truncated"]["request_json"]
    kept = text[:-len(f"...[{left_out} more characters]")]
    assert text.endswith(f"...[{left_out} more characters]") and kept.startswith("long xxx")
    assert len(kept) + left_out == len("long " + "x" * HUGE_CHARS + " end") and 900 < len(kept) <= 1000
    assert error_of(get(board, f"/admin/calls/{board.traces['huge']}", max_chars="5"), 400)["param"] == "max_chars"
    fb = get(board, f"/admin/calls/{board.traces['fallback']}").json()
    assert [(a["deployment"], a["http_status"]) for a in fb["attempts_detail"]] == [("flaky", 503), ("gpt-prod", 200)]
    assert fb["attempts_detail"][1]["start_offset_ms"] >= fb["attempts_detail"][0]["duration_ms"]
    err = get(board, f"/admin/calls/{board.traces['error']}").json()
    assert err["error_message"].startswith("upstream says 500") and "sk-upstream" not in err["error_message"]
    assert get(board, f"/admin/calls/{board.traces['session']}").json()["session"] == f"tag.session_id=s-{board.run}"
    assert error_of(get(board, "/admin/calls/abc'--"), 400)["param"] == "trace_id"
    assert error_of(get(board, "/admin/replays/bad id!"), 400)["param"] == "run_id"
    assert error_of(get(board, "/admin/replays/trend"), 400)["param"] == "spec"
    one = get(board, "/admin/replays", dataset=f"run-{board.runs[0]}").json()["runs"]
    assert [r["run_id"] for r in one] == [board.runs[0]] and one[0]["spec_name"] == board.spec_name
    by_spec = get(board, "/admin/replays", spec=board.spec_name).json()["runs"]
    assert [r["run_id"] for r in by_spec] == board.runs[::-1]
    trend = get(board, "/admin/replays/trend", dataset=f"run-{board.runs[1]}").json()
    assert [r["run_id"] for r in trend["runs"]] == [board.runs[1]]


def test_runs_and_trend_take_a_dataset_name_as_the_cli_does(board, chdb_store):
    """`dataset=refunds` takes the runs of refunds@1 and refunds@2, as `tagway replay trend --dataset refunds` does
    (the API found none: it wanted the exact id); an exact id still takes only its version's."""
    from tests.test_replay_trend import seed_run
    name, r1, r2 = unique("trendapi"), unique("r1"), unique("r2")
    now = time.time()
    seed_run(chdb_store, r1, f"{name}@1", now - 60, {"acme": 30}, {"acme": 30}, name + "v1")
    seed_run(chdb_store, r2, f"{name}@2", now - 30, {"acme": 20}, {"acme": 30}, name + "v2")
    assert [r["run_id"] for r in get(board, "/admin/replays", dataset=name).json()["runs"]] == [r2, r1]
    trend = get(board, "/admin/replays/trend", dataset=name).json()
    assert [r["run_id"] for r in trend["runs"]] == [r1, r2]
    assert [r["run_id"] for r in get(board, "/admin/replays/trend", dataset=f"{name}@2").json()["runs"]] == [r2]


def test_show_says_what_each_attempt_of_a_fallback_call_hit(board, chdb_dsn):
    """`tagway show` on a call that fell back: one line per upstream try (a trial saw only "attempts 2")."""
    app = typer.Typer()
    stats_cli.register(app)
    res = CliRunner().invoke(app, ["show", board.traces["fallback"], "--dsn", chdb_dsn], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = [" ".join(line.split()) for line in res.stdout.splitlines()]
    first = next(x for x in lines if "attempt 1" in x)
    second = next(x for x in lines if "attempt 2" in x)
    assert "flaky (openai fail503-flaky): 503 " in first and " ms" in first, first
    assert "gpt-prod (openai " in second and "): 200," in second, second


def test_show_cases_cli_matches_the_case_view(board, chdb_dsn):
    case = get(board, f"/admin/replays/{board.runs[1]}").json()["flipped"][0]["case_id"]
    app = typer.Typer()
    stats_cli.register(app)
    res = CliRunner().invoke(app, ["show", case, "--cases", "--json", "--dsn", chdb_dsn])
    assert res.exit_code == 0, res.output
    cli = orjson.loads(res.stdout)
    api = get(board, f"/admin/cases/{case}").json()
    assert cli["runs"] == api["runs"] and cli["sections"] == api["sections"]
    assert [r["run_id"] for r in cli["runs"]] == board.runs
    text = CliRunner().invoke(app, ["show", case, "--cases", "--dsn", chdb_dsn])
    assert text.exit_code == 0, text.output
    out = text.stdout
    for run in board.runs:
        assert f"run {run}" in out
    assert "candidate cand" in out and "WRONG" in out and "NOT (contains ['WRONG'])" in out
    assert "failed  (regressed)" in out
    # the regressed run's diff, without colours here: marked as `git diff --word-diff=plain` marks them
    diff = out.rsplit("diff baseline -> cand:", 1)[1].splitlines()[1]
    assert re.fullmatch(r"\[-Echo: Where is my refund for order \d+\?-\]\{\+WRONG\+\}", diff), diff
    # every section's table exists on a migrated store: each is listed, empty for this case
    assert all(f"{t}: 0" in out for t in ("Labels and locks", "Feedback", "Tag audit")) and "not recorded" not in out
    held = out.split("In datasets:", 1)[1].splitlines()[1]  # times read as times, as on the page
    assert re.search(r"added_at=20\d\d-\d\d-\d\d \d\d:\d\d:\d\d", held), held
    missing = CliRunner().invoke(app, ["show", "f" * 32, "--cases", "--dsn", chdb_dsn])
    assert missing.exit_code == 2 and "no call with trace id" in missing.output


def test_pages_refuse_a_key_in_the_query_string(board):
    for path in ("/ui", "/ui/calls", f"/ui/calls/{board.traces['tools']}"):
        res = httpx.get(board.url + path, params={"key": ADMIN_KEY})
        assert res.status_code == 400 and "Keys do not go in a URL" in res.text and ADMIN_KEY not in res.text
    shell = httpx.get(board.url + f"/ui/cases/{board.traces['tools']}")
    assert shell.status_code == 200 and 'src="../board.js"' in shell.text
    assert "script-src 'self'" in shell.headers["content-security-policy"]
    assert httpx.get(board.url + "/ui/nope/x").status_code == 404


def test_the_word_diff_is_marked_in_text_when_colours_will_not_show():
    import io  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415

    from gateway.case_cli import plain_diff  # noqa: PLC0415

    assert plain_diff(Console(file=io.StringIO(), force_terminal=True, no_color=True))  # NO_COLOR on a terminal
    assert plain_diff(Console(file=io.StringIO()))  # a pipe
    assert not plain_diff(Console(file=io.StringIO(), force_terminal=True, color_system="standard"))


# -- the pure parts --------------------------------------------------------------------------------------------
def test_cursor_round_trip_and_rejects():
    cur = c.Cursor(1_796_517_264_326_750_542, "abc-DEF_123")
    assert c.Cursor.parse(cur.encode()) == cur
    for bad in ("", "!!", c.Cursor(1, "a b").encode(), "MTIzOg"):  # "123:" has no trace id
        with pytest.raises(QueryInputError):
            c.Cursor.parse(bad)


def test_truncate_json_text_keeps_valid_json():
    doc = orjson.dumps([{"role": "user", "parts": [{"type": "text", "content": "a" * 50}, {"x": "b" * 50}]}]).decode()
    text, cut = c.truncate_json_text(doc, 60)
    # every string counts, "user" and "text" too: 4 + 4 + 50 leaves 2 characters of the last one
    assert cut == 48 and orjson.loads(text)[0]["parts"][1]["x"] == "bb...[48 more characters]"
    assert c.truncate_json_text(doc, 10_000) == (doc, 0)
    assert c.truncate_json_text("not json " * 20, 20) == ("not json not json no...[160 more characters]", 160)


def test_word_diff():
    assert word_diff("the refund is on its way", "the refund was denied") == [
        ["=", "the refund "], ["-", "is on its way"], ["+", "was denied"]]
    assert word_diff("", "new") == [["+", "new"]] and word_diff("same", "same") == [["=", "same"]]


def test_session_filter():
    assert c.session_filter({"tags": {"session_id": "s1", "session": "x"}}) == "tag.session_id=s1"
    assert c.session_filter({"tags": {"thread_id": "t9"}}) == "tag.thread_id=t9"
    assert c.session_filter({"tags": {}}) is None


def test_pages_are_the_same_whatever_stretch_they_come_from(chdb_store):
    """The list looks back 15 min, 3 h, 1 d, 7 d, then the whole window for a page: calls spread over 9 days (dense
    now, sparse later) page out in exactly the order of one ORDER BY over the window, for several page sizes."""
    import datetime as dt  # noqa: PLC0415

    from exporters import queries as q  # noqa: PLC0415
    from tests.calls_seed import NOW, call_row, insert_calls  # noqa: PLC0415

    run = "lk" + __import__("uuid").uuid4().hex[:8]
    ages = [dt.timedelta(minutes=m) for m in range(0, 12)] + [dt.timedelta(hours=h) for h in (1, 2, 4, 8, 20, 30)]
    ages += [dt.timedelta(days=d) for d in (2, 3, 6, 8, 9)]
    insert_calls(chdb_store, [call_row(run, f"{run}-c", 0, when=NOW - a, trace_id=f"{run}-{i:03d}")
                              for i, a in enumerate(ages)] + [call_row(run, f"{run}-c", 0, when=NOW - ages[3],
                                                                       trace_id=f"{run}-tie")])
    sel = q.make_selection([f"tag.run={run}"], since="10d")
    want = [r["trace_id"] for r in chdb_store.query(
        "SELECT trace_id FROM llm_calls WHERE tags['run'] = {r:String} ORDER BY Timestamp DESC, trace_id DESC",
        {"r": run})]
    assert len(want) == len(ages) + 1
    for limit in (1, 4, 7, 50):
        seen, cursor = [], None
        while True:
            page = c.list_calls(chdb_store, sel, limit=limit, cursor=cursor)
            seen += [x["trace_id"] for x in page.calls]
            cursor = page.next
            if cursor is None:
                break
        assert seen == want, limit
