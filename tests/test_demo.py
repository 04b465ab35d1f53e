"""`tagway demo` says how its dashboard stays up: piped, it exits and names `--keep-running`; with
`--keep-running` it serves the dashboard (the admin key in the URL fragment works) until Ctrl-C, then exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

DEMO = [sys.executable, "-c", "from gateway.cli import main; main()", "demo", "--calls", "12"]


def _env() -> dict:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "200"}


def test_piped_demo_exits_and_says_how_to_keep_the_dashboard(tmp_path):
    res = subprocess.run(DEMO + ["--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=180,
                         env=_env(), stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    out = " ".join(res.stdout.split())
    assert "stops now (not a terminal)" in out and "tagway demo --keep-running" in out


def _until_serving(proc: subprocess.Popen) -> str:
    """The demo's output so far, on one line: up to the line that says it serves until Ctrl-C (or its end)."""
    lines, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "until Ctrl-C" in line:
            break
    return " ".join("".join(lines).split())


def test_keep_running_serves_the_dashboard_until_ctrl_c(tmp_path):
    proc = subprocess.Popen(DEMO + ["--data-dir", str(tmp_path / "d"), "--keep-running"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        text = _until_serving(proc)
        assert "serving the gateway and its dashboard until Ctrl-C (--keep-running was given)" in text, text[-2000:]
        m = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/ui#key=(tw-[A-Za-z0-9_-]+)", text)
        assert m, text[-2000:]
        root, key = m.groups()
        assert httpx.get(f"{root}/ui/calls").status_code == 200
        who = httpx.get(f"{root}/v1/tagway/whoami", headers={"Authorization": f"Bearer {key}"}).json()
        assert who["admin"] is True
        calls = httpx.get(f"{root}/admin/calls", params={"where": "source=demo", "limit": 5},
                          headers={"Authorization": f"Bearer {key}"}).json()
        assert len(calls["calls"]) == 5 and calls["next"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_sigterm_stops_the_kept_demo_cleanly(tmp_path):
    """`tagway demo --keep-running` stopped with SIGTERM (a service manager, `kill`, a container stop) stops as Ctrl-C
    does: exit 0 promptly, the discovery file removed, and the recorder flushed, so the store (opened directly
    afterwards) holds every call the demo made and the calls made through it just before the signal. It had no
    SIGTERM handler (uvicorn runs in a thread there, which installs none), so SIGTERM killed it: exit -15, the
    discovery file left behind, the last batch not stored."""
    data = tmp_path / "d"
    proc = subprocess.Popen(DEMO + ["--data-dir", str(data), "--keep-running"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        text = _until_serving(proc)
        assert "until Ctrl-C (--keep-running was given)" in text, text[-2000:]
        said = re.search(r"client saw (\d+) ok / (\d+) errors; recorded (\d+) calls", text)
        root = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/ui#key=", text)
        acme = re.search(r"keys \(shown once\): acme=(tw-[A-Za-z0-9_-]+)", text)
        assert said and root and acme, text[-2000:]
        made = int(said[1]) + int(said[2])
        assert int(said[3]) == made == 12 + 2, text[-2000:]  # --calls 12, a rejected model and a wrong key
        discovery = data / "clickhouse" / "tagway-gateway.json"
        assert discovery.exists()
        # a last batch: answered, still in the recorder's 0.5 s batch window when the signal comes
        extra = 3
        with httpx.Client(base_url=root[1], timeout=30, headers={"Authorization": f"Bearer {acme[1]}"}) as h:
            for i in range(extra):
                r = h.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [
                    {"role": "user", "content": f"last batch {i}"}]}, headers={"x-tagway-intent": "refund"})
                assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(30) == 0, proc.stdout.read()[-2000:]
        assert time.monotonic() - t0 < 15
        assert not discovery.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # opened directly (no gateway announces it any more), in a process of its own as a CLI would
    count = subprocess.run([sys.executable, "-c", """
import sys
from exporters.store_access import open_store
store = open_store(sys.argv[1])
assert type(store).__name__ != "RemoteStore", type(store)
rows, _ = store.query_rows("SELECT count() FROM llm_calls WHERE source = 'demo'")
print(rows[0][0])
""", f"chdb://{(data / 'clickhouse').resolve()}"], capture_output=True, text=True, timeout=120, env=_env())
    assert count.returncode == 0, count.stderr[-2000:]
    assert int(count.stdout.split()[-1]) == made + extra


def test_demo_on_a_data_directory_a_gateway_serves_names_that_gateway(tmp_path):
    """Bad input: the demo's gateway would be a second one on the store. One line naming the gateway that serves it
    (it named the spool lock it hit first), exit 2."""
    from tests.gateway_process import GatewayProcess

    data = tmp_path / "data"
    with GatewayProcess(tmp_path, {"storage": {"data_dir": str(data)},
                                   "models": [{"name": "m", "provider": "mock"}]}) as gw:
        res = subprocess.run(DEMO + ["--data-dir", str(data), "--exit"], capture_output=True, text=True, timeout=120,
                             env=_env(), stdin=subprocess.DEVNULL)
        lines = (res.stdout + res.stderr).strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stdout + res.stderr
        assert f"the gateway pid {gw.proc.pid} at {gw.url} serves it" in lines[0] and "spool" not in lines[0]
