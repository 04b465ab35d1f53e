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


def test_keep_running_serves_the_dashboard_until_ctrl_c(tmp_path):
    proc = subprocess.Popen(DEMO + ["--data-dir", str(tmp_path / "d"), "--keep-running"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), stdin=subprocess.DEVNULL)
    try:
        lines, deadline = [], time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "until Ctrl-C" in line:
                break
        text = " ".join("".join(lines).split())
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
