"""The vocabulary of llm_calls (exporters/vocabulary.py) at every entry point: a duration, column, tag key or filter
that one of `tagway stats` (CLI), GET /admin/stats (HTTP API) and a replay spec rejects, all three reject with the
same message; what one accepts (1.5h, a provider segment, a where filter), all accept."""
from __future__ import annotations

import datetime as dt

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
import typer
from typer.testing import CliRunner

from exporters import vocabulary as v
from gateway import stats_cli
from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.stats_api import build_stats_router
from replay.slice import build_pool_query
from replay.spec import SpecError, parse_spec

ADMIN = "tw-admin-vocabulary-test"
SPEC = {"candidates": [{"name": "c", "model": "m"}], "evaluators": [{"type": "contains", "value": "x"}]}
LONG = "x" * 65

# (what, the input) -> the message. `what` says where the input goes at each entry point (see `entries`).
BAD = [
    ("since", "3x", "invalid window '3x': use a number and a unit (s, m, h, d, w), e.g. 90s, 15m, 1.5h, 7d"),
    ("since", "7 days", "invalid window '7 days': use a number and a unit (s, m, h, d, w), e.g. 90s, 15m, 1.5h, 7d"),
    ("since", "1h; DROP TABLE llm_calls", "invalid window '1h; DROP TABLE llm_calls': use a number and a unit "
                                          "(s, m, h, d, w), e.g. 90s, 15m, 1.5h, 7d"),
    ("since", "-5m", "invalid window '-5m': use a number and a unit (s, m, h, d, w), e.g. 90s, 15m, 1.5h, 7d"),
    ("since", "0s", "invalid window '0s': it must be longer than zero"),
    ("since", "0.0h", "invalid window '0.0h': it must be longer than zero"),
    ("since", "401d", "window '401d' is too long (at most 400d)"),
    ("since", "57.2w", "window '57.2w' is too long (at most 400d)"),
    ("by", "colour", "unknown group-by column 'colour': use one of customer, intent, prompt_version, model, "
                     "model_served, provider, operation, status, error_type, source, key_id, stream, session_id, "
                     "applied_tag or tag.<key>"),
    # the key the gateway would have recorded is named (keys are still matched exactly)
    ("by", "tag.Region", "invalid tag key 'Region': tag keys match [a-z0-9_.-]{1,64} (the gateway records 'Region' "
                         "as 'region')"),
    ("by", "tag.a'b", "invalid tag key \"a'b\": tag keys match [a-z0-9_.-]{1,64} (the gateway records \"a'b\" as "
                      "'a_b')"),
    ("by", f"tag.{LONG}", f"invalid tag key '{LONG}': tag keys match [a-z0-9_.-]{{1,64}}"),
    ("where", "intent", "invalid filter 'intent': use key=value (or key!=value)"),
    ("where", "bogus=1", "unknown filter column 'bogus': use one of customer, intent, prompt_version, model, "
                         "model_served, provider, operation, status, error_type, source, key_id, stream, "
                         "session_id, applied_tag or tag.<key>"),
    ("where", "tag.x'=1", "invalid tag key \"x'\": tag keys match [a-z0-9_.-]{1,64} (the gateway records \"x'\" as "
                          "'x')"),
    ("where", "status=failed", "invalid filter 'status=failed': status is one of ok, error, cancelled"),
    ("where", "stream=maybe", "invalid filter 'stream=maybe': stream is true or false"),
    ("where", "intent=" + "v" * 1025, "filter value for intent is too long (at most 1024 characters)"),
    ("where", "applied_tag=Negative Sentiment", "invalid filter 'applied_tag=Negative Sentiment': invalid tag name "
                                                "'Negative Sentiment': tag names are 1-64 of [a-z0-9_.:-], starting "
                                                "with a letter or digit"),
]


@pytest.fixture(scope="module")
def cli_run(chdb_dsn):
    app = typer.Typer()
    stats_cli.register(app)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["stats", *args, "--dsn", chdb_dsn], catch_exceptions=False)
    return run


@pytest.fixture(scope="module")
def api(chdb_store):
    mp = pytest.MonkeyPatch()
    mp.setenv("TAGWAY_VOCABULARY_TEST_ADMIN", ADMIN)
    keyring = KeyRing(GatewayConfig(admin_key_env="TAGWAY_VOCABULARY_TEST_ADMIN"))
    mp.undo()
    app = FastAPI()
    app.include_router(build_stats_router(keyring, lambda: chdb_store))
    with TestClient(app) as c:
        yield lambda **params: c.get("/admin/stats", params=params, headers={"Authorization": f"Bearer {ADMIN}"})


def spec_slice(what: str, value: str) -> dict:
    """The slice of a replay spec carrying the input: since, segment_by or where."""
    return {"since": value} if what == "since" else {"segment_by": [value]} if what == "by" else {"where": [value]}


SPEC_FIELD = {"since": "slice.since", "by": "slice.segment_by", "where": "slice.where"}


@pytest.mark.parametrize("what,value,message", BAD, ids=[f"{w}={x[:20]}" for w, x, _ in BAD])
def test_every_entry_point_rejects_with_the_same_message(cli_run, api, chdb_store, what, value, message):
    res = cli_run(f"--{what}", value)
    assert (res.exit_code, res.stderr.strip()) == (2, f"error: {message}"), res.output

    r = api(**{what: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": message, "type": "invalid_request_error", "param": what,
                                 "code": "invalid_query"}

    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "slice": spec_slice(what, value)})
    assert str(e.value) == f"spec: {SPEC_FIELD[what]}: {message}"


def test_a_slice_tags_mapping_checks_tag_keys_the_same_way():
    with pytest.raises(SpecError) as e:
        parse_spec({**SPEC, "slice": {"tags": {"Region": "eu"}}})
    assert str(e.value) == "spec: slice.tags: invalid tag key 'Region': tag keys match [a-z0-9_.-]{1,64} (the " \
                           "gateway records 'Region' as 'region')"


GOOD = [("since", "90s"), ("since", "15m"), ("since", "1.5h"), ("since", "7d"), ("since", "2w"),
        ("since", " 400d "), ("by", "provider"), ("by", "stream"), ("by", "tag.region"),
        ("where", "provider!=mock"), ("where", "stream=true"), ("where", "tag.region=eu"),
        ("where", "applied_tag=negative-sentiment"), ("where", "applied_tag!=low-confidence")]


@pytest.mark.parametrize("what,value", GOOD)
def test_every_entry_point_accepts_the_same_input(cli_run, api, chdb_store, what, value):
    res = cli_run(f"--{what}", value, "--json")
    assert res.exit_code == 0, res.output
    assert api(**{what: value}).status_code == 200
    spec = parse_spec({**SPEC, "slice": {**spec_slice(what, value), "status": "any"}})
    sql, params = build_pool_query(spec.slice)
    chdb_store.query(sql, params)  # the slice's SQL runs on the real engine


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("1.5h", 5400), ("7d", 7 * 86400),
                                          ("2w", 14 * 86400), ("0.5s", 0.5), ("400d", 400 * 86400)])
def test_duration_grammar(text, seconds):
    assert v.parse_duration(text) == dt.timedelta(seconds=seconds)

