"""`tagway db backfill-rollups` on a store that had calls before the rollups existed: before and during the backfill
the stats read raw for the range the rollups do not cover (never a wrong fast answer); an interrupted backfill
resumes without counting a day twice; afterwards the rollups answer, equal to raw. Each step is a process of its
own (chDB: one data directory per process). The stores are seeded once for the module (the rollups go live 5 s after
their migration: both stores wait those seconds together) and each test works on a copy of its own."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": ROOT}


def script(path: str, phase: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.rollup_backfill_script", path, phase], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli(config: str, *args: str, command: str = "backfill-rollups") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "db", command, "--config", config, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)


def t(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s)


def assert_equal_everywhere(out: dict) -> None:
    a = out["answers"]
    assert a["series_equal"]
    for name in ("tenants", "intents", "zone", "pro", "tenants_ahead"):
        assert a[name]["equal"] and a[name]["calls"] > 0, (name, a[name])


def rollup_pieces_from(read: dict) -> dt.datetime | None:
    starts = [t(p["from"].replace("Z", "+00:00")) for p in read["pieces"] if p["table"] != "llm_calls"]
    return min(starts) if starts else None


def config_for(path: str, tmp_path) -> str:
    config = tmp_path / "tagway.yaml"
    config.write_text(f"storage:\n  dsn: chdb://{path}\n  rollup_tag_keys: [zone]\n")
    return str(config)


def sleep_past(when: dt.datetime) -> None:
    time.sleep(max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    """Two stores, made once: "backfill" (calls from before the rollups migration, then after live_from: the
    'seed' and 'live' phases) and "customer" (rollups with calls, then the per-customer family: 'seed10'), each
    with what its steps printed. Tests copy them (`copy_of`)."""
    base = tmp_path_factory.mktemp("seeded")
    out: dict = {"dir": base}
    path = str(base / "backfill")
    out["seed"] = script(path, "seed")  # 60 h of calls stored before the rollups migration
    live_from = t(out["seed"]["live_from"])
    out["seed_now"] = dt.datetime.now(dt.timezone.utc)
    out["early"] = cli(config_for(path, base), "--settle", "3600")  # before live_from
    out["seed10"] = script(str(base / "customer"), "seed10")
    out["seed10_now"] = dt.datetime.now(dt.timezone.utc)
    sleep_past(max(live_from, t(out["seed10"]["customer_from"])))
    out["live"] = script(path, "live")  # new calls through the views, late old calls that only the backfill can see
    return out


def copy_of(stores: dict, name: str, tmp_path) -> str:
    path = str(tmp_path / "clickhouse")
    shutil.copytree(stores["dir"] / name, path, symlinks=True)  # chDB's links are relative: kept in the copy
    return path


def test_backfill_is_resumable_and_answers_stay_right(stores, tmp_path):
    path = copy_of(stores, "backfill", tmp_path)
    config = config_for(path, tmp_path)

    seed_now, seeded, early, live = stores["seed_now"], stores["seed"], stores["early"], stores["live"]
    live_from = t(seeded["live_from"])
    assert seeded["covered_from"] == seeded["live_from"] and live_from > seed_now
    assert_equal_everywhere(seeded)
    for name in ("tenants", "intents", "zone", "pro"):
        assert seeded["answers"][name]["read"]["source"] == "raw"  # nothing rolled up yet: raw, and right

    assert early.returncode == 2 and "Traceback" not in early.stderr
    assert early.stderr.startswith("error: the rollups went live at") and len(early.stderr.splitlines()) == 1

    assert_equal_everywhere(live)

    stopped = script(path, "interrupt")
    assert t(stopped["pending_from"]) < t(stopped["covered_from"]) <= live_from  # a day cut short, one done
    assert_equal_everywhere(stopped)
    for name in ("tenants", "zone"):  # the rollups are read only where they are complete
        first = rollup_pieces_from(stopped["answers"][name]["read"])
        assert first is None or first >= t(stopped["covered_from"])

    done = cli(str(config), "--settle", "0", "--json", "--progress")
    assert done.returncode == 0, done.stderr
    cover = json.loads(done.stdout)
    assert "backfill" in done.stderr and "100.0%" in done.stderr  # the progress bar
    assert cover["tag_keys"]["zone"] == cover["covered_from"] and t(cover["covered_from"]) < live_from
    after = script(path, "check")
    assert_equal_everywhere(after)
    assert after["answers"]["tenants"]["read"]["source"] == "rollup"
    assert rollup_pieces_from(after["answers"]["tenants"]["read"]) < live_from - dt.timedelta(hours=24)
    assert rollup_pieces_from(after["answers"]["zone"]["read"]) < live_from - dt.timedelta(hours=24)

    again = cli(str(config), "--settle", "0", "--redo")
    assert again.returncode == 0 and again.stdout.startswith("rollups cover calls from")
    assert_equal_everywhere(script(path, "check"))

    listed = cli(str(config), command="rollup-tags")
    assert listed.returncode == 0 and listed.stdout == f"zone\tcovered from {cover['covered_from']}\n"
    wrong = cli(str(config), "--remove", "nope", command="rollup-tags")
    assert (wrong.returncode, wrong.stderr) == (2, "error: not a rolled-up tag key: nope\n")
    removed = cli(str(config), "--remove", "zone", command="rollup-tags")
    assert removed.returncode == 0 and removed.stdout == "no tag keys are rolled up\n"
    gone = script(path, "check")
    assert_equal_everywhere(gone)
    assert gone["answers"]["zone"]["read"] == {**gone["answers"]["zone"]["read"], "source": "raw",
                                               "reason": "tag key 'zone' is not rolled up"}


def test_the_per_customer_rollup_added_to_a_store_that_had_rollups(stores, tmp_path):
    """Migration 11 on a store whose main rollups already hold calls: the per-customer family is complete from
    5 s after the upgrade; before that the main family answers for it (nothing copied, no bucket filled twice);
    answers equal raw, late calls included."""
    path = copy_of(stores, "customer", tmp_path)
    seed_now, seeded = stores["seed10_now"], stores["seed10"]
    start = t(seeded["customer_from"])
    assert start > seed_now
    assert_equal_everywhere(seeded)
    after = script(path, "after10")  # past start: the module's stores waited for it
    assert after["customer_from"] == seeded["customer_from"]
    assert_equal_everywhere(after)
    pieces = after["answers"]["tenants_ahead"]["read"]["pieces"]
    span = lambda p: (t(p["from"].replace("Z", "+00:00")), t(p["to"].replace("Z", "+00:00")))  # noqa: E731
    family = [span(p) for p in pieces if p["table"].startswith("llm_calls_customer_")]
    main = [span(p) for p in pieces if p["table"] in ("llm_calls_1h", "llm_calls_1d")]
    assert family and min(a for a, _ in family) >= start  # the family from its start on (whole hours)
    assert main and max(b for _, b in main) <= start  # the main family before it


def test_a_backfill_stopped_inside_live_froms_day_is_resumed_without_a_wrong_answer(stores, tmp_path):
    """The first day the backfill rolls up is live_from's: its minute, hour and day that straddle live_from also
    hold the views' calls, so what the stopped run wrote there cannot be deleted. The resumed run marks them and
    queries read around live_from from then on; answers equal raw (a window holding that whole hour included)."""
    path = copy_of(stores, "backfill", tmp_path)  # seeded, then calls after live_from (the 'live' phase)
    config = config_for(path, tmp_path)
    live_from = t(stores["seed"]["live_from"])
    stopped = script(path, "interrupt_first")
    day = live_from.replace(hour=0, minute=0, second=0, microsecond=0)
    assert (t(stopped["pending_from"]), t(stopped["covered_from"])) == (day, live_from) and not stopped["split"]
    assert_equal_everywhere(stopped)

    done = cli(str(config), "--settle", "0")
    assert done.returncode == 0, done.stderr
    after = script(path, "check")
    assert after["split"] and t(after["covered_from"]) < day
    assert_equal_everywhere(after)
    for name in ("tenants", "tenants_ahead", "intents", "zone"):
        pieces = after["answers"][name]["read"]["pieces"]
        assert not any(t(p["from"].replace("Z", "+00:00")) < live_from < t(p["to"].replace("Z", "+00:00"))
                       for p in pieces if p["table"] != "llm_calls"), (name, pieces)
    assert after["answers"]["tenants"]["read"]["source"] == "rollup"
