"""`tagway stats|errors|show` in-process (typer's CliRunner) against the shared chDB store: a subprocess could not
open the data directory this test process holds, so the commands get the already-open DSN (connect() shares it)."""
from __future__ import annotations

import csv
import io
import os

import orjson
import pytest
import typer
from typer.testing import CliRunner

from exporters import queries as q
from gateway import stats_cli
from tests.test_stats_queries import Seeded, seed_calls


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


def test_errors_and_show(run, seeded):
    res = run("errors", "--where", seeded.where, "--since", "24h", "--json")
    assert res.exit_code == 0, res.output
    d = orjson.loads(res.stdout)
    assert [(e["error_type"], e["count"]) for e in d["errors"]] == [("upstream_5xx", 21), ("timeout", 10),
                                                                    ("rate_limited", 3)]
    table = run("errors", "--where", seeded.where, "--limit", "2")
    assert table.exit_code == 0
    assert "upstream_5xx" in table.stdout and "timeout" in table.stdout and "rate_limited" not in table.stdout
    example = d["errors"][0]["example_trace_ids"][0]
    assert example in table.stdout or any(t in table.stdout for t in d["errors"][0]["example_trace_ids"])

    shown = run("show", seeded.error_trace)
    assert shown.exit_code == 0, shown.output
    for text in (seeded.acme, "refund", "upstream_5xx", "502", f"region=eu", "run=" + seeded.run, "10 in / 5 out",
                 "$0.001000", "request", '"hi"'):
        assert text in shown.stdout, text
    as_json = run("show", seeded.span_trace_ok, "--json")
    call = orjson.loads(as_json.stdout)
    assert call["customer"] == seeded.spans and call["tags"]["region"] == "eu"


@pytest.mark.parametrize("args,needle", [
    (["stats", "--by", "nope"], "unknown group-by column 'nope'"),
    (["stats", "--since", "3x"], "invalid window '3x'"),
    (["stats", "--since", "1h; DROP TABLE llm_calls"], "invalid window"),
    (["stats", "--by", "tag.a'b"], "invalid tag key \"a'b\""),
    (["stats", "--by", "tag.x; DROP TABLE llm_calls"], "invalid tag key"),
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
    try:
        res = CliRunner().invoke(_app(), ["stats", "--dsn", f"chdb://{data}"])
    finally:
        os.close(fd)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "HTTP API" in err and "server DSN" in err and "Traceback" not in err


def test_missing_store_dir(tmp_path):
    res = CliRunner().invoke(_app(), ["stats", "--dsn", f"chdb://{tmp_path / 'nothing-here'}"])
    assert res.exit_code == 2 and "no tagway store at" in res.stderr
    assert not (tmp_path / "nothing-here").exists()


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
