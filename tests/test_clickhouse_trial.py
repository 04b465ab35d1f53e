"""Against a ClickHouse server (tests/fake_clickhouse.ChdbClickHouse: the real engine behind ClickHouse's HTTP
interface, with users and grants), what an SRE trial found:

* a user without DDL rights records into a migrated schema (no DDL at all), and with migrations pending the gateway
  spools, says why on /readyz and in its log, and records by itself once a privileged user migrated; `db status`
  works for that user and `config check` warns;
* a refused password or a missing grant keeps spans in the spool (transient), never sets them aside as poison;
* a DSN's database that does not exist yet is created by `tagway db migrate` and by the gateway, or refused in one
  line naming the grant;
* a server older than tagway's schema needs is refused in one line.
"""
from __future__ import annotations

import logging
import os
import time

import httpx
import openai
import pytest
from click.testing import CliRunner

from exporters.insert_errors import NotSentError, may_be_poison
from exporters.recording import RecordingLimits, start_recording
from exporters.schema import MIGRATIONS, SchemaSettings, connect_creating_database, migrate
from exporters.store import StoreError, connect
from gateway import cli as gateway_cli
from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from tests.fake_clickhouse import ChdbClickHouse
from tests.gateway_fixture import KEYS, UPSTREAM_KEY, GatewayServer, gateway_config

LATEST = MIGRATIONS[-1][0]
USERS = {"tagway": "tagway-pw", "admin": "admin-pw", "writer": "writer-pw"}  # writer: the gateway's user, with DDL
PENDING_ONE = "1 migration pending; this user may not run DDL: run `tagway db migrate` with a privileged user / the " \
              "chart's migrations Job"


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    with ChdbClickHouse(tmp_path_factory.mktemp("chserver"), users=USERS) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_grants(ch):
    """Each test starts from the server's own users and grants, whatever the previous one changed."""
    ch.set(users=USERS, ddl=["admin", "writer"], insert=None, version=None, old=False)


