"""`tagway serve` as an operator runs it: the access log on stderr by default (text, one line per call, nothing
secret), and a busy port refused in one line before anything says "serving"."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import yaml

from gateway.auth import hash_key
from tests.http_server import free_port

KEY = "tw-serve-test-0123456789abcdefghijklmnopq"


def write_config(tmp_path, port: int, **extra) -> str:
    cfg = {"server": {"host": "127.0.0.1", "port": port}, "storage": {"data_dir": str(tmp_path / "data")},
           "recording": {"enabled": False},
           "models": [{"name": "echo", "provider": "mock", "mock": {"reply": "hello"}}],
           "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEY)}]}], **extra}
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def serve(path: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", path, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1] or "the gateway exited"  # its stderr, unless a file took it
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("gateway did not become ready")


def logfmt(line: str) -> dict[str, str]:
    """key=value fields; a quoted value is a JSON string."""
    fields = {}
    for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line):
        fields[k] = json.loads(v) if v.startswith('"') else v
    return fields


def test_serve_writes_one_access_line_per_call_to_stderr(tmp_path):
    port = free_port()
    proc = serve(write_config(tmp_path, port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        auth = {"authorization": f"Bearer {KEY}"}
        ok = httpx.post(url + "/v1/chat/completions", headers=auth,
                        json={"model": "echo", "messages": [{"role": "user", "content": "SECRET-CONTENT-MARKER"}]})
        assert ok.status_code == 200
        bad = httpx.post(url + "/v1/chat/completions", headers=auth,
                         json={"model": 'evil"\nstatus=200 model=x', "messages": [{"role": "user", "content": "x"}]})
        assert bad.status_code == 404
        denied = httpx.post(url + "/v1/chat/completions", headers={"authorization": "Bearer tw-wrong-key-123456"},
                            json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
        assert denied.status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = err.splitlines()
    serving = [i for i, x in enumerate(lines) if "serving on" in x]
    access = [x for x in lines if x.startswith("time=")]
    assert serving and len(access) == 3, err
    first = logfmt(access[0])
    assert first["trace_id"] == ok.headers["x-tagway-trace-id"]
    assert first["key_id"] == "acme-1" and first["customer"] == "acme" and first["model"] == "echo"
    assert first["status"] == "200" and float(first["latency_ms"]) >= 0
    # a model name a client typed is quoted: it cannot forge a field or a line
    second = logfmt(access[1])
    assert second["status"] == "404" and second["model"] == 'evil"\nstatus=200 model=x'
    assert logfmt(access[2])["status"] == "401" and logfmt(access[2])["key_id"] == "-"  # refused: no key id
    assert "SECRET-CONTENT-MARKER" not in err and KEY not in err and "tw-wrong-key" not in err


def test_access_log_can_be_turned_off(tmp_path):
    port = free_port()
    proc = serve(write_config(tmp_path, port, access_log={"enabled": False}))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        r = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "serving on" in err and "trace_id=" not in err


def test_busy_port_fails_before_saying_serving(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = serve(write_config(tmp_path, port))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "serving" not in err and "Traceback" not in err
    assert f"127.0.0.1:{port} is already in use" in err
    assert len(err.strip().splitlines()) == 1


def test_a_host_this_machine_does_not_have_is_one_line_about_the_host_not_the_port(tmp_path):
    """A name that does not resolve, or an address of no interface here: the advice is about --host (it used to say
    "stop what listens there or pick another --port", which nothing did)."""
    path = write_config(tmp_path, free_port())
    for host in ("::1x", "0.0.0.0.0", "192.0.2.1"):  # not a name, not an address, TEST-NET-1 (no interface has it)
        proc = serve(path, "--host", host)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {host}:") and "cannot be bound" in lines[0], lines
        assert "--host must be an address of this host" in lines[0] and "another --port" not in lines[0]


def test_port_0_serves_on_a_free_port_and_says_which(tmp_path):
    """`--port 0` was read as "not given" and served on the config's port."""
    configured = free_port()
    proc = serve(write_config(tmp_path, configured), "--port", "0")
    try:
        first = proc.stderr.readline()
        m = re.match(r"tagway: serving on http://127\.0\.0\.1:(\d+)/v1 ", first)
        assert m and int(m.group(1)) not in (0, configured), first
        wait_ready(f"http://127.0.0.1:{m.group(1)}", proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_workers_on_port_0_say_the_port_they_serve_on(tmp_path):
    """`serve --workers N` said nothing at start (uvicorn logs at warning), so `--port 0` served on a port nobody
    could learn. Recording is off here: workers need a ClickHouse server to record."""
    proc = serve(write_config(tmp_path, free_port()), "--port", "0", "--workers", "2")
    try:
        first = proc.stderr.readline()
        m = re.match(r"tagway: serving on http://127\.0\.0\.1:(\d+)/v1 with 2 workers \(store: recording off\)$",
                     first.strip())
        assert m and int(m.group(1)) != 0, first
        url = f"http://127.0.0.1:{m.group(1)}"
        wait_ready(url, proc)
        r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["echo"]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_serve_warns_about_keys_whose_tenant_is_gone(tmp_path):
    """Removing a tenant shuts its keys out (not an error), but the gateway says so at start, as `config check`
    does, rather than leaving the 401s to be puzzled over."""
    path = write_config(tmp_path, free_port())
    keys = tmp_path / "tagway.keys.yaml"
    keys.write_text(f"- {{id: gone-1, customer: gone, hash: '{hash_key('tw-gone-0123456789')}'}}\n")
    proc = serve(path, "--port", "0")
    try:
        first, second = proc.stderr.readline(), proc.stderr.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert first.startswith(f"tagway: warning: {keys}:1: key #1 (gone-1): customer 'gone' is not a tenant in the "
                            "config: this key gets 401"), first
    assert second.startswith("tagway: serving on http://127.0.0.1:"), second


def test_an_sdk_turned_off_by_environment_is_one_line_not_a_gateway_without_trace_ids(tmp_path):
    """OTEL_SDK_DISABLED=true makes the SDK hand out no-op tracers: every call would go unrecorded under trace id 0.
    The gateway refuses to start, recording on or off, and says which variable to unset."""
    for recording in (True, False):
        path = write_config(tmp_path, free_port(), recording={"enabled": recording})
        proc = serve(path, env={"OTEL_SDK_DISABLED": "true"})
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        assert "serving" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "OTEL_SDK_DISABLED=true turns off the OpenTelemetry SDK" in err and "unset it" in err


def test_a_spool_that_cannot_be_written_is_one_line(tmp_path):
    """A read-only or broken data directory (here: the spool's parent is a file) fails start-up in one line naming
    the path, before anything says "serving", not in a traceback from inside the recorder."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    path = write_config(tmp_path, free_port(), recording={"enabled": True},
                        storage={"data_dir": str(tmp_path / "data"), "spool_dir": str(blocker / "spool")})
    proc = serve(path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err and "serving" not in err, err
    said = [f"error: cannot start recording: Not a directory: {blocker}/spool (the spool and the embedded "
            "store live under storage.data_dir, the spool under storage.spool_dir when set)"]
    assert err.strip().splitlines() == said
    # with workers too (a server DSN): said before any worker starts, not in a traceback from each
    server = write_config(tmp_path, free_port(), recording={"enabled": True},
                          storage={"dsn": f"http://default:pw@127.0.0.1:{free_port()}/tagway",
                                   "spool_dir": str(blocker / "spool")})
    proc = serve(server, "--workers", "2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().splitlines() == said, err


HOLD = """import os, time
from exporters.store import connect
store = connect(os.environ["HOLD_DSN"])
print("held", flush=True)
time.sleep(float(os.environ["HOLD_SECONDS"]))
store.close()
"""


def _hold(tmp_path, seconds: float) -> subprocess.Popen:
    """A local command with the embedded store open directly, as `tagway stats --since 7d` has it while no gateway
    serves (a script named `tagway`, so its command line reads like the installed one's)."""
    script = tmp_path / "bin" / "tagway"
    script.parent.mkdir(exist_ok=True)
    script.write_text(HOLD)
    proc = subprocess.Popen([sys.executable, str(script), "stats", "--since", "7d"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                 "HOLD_DSN": f"chdb://{tmp_path / 'data' / 'clickhouse'}", "HOLD_SECONDS": str(seconds)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_serve_waits_for_a_local_command_that_has_the_store_open_and_names_it(tmp_path):
    """A restart racing a cron's `tagway stats` used to fail at once ('in use by another process', nobody named)."""
    port = free_port()
    path = write_config(tmp_path, port, recording={"enabled": True})
    holder = _hold(tmp_path, 3)
    proc = serve(path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        holder.wait(30)
    assert f"is open in pid {holder.pid} (tagway stats --since 7d); waiting up to 30 s" in err, err


def test_a_store_held_past_the_wait_names_the_holder(tmp_path):
    from gateway import cli
    from gateway.config import load_config
    from exporters.store import StoreLockedError

    port = free_port()
    cfg = load_config(write_config(tmp_path, port, recording={"enabled": True}))
    holder = _hold(tmp_path, 60)
    try:
        message = cli._held_by(cfg, StoreLockedError("in use"))
    finally:
        holder.kill()
        holder.wait(30)
    assert f"is in use by pid {holder.pid} (tagway stats --since 7d; chDB allows" in message, message
    assert "serve waits up to 30 s for a command to finish" in message


def test_sigterm_gives_calls_in_flight_the_configured_grace(tmp_path):
    """The grace for calls in flight at SIGTERM was 60 s whatever the pod allowed (helm says to raise
    terminationGracePeriodSeconds for long generations): it is `server.graceful_shutdown_seconds` now."""
    import threading  # noqa: PLC0415

    path = write_config(tmp_path, free_port(), server={"host": "127.0.0.1", "port": 0,
                                                       "graceful_shutdown_seconds": 1.5},
                        models=[{"name": "slow", "provider": "mock", "mock": {"reply": "late", "latency_ms": 30_000}}])
    proc = serve(path)
    url = "http://127.0.0.1:" + re.match(r"tagway: serving on http://127\.0\.0\.1:(\d+)/v1 ",
                                         proc.stderr.readline()).group(1)
    wait_ready(url, proc)
    answers: list = []
    call = threading.Thread(target=lambda: answers.append(httpx.post(
        url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
        json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]})))
    call.start()
    time.sleep(1.0)  # the call is in flight
    started = time.monotonic()
    proc.terminate()
    proc.communicate(timeout=60)
    call.join(60)
    took = time.monotonic() - started
    assert 1.4 < took < 15, took  # the grace, not the call's 30 s nor the old 60 s
    # an OpenAI-shaped 503 the SDKs retry (it was the server's plain-text 500)
    assert answers and answers[0].status_code == 503, answers
    assert answers[0].json()["error"]["code"] == "gateway_shutting_down"
