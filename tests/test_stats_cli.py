"""`tagway stats|errors|show` in-process (typer's CliRunner) against the shared chDB store: a subprocess could not
open the data directory this test process holds, so the commands get the already-open DSN (connect() shares it)."""
from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re

import orjson
import pytest
import typer
from typer.testing import CliRunner

from exporters import queries as q
from exporters.tables import fmt_usd
from gateway import stats_cli
from tests.calls_seed import Seeded, call_row, insert_calls, seed_calls, seed_replayed


@pytest.fixture(scope="module")
def seeded(chdb_store) -> Seeded:
    return seed_calls(chdb_store)


@pytest.fixture(scope="module")
def cli() -> typer.Typer:
    app = typer.Typer()
    stats_cli.register(app)
    return app


@pytest.fixture()
def run(cli, chdb_dsn, monkeypatch):
    monkeypatch.delenv("TAGWAY_DSN", raising=False)
    monkeypatch.delenv("TAGWAY_CONFIG", raising=False)
    runner = CliRunner()

    def invoke(*args: str, dsn: bool = True):
        argv = list(args) + (["--dsn", chdb_dsn] if dsn else [])
        return runner.invoke(cli, argv, catch_exceptions=False)
    return invoke


def test_stats_json_exact(run, seeded):
    res = run("stats", "--by", "customer", "--by", "intent", "--where", seeded.where, "--where",
              f"customer!={seeded.spans}", "--since", "24h", "--json")
    assert res.exit_code == 0, res.output
    d = orjson.loads(res.stdout)
    top = d["segments"][0]
    assert top["key"] == {"customer": seeded.acme, "intent": "refund"}
    assert (top["calls"], top["errors"], top["error_rate"]) == (100, 30, 0.3)
    assert top["error_rate_ci"]["low"] == pytest.approx(0.21894885294932764)
    assert top["error_rate_ci"]["high"] == pytest.approx(0.39584854633346667)
    assert (d["total"]["calls"], d["total"]["errors"]) == (1000, 33)
    assert d["total"]["error_rate"] == pytest.approx(0.033)
    assert d["segments"][1]["key"]["customer"] == seeded.initech and d["segments"][1]["low_confidence"]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table as lists of cell texts."""
    return [[c.strip() for c in ln.strip().strip("│").split("│")] for ln in text.splitlines()
            if ln.strip().startswith("│")]


def test_stats_table_worst_segment_on_top(run, seeded):
    res = run("stats", "--by", "customer", "--by", "intent", "--where", seeded.where, "--min-calls", "20")
    assert res.exit_code == 0, res.output
    rows = table_rows(res.stdout)
    assert rows[0][:6] == [seeded.acme, "refund", "100", "30", "30.0%", "21.9-39.6%"]
    assert [r[:2] for r in rows[:-1]] == [
        [seeded.acme, "refund"], [seeded.initech, "chat"], [seeded.spans, "refund"], [seeded.acme, "chat"],
        [seeded.globex, "chat"], [seeded.globex, "refund"]]
    assert [r[-1] for r in rows[:-1]] == ["", "low n (<20)", "low n (<20)", "", "", ""]
    assert rows[-1][:6] == ["all", "", "1,004", "34", "3.4%", "2.4-4.7%"]
    assert "segment(s) under --min-calls 20" in res.stdout


def test_stats_compare_and_csv(run, seeded):
    res = run("stats", "--by", "customer,intent", "--where", seeded.where, "--compare", "--csv")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    top = rows[0]
    assert (top["customer"], top["intent"], top["calls"], top["errors"]) == (seeded.acme, "refund", "100", "30")
    assert float(top["prev_error_rate"]) == pytest.approx(0.05)
    assert float(top["delta_error_rate"]) == pytest.approx(0.25)
    table = run("stats", "--by", "customer", "--by", "intent", "--where", seeded.where, "--compare")
    first = next(ln for ln in table.stdout.splitlines() if seeded.acme in ln)
    assert "5.0%" in first and "+25.0 pp" in first


def test_stats_tag_group_by_and_status(run, seeded):
    res = run("stats", "--by", "tag.region", "--where", seeded.where, "--where", f"customer={seeded.acme}",
              "--status", "error", "--json")
    assert res.exit_code == 0, res.output
    d = orjson.loads(res.stdout)
    assert {s["key"]["tag.region"]: s["calls"] for s in d["segments"]} == {"eu": 30}


def test_a_tag_no_call_carries_says_where_applied_tags_are(run, seeded):
    """`--by tag.negative-sentiment` (a tag rules apply) put every call under (none) without a word."""
    res = run("stats", "--by", "tag.negative-sentiment", "--where", seeded.where)
    assert res.exit_code == 0, res.output
    assert ("no call here carries the tag 'negative-sentiment' (every call is under (none)); a tag applied by tag "
            "rules or people is --by applied_tag or --where applied_tag=negative-sentiment") in " ".join(res.stdout.split())
    res = run("stats", "--by", "tag.region", "--where", seeded.where)  # a tag the calls carry: no such line
    assert res.exit_code == 0 and "no call here carries" not in res.stdout


def test_a_filter_value_no_call_has_is_said_with_the_closest_ones(run, seeded):
    """On-call's typo (`customer=initek`) read as "no error calls match": a confident nothing-wrong while initech
    failed. An empty answer now names the filter value no call has, and the recorded values closest to it."""
    typo = seeded.acme[:-1] + ("x" if seeded.acme[-1] != "x" else "y")
    for command in ("errors", "stats"):
        res = run(command, "--where", seeded.where, "--where", f"customer={typo}")
        assert res.exit_code == 0, res.output
        text = " ".join(res.stdout.split())
        assert "match this window and these filters" in text
        assert f"no call in this window has customer={typo}; did you mean customer={seeded.acme}" in text, text
    far = run("errors", "--where", seeded.where, "--where", "customer=zz-nobody-like-this-qq")
    assert "no call in this window has customer=zz-nobody-like-this-qq (those with calls: " in " ".join(far.stdout.split())
    # a value some call has (only not with the other filters): no hint; nor in JSON
    both = run("errors", "--where", seeded.where, "--where", f"customer={seeded.acme}", "--where", "intent=no-such")
    assert f"customer={seeded.acme}" not in " ".join(both.stdout.split()).split("match this window")[1]
    assert "did you mean" not in run("errors", "--where", f"customer={typo}", "--json").stdout


def test_errors_and_show(run, seeded):
    res = run("errors", "--where", seeded.where, "--since", "24h", "--json")
    assert res.exit_code == 0, res.output
    d = orjson.loads(res.stdout)
    assert [(e["error_type"], e["count"]) for e in d["errors"]] == [("upstream_5xx", 21), ("timeout", 10),
                                                                    ("rate_limited", 3)]
    table = run("errors", "--where", seeded.where, "--limit", "2")
    assert table.exit_code == 0
    # who has them and since when, in the table too (on-call saw a count of customers and only the last time)
    top = d["errors"][0]
    assert 1 <= len(top["top_customers"]) <= 3 <= top["customers"] or len(top["top_customers"]) == top["customers"]
    assert set(top["top_customers"]) <= {seeded.acme, seeded.globex, seeded.initech, seeded.spans}
    assert top["first_seen"] <= top["last_seen"]
    wide = run("errors", "--where", seeded.where, "--limit", "1", "--wide")
    line = " ".join(wide.stdout.split())
    assert f"{top['customers']}: {top['top_customers'][0]}" in line, line
    assert "first seen" in line and top["first_seen"][:19].replace("T", " ") in line
    assert "upstream_5xx" in table.stdout and "timeout" in table.stdout and "rate_limited" not in table.stdout
    assert d["error_types"] == 3 and d["total_errors"] == 34
    # what the limit leaves out is said, so the shares need not add up to 100% unexplained
    assert "... and 1 more error type(s) with 3 call(s) (--limit 2: raise it to list them)" in table.stdout
    assert "more error type" not in run("errors", "--where", seeded.where, "--limit", "3").stdout
    example = d["errors"][0]["example_trace_ids"][0]
    assert example in table.stdout or any(t in table.stdout for t in d["errors"][0]["example_trace_ids"])

    shown = run("show", seeded.error_trace)
    assert shown.exit_code == 0, shown.output
    for text in (seeded.acme, "refund", "upstream_5xx", "502", "region=eu", "run=" + seeded.run, "10 in / 5 out",
                 "$0.0010", "request", '"hi"'):
        assert text in shown.stdout, text
    as_json = run("show", seeded.span_trace_ok, "--json")
    call = orjson.loads(as_json.stdout)
    assert call["customer"] == seeded.spans and call["tags"]["region"] == "eu"
    # a W3C trace id copied in upper case (a tool that prints it so) is the same call, not "no call with trace id"
    upper = run("show", seeded.span_trace_ok.upper(), "--json")
    assert upper.exit_code == 0 and orjson.loads(upper.stdout)["trace_id"] == seeded.span_trace_ok, upper.output
    # the provider's message lives on the span: shown as GET /admin/calls/{trace_id} shows it
    failed = run("show", seeded.span_trace_err)
    assert failed.exit_code == 0 and "upstream 502" in failed.stdout, failed.output
    assert orjson.loads(run("show", seeded.span_trace_err, "--json").stdout)["error_message"] == "upstream 502"


@pytest.mark.parametrize("args,needle", [
    (["stats", "--by", "nope"], "unknown group-by column 'nope'"),
    (["stats", "--since", "3x"], "invalid window '3x'"),
    (["stats", "--since", "1h; DROP TABLE llm_calls"], "invalid window"),
    (["stats", "--by", "tag.a'b"], "invalid tag key \"a'b\""),
    (["stats", "--by", "tag.x; DROP TABLE llm_calls"], "invalid tag key"),
    # keys are matched exactly, and the error names the key the gateway recorded for this one
    (["stats", "--by", "tag.Region"], "invalid tag key 'Region': tag keys match [a-z0-9_.-]{1,64} (the gateway records "
                                      "'Region' as 'region')"),
    (["stats", "--where", "tag.x'='1"], "invalid tag key"),
    (["stats", "--where", "intent"], "use key=value"),
    (["stats", "--status", "failed"], "invalid status 'failed'"),
    (["stats", "--from", "2026-11-20", "--since", "1h"], "not both"),
    (["stats", "--json", "--csv"], "one of --json and --csv"),
    (["errors", "--where", "bogus=1"], "unknown filter column 'bogus'"),
    (["show", "no-such-trace-id"], "no call with trace id 'no-such-trace-id'"),
    (["show", "abc' OR 1=1 --"], "invalid trace id"),
])
def test_bad_input_is_one_line_and_exit_2(run, seeded, args, needle):
    res = run(*args)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "Traceback" not in res.output and "SELECT" not in res.output
    assert res.stdout == ""


def test_store_locked_by_running_gateway(run, tmp_path):
    """A gateway holds the embedded store's lock: one line pointing at the HTTP API, exit 2."""
    import fcntl

    data = tmp_path / "held"
    data.mkdir()
    fd = os.open(data / "tagway.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what exporters.store does for the running gateway
    os.write(fd, b"4242")
    try:
        res = CliRunner().invoke(_app(), ["stats", "--dsn", f"chdb://{data}"])
    finally:
        os.close(fd)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "HTTP API" in err and "server DSN" in err and "Traceback" not in err
    assert "(pid 4242)" in err and "retry" in err  # who holds it, and that a serving gateway re-announces itself


def test_missing_store_dir(tmp_path, monkeypatch):
    res = CliRunner().invoke(_app(), ["stats", "--dsn", f"chdb://{tmp_path / 'nothing-here'}"])
    assert res.exit_code == 2 and "no tagway store at" in res.stderr and "start the gateway once" in res.stderr
    assert not (tmp_path / "nothing-here").exists()
    # a tagway.yaml beside it is read only when named: said, rather than "start the gateway" (on the wrong store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAGWAY_CONFIG", raising=False)
    (tmp_path / "tagway.yaml").write_text("storage: {data_dir: ./elsewhere}\n")
    res = CliRunner().invoke(_app(), ["stats"])
    assert res.exit_code == 2 and "./tagway.yaml is read only when named: pass --config tagway.yaml" in res.stderr
    assert "start the gateway" not in res.stderr


def _app() -> typer.Typer:
    app = typer.Typer()
    stats_cli.register(app)
    return app


def test_dsn_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TAGWAY_DSN", raising=False)
    monkeypatch.delenv("TAGWAY_CONFIG", raising=False)
    assert stats_cli.resolve_dsn() == (f"chdb://{os.path.abspath('tagway-data/clickhouse')}", "")
    assert stats_cli.resolve_dsn("http://u:p@h:8123/db") == ("http://u:p@h:8123/db", "")
    cfg = tmp_path / "tagway.yaml"
    cfg.write_text("storage:\n  data_dir: data\n  database: tw\n")
    dsn, db = stats_cli.resolve_dsn(config=str(cfg))
    assert dsn == f"chdb://{tmp_path / 'data' / 'clickhouse'}" and db == "tw"
    monkeypatch.setenv("TAGWAY_CONFIG", str(cfg))
    assert stats_cli.resolve_dsn()[0] == dsn
    monkeypatch.setenv("TAGWAY_DSN", "chdb:///elsewhere")
    assert stats_cli.resolve_dsn() == ("chdb:///elsewhere", "")
    monkeypatch.delenv("TAGWAY_DSN")
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  nope: 1\n")
    res = CliRunner().invoke(_app(), ["stats", "--config", str(bad)])
    assert res.exit_code == 2 and res.stderr.startswith("error: config: ") and len(res.stderr.splitlines()) == 1


def test_formatting_matches_the_page():
    assert stats_cli.fmt_rate(0.3) == "30.0%" and stats_cli.fmt_rate(None) == "-"
    assert stats_cli.fmt_ci(*q.wilson_interval(30, 100)) == "21.9-39.6%"
    assert stats_cli.fmt_delta(0.25) == "+25.0 pp" and stats_cli.fmt_delta(-0.015) == "-1.5 pp"
    assert os.path.exists(os.path.join(os.path.dirname(stats_cli.__file__), "static", "ui.js"))


# -- replay traffic and Rich markup ----------------------------------------------------------------------------
def test_stats_leave_out_replay_traffic_and_say_so(run, chdb_store):
    r = seed_replayed(chdb_store)  # production 50/0, replay 40/40, replay-judge 10/10
    d = orjson.loads(run("stats", "--where", r.where, "--json").stdout)
    assert (d["total"]["calls"], d["total"]["errors"], d["sources_excluded"]) == (50, 0, ["replay", "replay-judge", "shadow"])
    d = orjson.loads(run("stats", "--where", r.where, "--where", "source=replay", "--json").stdout)
    assert (d["total"]["calls"], d["total"]["errors"], d["sources_excluded"]) == (40, 40, [])
    table = run("stats", "--where", r.where)
    assert table_rows(table.stdout)[0][:4] == [r.customer, "50", "0", "0.0%"]
    assert "source not replay, replay-judge" in table.stdout
    assert "source not" not in run("stats", "--where", r.where, "--where", "source=replay").stdout
    errs = run("errors", "--where", r.where)
    assert "no error calls match" in errs.stdout and "source not replay, replay-judge" in errs.stdout
    for cmd in ("stats", "errors"):
        help_text = " ".join(run(cmd, "--help", dsn=False).stdout.replace("│", " ").split())
        assert "source replay, replay-judge, shadow) are left out unless" in help_text, help_text


HOSTILE = ["[/]", "[/x]", "[red]red[/red]", "[bold", "a\\", ":warning:", "[link=http://x]y[/link]"]


def test_markup_in_recorded_values_is_printed_as_is(run, chdb_store):
    """Any tenant can plant these (a requested model name, a tag, a customer header): Rich must print them, not
    parse them (MarkupError) or restyle them."""
    run_id = "mk" + os.urandom(5).hex()
    rows = [call_row(run_id, f"{run_id}-{i}", 0, status="error", model_requested=v, error_type=v,
                     tags={"run": run_id, "note": v}, intent=v) for i, v in enumerate(HOSTILE)]
    insert_calls(chdb_store, rows)
    for by in ("model", "intent", "tag.note"):
        res = run("stats", "--by", by, "--where", f"tag.run={run_id}")
        assert res.exit_code == 0, res.output
        assert sorted(row[0] for row in table_rows(res.stdout)[:-1]) == sorted(HOSTILE)
    res = run("errors", "--where", f"tag.run={run_id}", "--limit", "20")
    assert res.exit_code == 0, res.output
    assert sorted(row[0] for row in table_rows(res.stdout)) == sorted(HOSTILE)
    shown = run("show", rows[2]["trace_id"])
    assert shown.exit_code == 0, shown.output
    assert "[red]red[/red]" in shown.stdout and "note=[red]red[/red]" in shown.stdout


@pytest.mark.parametrize("value", HOSTILE)
def test_markup_in_filter_values_is_printed_as_is(run, seeded, value):
    for cmd in ("stats", "errors"):
        res = run(cmd, "--where", seeded.where, "--where", f"model={value}")  # a column kept as sent
        assert res.exit_code == 0, res.output
        assert f"where tag.run={seeded.run}  model={value}  " in res.stdout, res.stdout


def test_print_functions_take_data_as_text():
    """print_stats / print_call straight to a recording console: no markup parsed, no emoji code replaced."""
    from rich.console import Console  # noqa: PLC0415

    sel = q.make_selection(["model=[/oops]", "key_id=:warning:"])  # columns kept as sent (not normalised)
    seg = q.SegmentStats(key={"model": "[red]gpt[/red]"}, calls=3, errors=1, cancelled=0)
    console = Console(record=True, width=250)
    stats_cli.print_stats(q.StatsReport(("model",), sel, False, 20, [seg], seg), console, "last 24h")
    text = console.export_text()
    assert "where model=[/oops]  key_id=:warning:  source not replay, replay-judge" in text
    assert "│[red]gpt[/red] │" in text
    console = Console(record=True, width=250)
    stats_cli.print_call({"trace_id": "t1", "status": "error", "error_type": "[/]", "customer": "[b]c",
                          "tags": {"k": "[/k]"}, "input_tokens": 1, "output_tokens": 2}, console)
    text = console.export_text()
    assert "error  ([/])" in text and "[b]c" in text and "k=[/k]" in text


# -- narrow terminals --------------------------------------------------------------------------------------------
@pytest.fixture()
def terminal_80(monkeypatch):
    """What rich sees in an 80-column terminal (without colour codes, for reading the text)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def _visible(text: str) -> list[str]:
    return [ln for ln in _plain(text).splitlines() if ln.strip()]


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # bold and dim stay on a terminal even with NO_COLOR


def test_stats_fits_80_columns_and_keeps_every_number_whole(run, seeded, terminal_80):
    res = run("stats", "--by", "customer", "--by", "intent", "--where", seeded.where, "--compare")
    assert res.exit_code == 0, res.output
    lines = _visible(res.stdout)
    assert max(len(ln) for ln in lines) <= 80, "\n".join(lines)
    assert "…" not in res.stdout
    rows = table_rows(_plain(res.stdout))
    top = rows[0]
    # the keys (a long one wraps onto a second line), calls, errors, rate and its change stay; nothing is cut
    assert seeded.acme.startswith(top[0]) and top[1] == "refund"
    assert top[2:5] == ["100", "30", "30.0%"] and "+25.0 pp" in top
    assert rows[-1][:5] == ["all", "", "1,004", "34", "3.4%"]
    (at,) = [i for i, ln in enumerate(lines) if ln.startswith("not shown at 80 columns: ")]
    hidden = " ".join(lines[at:at + 2])  # the notice wraps like any text
    assert "tok in" in hidden and "p99 ms" in hidden and "--wide shows every column" in hidden
    header = next(ln for ln in lines if "calls" in ln and "errors" in ln)
    for dropped in ("tok in", "tok out", "ttft p50"):
        assert dropped not in header


def test_stats_wide_shows_every_column(run, seeded, terminal_80):
    res = run("stats", "--by", "customer", "--by", "intent", "--where", seeded.where, "--compare", "--wide")
    assert res.exit_code == 0, res.output
    header = next(ln for ln in _visible(res.stdout) if "calls" in ln and "errors" in ln)
    assert max(len(ln) for ln in _visible(res.stdout)) > 80  # lines run on: that is what --wide asks for
    for col in ("95% CI", "prev rate", "delta", "p50 ms", "p95 ms", "p99 ms", "ttft p50", "tok in", "tok out", "cost",
                "note"):
        assert col in header, col
    assert "not shown at" not in res.stdout and "…" not in res.stdout


def test_errors_fit_80_columns_with_whole_trace_ids(run, seeded, terminal_80):
    res = run("errors", "--where", seeded.where)
    assert res.exit_code == 0, res.output
    lines = _visible(res.stdout)
    assert max(len(ln) for ln in lines) <= 80 and "…" not in res.stdout
    # a trace id is never cut or folded: it is what `tagway show` needs (seeded ids: <run>t000123, <run>err0000, or
    # uuid4 hex)
    ids = [tok for ln in lines if ln.startswith("│") for tok in ln.strip("│").split("│")[-1].split()]
    assert ids and all(re.fullmatch(rf"{seeded.run}(t\d{{6}}|err\d{{4}})|[0-9a-f]{{32}}", t) for t in ids), ids
    assert [c.strip() for c in lines[[i for i, ln in enumerate(lines) if "upstream_5xx" in ln][0]].split("│")[1:3]
            ] == ["upstream_5xx", "21"]


def test_stats_table_is_plain_ascii_on_a_non_utf8_terminal(seeded):
    from rich.console import Console  # noqa: PLC0415

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="strict")  # any non-ASCII character would raise here
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    sel = q.make_selection(["customer=acme"])
    seg = q.SegmentStats(key={"customer": "acme"}, calls=1234, errors=56, cancelled=0)
    stats_cli.print_stats(q.StatsReport(("customer",), sel, True, 20, [seg], seg), console, "last 24h")
    out.flush()
    text = raw.getvalue().decode("ascii")
    assert "1,234" in text and "4.5%" in text and "|" in text  # rich's ASCII box


def test_filter_values_are_read_as_the_gateway_records_them(run, seeded):
    """Names and tag values are recorded normalised (lower case): a filter typed in capitals finds them."""
    import json as _json  # noqa: PLC0415
    lower = run("stats", "--where", seeded.where, "--where", f"customer={seeded.acme}", "--json")
    upper = run("stats", "--where", seeded.where, "--where", f"customer={seeded.acme.upper()}", "--json")
    assert lower.exit_code == upper.exit_code == 0, upper.output
    calls = [_json.loads(r.stdout)["total"]["calls"] for r in (lower, upper)]
    assert calls[0] > 0 and calls[0] == calls[1]


# -- costs: small ones are never printed as $0, and an unknown one is said to be unknown ------------------------------
def test_fmt_cost_never_prints_a_cost_as_zero():
    f = stats_cli.fmt_cost
    assert [f(x) for x in (0.000027, 4.11e-05, 0.00012345, 0.001, 0.015, 0.42, 1e-10)] == [
        "$0.000027", "$0.000041", "$0.00012", "$0.0010", "$0.015", "$0.42", "$0.00000000010"]
    # a dollar up: to the cent, grouped; 0.996 rounds to a dollar and is printed as one
    assert [f(x) for x in (0.994, 0.996, 1, 12.345, 1234.5, 0)] == ["$0.99", "$1.00", "$1.00", "$12.35", "$1,234.50",
                                                                     "$0.00"]
    assert f(None) == "-" and f(float("nan")) == "-"
    # a spend against a budget: more digits
    assert (fmt_usd(0.0155, 4), fmt_usd(0.0000123456, 4), fmt_usd(3.1, 4)) == ("$0.01550", "$0.00001235", "$3.10")


def test_stats_table_shows_small_costs_and_json_keeps_them_exact(run, chdb_store):
    """Three calls at $0.000009 each: $0.000027, not the $0.0000 a model without a price also showed."""
    run_id = "co" + os.urandom(5).hex()
    priced, unpriced = f"{run_id}-priced", f"{run_id}-unpriced"
    rows = ([call_row(run_id, priced, i, cost_usd=0.000009) for i in range(3)]
            + [call_row(run_id, unpriced, i, cost_usd=0.0) for i in range(2)])
    insert_calls(chdb_store, rows)
    for extra in ((), ("--compare",)):
        res = run("stats", "--by", "customer", "--where", f"tag.run={run_id}", "--wide", *extra)
        assert res.exit_code == 0, res.output
        header = next(ln for ln in res.stdout.splitlines() if "calls" in ln and "errors" in ln)
        at = [c.strip() for c in header.strip().strip("┃").split("┃")].index("cost")
        cost = {r[0]: r[at] for r in table_rows(res.stdout)}
        assert cost == {priced: "$0.000027", unpriced: "$0.00", "all": "$0.000027"}, res.stdout
    d = orjson.loads(run("stats", "--by", "customer", "--where", f"tag.run={run_id}", "--json").stdout)
    by = {s["key"]["customer"]: s["cost_usd"] for s in d["segments"]}
    assert by[priced] == pytest.approx(0.000027, rel=1e-12) and by[unpriced] == 0 and isinstance(by[unpriced], float)
    csv_rows = list(csv.DictReader(io.StringIO(run("stats", "--by", "customer", "--where", f"tag.run={run_id}",
                                                   "--csv").stdout)))
    assert {r["customer"]: float(r["cost_usd"]) for r in csv_rows} == pytest.approx({priced: 0.000027, unpriced: 0.0})


def _span_call(store, trace: str, customer: str, *, cost: str | None, tokens: bool = True, error: bool = False) -> None:
    """One call as the gateway records it: a span in otel_traces, which reaches llm_calls through the view. The
    gateway sets tagway.cost_usd only when the model has a price and the call reported usage."""
    attrs = {"tagway.kind": "call", "tagway.customer": customer, "tagway.intent": "chat",
             "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "my-model",
             "tagway.model.requested": "my-model", "tagway.source": "production",
             "http.response.status_code": "502" if error else "200"}
    if tokens:
        attrs.update({"gen_ai.usage.input_tokens": "120", "gen_ai.usage.output_tokens": "30"})
    if cost is not None:
        attrs["tagway.cost_usd"] = cost
    if error:
        attrs["error.type"] = "upstream_5xx"
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    span = {"Timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "TraceId": trace, "SpanId": os.urandom(8).hex(),
            "SpanName": "chat my-model", "SpanKind": "Client", "ServiceName": "tagway", "ScopeName": "tagway.gateway",
            "SpanAttributes": attrs, "Duration": 100_000_000, "StatusCode": "Error" if error else "Ok",
            "StatusMessage": "upstream 502" if error else ""}
    store.insert_json_rows("otel_traces", orjson.dumps(span), settings={"date_time_input_format": "best_effort"})


def _cost_line(text: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("cost ")]
    return " ".join(line.split())


def test_show_says_a_cost_is_unknown_when_the_gateway_recorded_none(run, chdb_store):
    customer = "cu" + os.urandom(5).hex()
    unpriced, cheap, free, failed = (os.urandom(16).hex() for _ in range(4))
    _span_call(chdb_store, unpriced, customer, cost=None)  # a model with no price: no tagway.cost_usd
    _span_call(chdb_store, cheap, customer, cost="0.0000123")
    _span_call(chdb_store, free, customer, cost="0")  # priced at 0 (a free model): a known $0
    _span_call(chdb_store, failed, customer, cost=None, tokens=False, error=True)  # no usage, so no cost

    expected = {unpriced: ("cost unknown (no price for this model)", False, 0.0),
                cheap: ("cost $0.000012", True, 0.0000123),
                free: ("cost $0.00", True, 0.0),
                failed: ("cost unknown (no token usage recorded)", False, 0.0)}
    for trace, (line, known, usd) in expected.items():
        shown = run("show", trace)
        assert shown.exit_code == 0, shown.output
        assert _cost_line(shown.stdout) == line
        call = orjson.loads(run("show", trace, "--json").stdout)
        # cost_usd keeps its type and value (0 as llm_calls stores it); cost_known says whether it is a cost
        assert call["cost_known"] is known and isinstance(call["cost_usd"], float)
        assert call["cost_usd"] == pytest.approx(usd)
    # the case view prints the production call the same way
    cases = run("show", unpriced, "--cases")
    assert cases.exit_code == 0, cases.output
    assert _cost_line(cases.stdout) == "cost unknown (no price for this model)"
    assert orjson.loads(run("show", unpriced, "--cases", "--json").stdout)["call"]["cost_known"] is False
    # what stats make of them: the known costs summed, the unknown ones counted as 0
    d = orjson.loads(run("stats", "--where", f"customer={customer}", "--json").stdout)
    assert d["total"]["calls"] == 4 and d["total"]["cost_usd"] == pytest.approx(0.0000123)


def test_show_of_a_row_without_its_span_trusts_a_non_zero_cost(run, chdb_store):
    """A row written straight into llm_calls (no span to tell): a cost that is not zero is known, a zero is not."""
    run_id = "ns" + os.urandom(5).hex()
    rows = [call_row(run_id, f"{run_id}-c", 0, cost_usd=0.0000042), call_row(run_id, f"{run_id}-c", 1, cost_usd=0.0)]
    insert_calls(chdb_store, rows)
    assert _cost_line(run("show", rows[0]["trace_id"]).stdout) == "cost $0.0000042"
    assert orjson.loads(run("show", rows[0]["trace_id"], "--json").stdout)["cost_known"] is True
    assert _cost_line(run("show", rows[1]["trace_id"]).stdout) == "cost unknown (no price for this model)"
    assert orjson.loads(run("show", rows[1]["trace_id"], "--json").stdout)["cost_known"] is False


def test_compare_says_which_segments_went_silent(run, chdb_store):
    import uuid  # noqa: PLC0415

    tag = "gone" + uuid.uuid4().hex[:8]
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=30)
    insert_calls(chdb_store, [call_row(tag, f"{tag}-a", i) for i in range(3)]
                 + [call_row(tag, f"{tag}-b", i, when=before, status="error" if i else "ok") for i in range(2)])
    res = run("stats", "--where", f"tag.run={tag}", "--since", "24h", "--compare")
    assert res.exit_code == 0, res.output
    said = " ".join(res.stdout.split())  # the console may wrap the line
    assert (f"no calls in this window, 1 segment(s) with calls in the previous one: {tag}-b (2 calls, 1 errors)"
            in said), res.stdout
