"""While `tagway serve` holds the embedded store, the CLI works through it (issue 17).

The real gateway runs as a subprocess on a chDB store of its own; tagged traffic goes through it with the openai SDK
to a real HTTP upstream; `tagway stats|errors|show|replay run|replay report` run as subprocesses while it serves
(through its loopback store API), then again after it stopped (opening the store directly): same numbers. Then the
gateway is SIGKILLed and the CLI notices the stale discovery file, says so in one line and opens the store directly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from exporters import discovery
from gateway.auth import hash_key
from tests.http_server import free_port
from tests.upstream import Upstream

ADMIN = "tw-live-admin-0123456789abcdefghijklmnopq"
KEYS = {"acme": "tw-live-acme-0123456789abcdefghijklmnopq", "globex": "tw-live-globex-0123456789abcdefghijklmno"}
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TEST_UPSTREAM_KEY": "sk-up", "NO_COLOR": "1"}
ENV.pop("TAGWAY_DSN", None)
ENV.pop("TAGWAY_VERBOSE", None)


def write_config(tmp_path, upstream: Upstream, port: int, name: str = "tagway.yaml",
                 batch_max_seconds: float = 0.2, replay_concurrency: int | None = None) -> str:
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}
    lane = {} if replay_concurrency is None else {"replay_concurrency": replay_concurrency}
    cfg = {"server": {"host": "127.0.0.1", "port": port, **lane},
           "storage": {"data_dir": str(tmp_path / "data")},
           "recording": {"batch_max_seconds": batch_max_seconds},
           "admin_key_hash": hash_key(ADMIN),
           "models": [{"name": "gpt-test", "model": "ok-model", **up, "input_cost_per_token": 1e-6,
                       "output_cost_per_token": 2e-6},
                      {"name": "broken", "model": "fail500-a", **up},
                      {"name": "slow", "model": "slow-a", **up, "timeout": 10}],  # answers after 2 s
           "tenants": [{"customer": c, "keys": [{"id": f"{c}-k", "hash": hash_key(k)}]} for c, k in KEYS.items()]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start_gateway(config: str, port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=open(config + ".stderr.log", "w"),
                            env={**ENV, **(env or {})})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {open(config + '.stderr.log').read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not become ready")


def tagway(*args: str, config: str, verbose: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gateway.cli", *(["--verbose"] if verbose else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, "TAGWAY_CONFIG": config})


def jout(r: subprocess.CompletedProcess) -> dict:
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout[r.stdout.index("{"):])


def stats_of(config: str) -> tuple[dict, str]:
    r = tagway("stats", "--by", "customer", "--by", "intent", "--since", "1h", "--json", config=config)
    assert r.returncode == 0, r.stderr
    d = jout(r)
    return {"segments": d["segments"], "total": d["total"]}, r.stderr


def traffic(port: int) -> None:
    for customer, intent, model, n in (("acme", "refund", "gpt-test", 8), ("acme", "refund", "broken", 3),
                                       ("globex", "billing", "gpt-test", 6)):
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS[customer], max_retries=0)
        for i in range(n):
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"{intent} question #{i}"}],
                    extra_headers={"x-tagway-intent": intent, "x-tagway-tags": "region=eu"})
            except Exception:  # the broken model's 500s are part of the traffic
                assert model == "broken"


@pytest.fixture()
def upstream():
    with Upstream() as up:
        yield up


def test_a_command_counts_every_call_answered_before_it_even_inside_the_batch_window(tmp_path, upstream):
    """The gateway inserts calls in big batches (recording.batch_max_seconds); a local command has it store what it
    holds first. With a 10-minute window nothing is inserted on its own during this test."""
    port = free_port()
    config = write_config(tmp_path, upstream, port, batch_max_seconds=600)
    gw = start_gateway(config, port)
    try:
        traffic(port)
        live, err = stats_of(config)
        assert "through the running gateway" in err
        assert (live["total"]["calls"], live["total"]["errors"]) == (17, 3)
        status = tagway("db", "status", "--json", config=config, verbose=False)  # the same store, the same count
        assert status.returncode == 0, status.stderr
        st = jout(status)
        assert st["access"] == f"through the running gateway (pid {gw.pid} at http://127.0.0.1:{port})"
        assert st["calls"]["total"] == 17 and st["schema"]["missing"] == [] and st["spool"]["unsent"] == 0
        errors = tagway("errors", "--since", "1h", "--json", config=config)
        assert errors.returncode == 0 and jout(errors)["errors"][0]["count"] == 3, errors.stderr
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)


def test_cli_works_through_a_serving_gateway_then_directly_then_after_sigkill(tmp_path, upstream):
    port = free_port()
    # replay slots for the resume's 16 cases at once (the default 4 would send its 2 s calls 4 at a time)
    config = write_config(tmp_path, upstream, port, replay_concurrency=16)
    store_dir = str((tmp_path / "data" / "clickhouse").resolve())
    disc = discovery.discovery_path(store_dir)
    spec = tmp_path / "replay.yaml"
    spec.write_text(yaml.safe_dump({
        "slice": {"customer": ["acme", "globex"], "since": "1h", "segment_by": ["customer"],
                  "sampling": {"min_per_segment": 5, "seed": 3}},
        "candidates": [{"name": "cand", "model": "gpt-test"}],
        "evaluators": [{"type": "icontains", "value": "refund"}],
        "gating": {"margin": 0.5}}))

    gw = start_gateway(config, port)
    try:
        ann = discovery.read(store_dir)
        assert ann is not None and ann.pid == gw.pid and ann.url == f"http://127.0.0.1:{port}"
        assert os.stat(disc).st_mode & 0o777 == 0o600
        traffic(port)
        live, err = stats_of(config)  # no polling: a command has the gateway store its pending calls first
        assert "through the running gateway" in err and f"pid {gw.pid}" in err
        assert (live["total"]["calls"], live["total"]["errors"]) == (17, 3)
        # the discovery file lost, then damaged, while the gateway serves: the gateway writes it again (same
        # credential) and a command run meanwhile waits for it rather than failing on the lock
        for damage in ("delete", "garbage", "credential"):
            if damage == "delete":
                os.unlink(disc)
            elif damage == "garbage":
                with open(disc, "w") as f:
                    f.write("garbage{{{")
            else:  # readable, but its credential no longer matches: it failed at once (401), not waiting
                data = orjson.loads(open(disc, "rb").read())
                with open(disc, "wb") as f:
                    f.write(orjson.dumps({**data, "credential": "wrong"}))
            again = tagway("stats", "--since", "1h", "--json", config=config)
            assert again.returncode == 0, again.stderr
            assert "through the running gateway" in again.stderr and jout(again)["total"]["calls"] == 17
            back = discovery.read(store_dir)
            assert (back.instance, back.credential) == (ann.instance, ann.credential)
            assert os.stat(disc).st_mode & 0o777 == 0o600
        errors = tagway("errors", "--since", "1h", "--json", config=config)
        assert errors.returncode == 0, errors.stderr
        live_errors = jout(errors)["errors"]
        assert live_errors[0]["count"] == 3
        trace = live_errors[0]["example_trace_ids"][0]
        show = tagway("show", trace, "--json", config=config)
        assert show.returncode == 0, show.stderr
        live_call = jout(show)
        assert (live_call["customer"], live_call["status"]) == ("acme", "error")

        run = tagway("replay", "run", "--spec", str(spec), "--gateway", f"http://127.0.0.1:{port}", "--api-key", ADMIN,
                     "--format", "json", "--no-progress", "--run-id", "live-run-1", config=config)
        assert run.returncode in (0, 1, 4), run.stderr  # a gate verdict, not a store error
        assert "through the running gateway" in run.stderr
        run_report = jout(run)
        assert run_report["status"] == "complete" and run_report["n_cases"] == 14  # the ok calls
        report = tagway("replay", "report", "live-run-1", "--format", "json", config=config)
        assert report.returncode == run.returncode, report.stderr
        live_report = jout(report)
        assert live_report["candidates"] == run_report["candidates"] and live_report["passed"] == run_report["passed"]
        # --in-process would start a second gateway on this store: refused, naming the one to use
        inproc = tagway("replay", "run", "--spec", str(spec), "--in-process", "--no-progress", config=config)
        assert inproc.returncode == 2 and "Traceback" not in inproc.stderr, inproc.stderr
        assert f"the gateway pid {gw.pid} at http://127.0.0.1:{port} serves the store" in inproc.stderr
        assert f"use --gateway http://127.0.0.1:{port}" in inproc.stderr and "spool" not in inproc.stderr
        assert "replay run " not in inproc.stderr  # refused before anything was stored: no run to list

        # a replay CLI killed mid-run: `replay resume` finishes it through the gateway
        slow = tmp_path / "slow.yaml"
        slow.write_text(spec.read_text().replace("model: gpt-test", "model: slow"))
        killed = subprocess.Popen([sys.executable, "-m", "gateway.cli", "replay", "run", "--spec", str(slow),
                                   "--gateway", f"http://127.0.0.1:{port}", "--api-key", ADMIN, "--no-progress",
                                   "--run-id", "live-run-2", "--concurrency", "2"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**ENV, "TAGWAY_CONFIG": config})
        # killed once a first result is stored (each case takes 2 s, 2 at a time: most are not stored yet)
        stored = {"sql": "SELECT count() FROM replay_results WHERE run_id = 'live-run-2'"}
        deadline = time.monotonic() + 90
        while httpx.post(f"{ann.url}/admin/store/query", json=stored, timeout=30,
                         headers={"authorization": f"Bearer {ann.credential}"}).json()["rows"][0][0] == 0:
            assert killed.poll() is None and time.monotonic() < deadline, "the replay stored no result"
            time.sleep(0.2)
        killed.kill()
        killed.wait(30)
        # no --gateway: the calls go through the gateway serving the store, as the store's statements do
        resume = tagway("replay", "resume", "live-run-2", "--api-key", ADMIN, "--format", "json", "--no-progress",
                        "--concurrency", "16", config=config)
        assert resume.returncode in (0, 1, 4), resume.stderr
        # one --verbose line says how the store was reached; the calls go to the same gateway
        said = [ln for ln in resume.stderr.splitlines() if ln.startswith("tagway: store:")]
        assert said == [f"tagway: store: through the running gateway (pid {gw.pid} at http://127.0.0.1:{port}), "
                        f"announced in {disc}"], resume.stderr
        resumed = jout(resume)
        assert resumed["status"] == "complete" and resumed["n_cases"] == 14
        kept = next(n for n in resumed["notes"] if n.startswith("resumed:"))
        assert 0 < int(kept.split()[1]) < 14, kept  # some results survived the kill, the rest ran now

        # a second gateway on the same store: exit 2, one line naming the first one, even while the first one's
        # discovery file is missing (it writes it again within seconds; the spool's lock is the first one hit)
        os.unlink(disc)
        other = write_config(tmp_path, upstream, free_port(), name="other.yaml")
        second = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", other],
                                capture_output=True, text=True, timeout=60, env=ENV)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"pid {gw.pid}" in lines[0] and f"http://127.0.0.1:{port}" in lines[0]
        # the same config again (so the same port): named too, where it said only that the port was in use
        same = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", config],
                              capture_output=True, text=True, timeout=60, env=ENV)
        lines = same.stderr.strip().splitlines()
        assert same.returncode == 2 and len(lines) == 1, same.stderr
        assert f"already in use: the gateway pid {gw.pid} at http://127.0.0.1:{port} already serves this store" \
            in lines[0], lines

        # a tenant key never reaches a statement; the credential does
        api = f"http://127.0.0.1:{port}/admin/store"
        sql = {"sql": "CREATE TABLE IF NOT EXISTS pwned (x UInt8) ENGINE = Memory"}
        r = httpx.post(f"{api}/command", json=sql, headers={"authorization": f"Bearer {KEYS['acme']}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"
        assert httpx.post(f"{api}/command", json=sql).status_code == 401
        check = httpx.post(f"{api}/command", json={"sql": "EXISTS TABLE pwned"},
                           headers={"authorization": f"Bearer {ann.credential}"})
        assert check.status_code == 200 and check.json()["result"] == 0
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)
    assert not os.path.exists(disc), "a gateway that stopped cleanly removes its discovery file"

    # the same commands opening the store directly: the same numbers
    direct, err = stats_of(config)
    assert "opened directly" in err and direct == live
    assert jout(tagway("errors", "--since", "1h", "--json", config=config))["errors"] == live_errors
    assert jout(tagway("show", trace, "--json", config=config)) == live_call
    assert jout(tagway("replay", "report", "live-run-1", "--format", "json", config=config)) == live_report

    # SIGKILL: the discovery file stays behind; the CLI says so once and opens the store directly
    gw = start_gateway(config, port)
    pid = gw.pid
    gw.send_signal(signal.SIGKILL)
    gw.wait(30)
    assert os.path.exists(disc)
    after = tagway("stats", "--by", "customer", "--by", "intent", "--since", "1h", "--json", config=config,
                   verbose=False)
    assert after.returncode == 0, after.stderr
    lines = after.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {pid}" in lines[0] and "gone" in lines[0] and "directly" in lines[0], lines
    d = jout(after)
    assert {"segments": d["segments"], "total": d["total"]}["total"]["calls"] >= 17
    assert not os.path.exists(disc), "the stale file is removed once the store is ours"


def test_after_a_sigkill_the_cli_names_the_calls_not_stored_yet_and_a_restart_stores_them(tmp_path, upstream):
    """A gateway killed inside its batch window leaves answered calls in its write-ahead log. A command that opens
    the store directly meanwhile must not undercount in silence: it says how many wait and where, on every direct
    open, until a gateway starts again and stores them (then the figures include them and the line is gone)."""
    port = free_port()
    config = write_config(tmp_path, upstream, port, batch_max_seconds=600)  # nothing inserted on its own
    gw = start_gateway(config, port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["acme"], max_retries=0)
        for i in range(5):
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": f"q{i}"}])
        time.sleep(1.0)  # the write-ahead log is written every ~100 ms
    finally:
        gw.send_signal(signal.SIGKILL)
        gw.wait(30)
    for attempt in range(2):  # said on every direct open, not only the first (which removes the stale file)
        r = tagway("stats", "--since", "1h", "--json", config=config, verbose=False)
        assert r.returncode == 0, r.stderr
        lines = r.stderr.strip().splitlines()
        waiting = [line for line in lines if "not in the store yet" in line]
        assert len(waiting) == 1 and "up to 5 call(s)" in waiting[0], lines
        assert str(tmp_path / "data" / "spool") in waiting[0]
        assert len(lines) == (2 if attempt == 0 else 1), lines  # the first also says the gateway is gone
        assert jout(r)["total"]["calls"] == 0
    status = tagway("db", "status", "--json", config=config, verbose=False)
    assert status.returncode == 0, status.stderr
    assert jout(status)["spool"]["unsent"] == 5 and jout(status)["access"] == "opened directly"
    elsewhere = tmp_path / "elsewhere"  # --dsn from another directory: the spool beside that store is read
    elsewhere.mkdir()
    by_dsn = subprocess.run([sys.executable, "-m", "gateway.cli", "db", "status", "--json", "--dsn",
                             f"chdb://{tmp_path / 'data' / 'clickhouse'}"], capture_output=True, text=True,
                            timeout=120, env=ENV, cwd=elsewhere)
    assert by_dsn.returncode == 0 and jout(by_dsn)["spool"]["unsent"] == 5, by_dsn.stderr
    gw = start_gateway(write_config(tmp_path, upstream, port, name="again.yaml"), port)  # recovers the log
    gw.send_signal(signal.SIGTERM)
    gw.wait(60)
    r = tagway("stats", "--since", "1h", "--json", config=config, verbose=False)
    assert r.returncode == 0 and "not in the store yet" not in r.stderr, r.stderr
    assert jout(r)["total"]["calls"] == 5


def test_a_local_command_runs_as_long_as_it_takes_through_the_gateway(tmp_path, upstream):
    """Local commands' statements carry no time limit through the gateway (storage.query_max_seconds is the
    dashboard's and the HTTP API's), as on the store opened directly: a backfill or a question over months must not
    fail only because a gateway serves. One that outlasts the gateway's heartbeat interval comes back in a stream of
    spaces and then its answer, or its refusal. This gateway beats every second (5 s in production), so a 2 s
    statement outlasts it."""
    from exporters.store import StoreError
    from exporters.store_access import open_store

    port = free_port()
    config = write_config(tmp_path, upstream, port)
    cfg = yaml.safe_load(open(config))
    cfg["storage"]["query_max_seconds"] = 1  # the dashboard's limit: a local command's statements do not carry it
    open(config, "w").write(yaml.safe_dump(cfg))
    gw = start_gateway(config, port, env={"TAGWAY_STORE_HEARTBEAT_SECONDS": "1"})
    try:
        store = open_store(f"chdb://{(tmp_path / 'data' / 'clickhouse').resolve()}")
        try:
            assert type(store).__name__ == "RemoteStore"
            slow = "SELECT sum(sleepEachRow(1)) + count() FROM numbers(2)"  # ~2 s: one row a block
            rows, _ = store.query_rows(slow, settings={"max_block_size": 1})
            assert rows == [(2,)]
            refused = slow.replace("count()", "throwIf(count() = 2, 'two rows')")
            with pytest.raises(StoreError) as e:  # refused after the answer began: said as on the direct path
                store.query_rows(refused, settings={"max_block_size": 1})
            assert "two rows" in str(e.value)
            # a command that leaves mid-statement: its statement is killed, not left to hold a client for a minute
            ann = store.announcement
            long = {"sql": "SELECT sum(sleepEachRow(1)) FROM numbers(60)", "settings": {"max_block_size": 1}}
            running = ("SELECT count() FROM system.processes WHERE query LIKE '%numbers(60)%' "
                       "AND query NOT LIKE '%system.processes%'")
            with httpx.Client(base_url=ann.url + "/admin/store", timeout=30,
                              headers={"authorization": f"Bearer {ann.credential}"}) as h:
                # it did begin: a 200 and a heartbeat's space, then the refusal (a 2 s statement outlasts the beat)
                r = h.post("/query", json={"sql": refused, "settings": {"max_block_size": 1}})
                assert r.status_code == 200 and r.content.startswith(b" "), (r.status_code, r.text[:300])
                assert "two rows" in r.json()["error"]["message"], r.text[:300]
                with h.stream("POST", "/query", json=long) as r:  # its headers come with the first heartbeat
                    assert r.status_code == 200
                    assert store.query_rows(running)[0] == [(1,)]
            deadline = time.monotonic() + 20
            while store.query_rows(running)[0] != [(0,)]:
                assert time.monotonic() < deadline, "the statement of a command that left still runs"
                time.sleep(0.5)
        finally:
            store.close()
        # and the gateway stops without waiting for a statement still running for a command
        with httpx.Client(base_url=ann.url + "/admin/store", timeout=30,
                          headers={"authorization": f"Bearer {ann.credential}"}) as h:
            with h.stream("POST", "/query", json=long) as r:
                assert r.status_code == 200
                t0 = time.monotonic()
                gw.send_signal(signal.SIGTERM)
                gw.wait(40)
        assert time.monotonic() - t0 < 30
    finally:
        if gw.poll() is None:
            gw.send_signal(signal.SIGTERM)
            gw.wait(60)