@pytest.fixture()
def run(monkeypatch, tmp_path):
    for k in [k for k in os.environ if k.startswith("TAGWAY_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    app = gateway_cli.command()

    def invoke(*args: str, env: dict | None = None):
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    return invoke


def migrated(ch: ChdbClickHouse, database: str, upto: int | None = None) -> None:
    """The schema as a privileged user (a migrations Job) leaves it."""
    store = connect_creating_database(ch.dsn("admin", database), SchemaSettings())
    try:
        migrate(store, SchemaSettings(), upto=upto)
    finally:
        store.close()


def stored(ch: ChdbClickHouse, database: str, service: str) -> int:
    with connect(ch.dsn("admin", database)) as store:
        rows, _ = store.query_rows("SELECT count() FROM otel_traces WHERE ServiceName = {s:String}", {"s": service})
    return int(rows[0][0])


def emit(recorder, n: int) -> None:
    for i in range(n):
        recorder.tracer.start_span(f"span {i}").end()


def wait_for(predicate, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def recorder_for(dsn: str, tmp_path, service: str, **kw):
    return start_recording(dsn=dsn, spool_dir=str(tmp_path / "spool"), service_name=service, batch_max_seconds=0.1,
                           retry_min_seconds=0.05, retry_max_seconds=0.2, **kw)


# -- 1. a user without DDL rights ---------------------------------------------------------------------------------
def test_a_user_without_ddl_records_into_a_migrated_schema_and_runs_no_ddl(ch, tmp_path, run):
    migrated(ch, "t_noddl")
    before = ch.stats().get("tagway:ddl_refused", 0)
    recorder = recorder_for(ch.dsn("tagway", "t_noddl"), tmp_path, "noddl")
    try:
        emit(recorder, 5)
        assert recorder.force_flush(10_000)
        assert stored(ch, "t_noddl", "noddl") == 5
        assert not recorder.processor.degraded, recorder.processor.last_error
    finally:
        recorder.shutdown()
    assert ch.stats().get("tagway:ddl_refused", 0) == before  # it did not even try one
    assert "tagway:ddl" not in ch.stats()

    res = run("db", "status", "--dsn", ch.dsn("tagway", "t_noddl"))  # read-only: it was ACCESS_DENIED, exit 2
    assert res.exit_code == 0, res.output
    assert f"schema: up to date ({len(MIGRATIONS)} migrations)" in res.stdout
    assert "calls: 0 (0 production); spans: 5" in res.stdout
    res = run("db", "migrate", "--dsn", ch.dsn("tagway", "t_noddl"))  # nothing to do: no DDL, no error
    assert res.exit_code == 0 and res.stdout.strip() == "schema is up to date", res.output


def test_pending_migrations_without_ddl_spool_say_why_and_record_once_migrated(ch, tmp_path, run, upstream, caplog):
    migrated(ch, "t_pending", upto=LATEST - 1)
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    with caplog.at_level(logging.WARNING, logger="exporters"):
        recorder = recorder_for(ch.dsn("tagway", "t_pending"), tmp_path, "pending")
        server = GatewayServer(TagwayApp(GatewayConfig(**gateway_config(upstream.base_url)), recorder=recorder))
        server.start()
        try:
            wait_for(lambda: httpx.get(server.url + "/readyz").json().get("recording") == "degraded", what="degraded")
            ready = httpx.get(server.url + "/readyz")
            assert ready.status_code == 200 and ready.json()["reason"].startswith(PENDING_ONE), ready.text
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["acme"], max_retries=0)
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            emit(recorder, 3)
            assert recorder.force_flush(10_000)
            assert recorder.metrics.get("spans_spooled") >= 4 and stored(ch, "t_pending", "pending") == 0

            res = run("db", "migrate", "--dsn", ch.dsn("admin", "t_pending"))  # the chart's Job, say
            assert res.exit_code == 0 and res.stdout.strip() == f"applied migrations: {LATEST}", res.output
            wait_for(lambda: stored(ch, "t_pending", "pending") >= 4, what="the spooled spans to be stored")
            wait_for(lambda: httpx.get(server.url + "/readyz").json().get("recording") == "ok", what="readyz ok")
        finally:
            server.stop()
            recorder.shutdown()
    assert PENDING_ONE in caplog.text
    assert recorder.metrics.get("spans_dropped") == 0 and recorder.metrics.get("spans_quarantined") == 0
    assert not [n for n in os.listdir(tmp_path / "spool") if n.endswith(".poison")]


def test_without_traffic_readyz_clears_once_the_schema_is_migrated(ch, tmp_path):
    """Nothing in the spool to retry with: the processor asks again by itself, on its backoff's schedule."""
    migrated(ch, "t_idle", upto=LATEST - 1)
    recorder = recorder_for(ch.dsn("tagway", "t_idle"), tmp_path, "idle")
    try:
        wait_for(lambda: recorder.processor.degraded, what="degraded")
        assert recorder.processor.last_error.startswith(PENDING_ONE)
        migrated(ch, "t_idle")
        wait_for(lambda: not recorder.processor.degraded, what="recovered without a span to send")
    finally:
        recorder.shutdown()


def test_config_check_warns_when_the_schema_is_behind_and_the_user_cannot_migrate(ch, tmp_path, run):
    migrated(ch, "t_check", upto=LATEST - 1)
    env = {"TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789", "TAGWAY_STORAGE__DSN": ch.dsn("tagway", "t_check")}
    res = run("config", "check", env=env)
    assert f"warning: storage.dsn: ClickHouse at {ch.dsn('tagway', 't_check', password='***')}: {PENDING_ONE}; " \
        "the gateway would start and spool every call to disk until the store takes them" in res.stderr, res.output
    res = run("db", "status", "--dsn", ch.dsn("tagway", "t_check"))
    assert res.exit_code == 0 and f"missing {LATEST}: run `tagway db migrate`" in res.stdout, res.output
    res = run("config", "check", env={**env, "TAGWAY_STORAGE__DSN": ch.dsn("admin", "t_check")})
    assert "storage.dsn" not in res.stderr, res.output  # the gateway's own migrate will do it
    migrated(ch, "t_check")
    res = run("config", "check", env=env)
    assert "storage.dsn" not in res.stderr, res.output
    # asking whether a user may run DDL created nothing: a fresh database stays empty
    migrated(ch, "t_check_fresh", upto=0)
    res = run("config", "check", env={**env, "TAGWAY_STORAGE__DSN": ch.dsn("admin", "t_check_fresh")})
    assert "storage.dsn" not in res.stderr, res.output
    with connect(ch.dsn("admin", "t_check_fresh")) as store:
        assert store.query_rows("SELECT count() FROM system.tables WHERE database = 't_check_fresh'")[0][0][0] == 0


# -- 2. refused credentials or grants are an outage, not poison --------------------------------------------------
@pytest.mark.parametrize("code", [516, 192, 194, 201, 497, 164, 241, 242, 203, 159, 291, 720, 745])
def test_credential_and_server_state_errors_are_never_poison(code):
    assert not may_be_poison(StoreError(f"Code: {code}. DB::Exception: x"))
    assert may_be_poison(StoreError("Code: 27. DB::Exception: Cannot parse input"))  # the rows' own fault
    assert not may_be_poison(NotSentError("Code: 62. DB::Exception: Syntax error (a migration)"))  # never sent


@pytest.mark.parametrize("refusal", ["password rotated", "insert grant revoked"])
def test_a_refused_batch_waits_in_the_spool_and_is_stored_whole(ch, tmp_path, refusal):
    """Code 516 (AUTHENTICATION_FAILED) or 497 (ACCESS_DENIED) for many more replays than poison_attempts: nothing
    is set aside, and once the password or grant is back every span is stored."""
    migrated(ch, "t_refused")
    service = f"refused-{refusal[:8]}"
    recorder = recorder_for(ch.dsn("writer", "t_refused"), tmp_path, service,
                            limits=RecordingLimits(poison_attempts=2))
    try:
        emit(recorder, 4)
        assert recorder.force_flush(10_000) and stored(ch, "t_refused", service) == 4
        if refusal == "password rotated":
            ch.set(users={**USERS, "writer": "rotated-pw"})
            counter = "writer:auth_refused"
        else:
            ch.set(insert=["admin", "tagway"])
            counter = "writer:insert_refused"
        before = ch.stats().get(counter, 0)
        emit(recorder, 40)
        assert recorder.force_flush(10_000)
        wait_for(lambda: ch.stats().get(counter, 0) >= before + 8, what="replays refused")  # poison_attempts x 4
        assert recorder.metrics.get("spans_quarantined") == 0
        assert not [p for p in (tmp_path / "spool").rglob("*") if ".poison" in p.name]
        assert "Code: " in recorder.processor.last_error and recorder.processor.degraded
        ch.set(users=USERS, insert=None)
        wait_for(lambda: stored(ch, "t_refused", service) == 44, what="every span stored")
        wait_for(lambda: not recorder.processor.degraded, what="recovered")
    finally:
        recorder.shutdown()
    assert recorder.metrics.get("spans_dropped") == 0 and recorder.metrics.get("spans_quarantined") == 0


# -- 3. the DSN's database does not exist yet ----------------------------------------------------------------------
def test_db_migrate_creates_the_dsn_database(ch, run):
    res = run("db", "migrate", "--dsn", ch.dsn("admin", "newdb"))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "applied migrations: " + ", ".join(str(v) for v, _, _ in MIGRATIONS)
    with connect(ch.dsn("admin", "newdb")) as store:
        assert store.query_rows("SELECT count() FROM system.tables WHERE database = 'newdb' AND name = 'llm_calls'"
                                )[0][0][0] == 1


def test_the_gateway_creates_the_dsn_database_and_records(ch, tmp_path):
    recorder = recorder_for(ch.dsn("admin", "gwdb"), tmp_path, "gwdb")
    try:
        emit(recorder, 3)
        assert recorder.force_flush(10_000)
        wait_for(lambda: not recorder.processor.degraded, what="connected")
    finally:
        recorder.shutdown()
    assert stored(ch, "gwdb", "gwdb") == 3


def test_a_user_who_may_not_create_the_database_is_told_in_one_line(ch, run):
    line = ("database `nodb` does not exist and ClickHouse user tagway may not create it: create it with a privileged "
            "user, or GRANT CREATE DATABASE ON `nodb`.* TO tagway")
    res = run("db", "migrate", "--dsn", ch.dsn("tagway", "nodb"))
    assert res.exit_code == 2 and res.stderr.splitlines() == [f"error: {line}"], res.output
    env = {"TAGWAY_ADMIN_KEY": "tw-admin-test-key-0123456789", "TAGWAY_STORAGE__DSN": ch.dsn("tagway", "nodb")}
    res = run("config", "check", env=env)
    assert line in res.stderr, res.output
    res = run("config", "check", env={**env, "TAGWAY_STORAGE__DSN": ch.dsn("admin", "nodb")})
    assert "storage.dsn" not in res.stderr, res.output  # the gateway would create it; asking created nothing
    with connect(ch.dsn("admin", None)) as store:
        assert store.query_rows("SELECT count() FROM system.databases WHERE name = 'nodb'")[0][0][0] == 0


def test_the_dsn_without_a_database_and_storage_database_still_works(ch, run):
    res = run("db", "migrate", env={"TAGWAY_STORAGE__DSN": ch.dsn("admin", None),
                                    "TAGWAY_STORAGE__DATABASE": "viaenv"})
    assert res.exit_code == 0 and res.stdout.startswith("applied migrations: 1, "), res.output
    with connect(ch.dsn("admin", None)) as store:
        assert store.query_rows("SELECT count() FROM system.tables WHERE database = 'viaenv'")[0][0][0] > 10
    ch.set(ddl=[])  # a user without DDL on that migrated store: nothing to do, no DDL (CREATE DATABASE included)
    res = run("db", "migrate", env={"TAGWAY_STORAGE__DSN": ch.dsn("admin", None),
                                    "TAGWAY_STORAGE__DATABASE": "viaenv"})
    assert res.exit_code == 0 and res.stdout.strip() == "schema is up to date", res.output


# -- 4. a server too old --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", [{"old": True}, {"version": "21.8.15.7"}])
def test_a_server_too_old_is_one_line_and_exit_2(ch, run, server):
    """Debian's 18.16 (which fails the driver's own connect query) and a 21.8 (which the driver connects to)."""
    migrated(ch, "t_old")
    ch.set(**server)
    want = "ClickHouse 18.16 is too old: tagway needs >= 22.3" if server.get("old") else \
        "ClickHouse 21.8 is too old: tagway needs >= 22.3"
    for args in (["db", "migrate"], ["db", "status"]):
        res = run(*args, "--dsn", ch.dsn("admin", "t_old"))
        assert res.exit_code == 2 and res.stderr.splitlines() == [f"error: {want}"], res.output
        assert "Traceback" not in res.output
    res = run("config", "check", env={"TAGWAY_STORAGE__DSN": ch.dsn("admin", "t_old")})
    assert want in res.stderr, res.output


def test_the_gateway_spools_and_says_the_server_is_too_old(ch, tmp_path):
    migrated(ch, "t_old_gw")
    ch.set(version="22.2.3.5")
    recorder = recorder_for(ch.dsn("admin", "t_old_gw"), tmp_path, "oldgw")
    try:
        emit(recorder, 2)
        assert recorder.force_flush(10_000)
        assert recorder.processor.degraded
        assert recorder.processor.last_error == "ClickHouse 22.2 is too old: tagway needs >= 22.3"
        assert recorder.metrics.get("spans_spooled") == 2
        ch.set(version="22.3.1.1")  # upgraded: the oldest it takes
        wait_for(lambda: stored(ch, "t_old_gw", "oldgw") == 2, what="stored after the upgrade")
    finally:
        recorder.shutdown()
    assert recorder.metrics.get("spans_quarantined") == 0
