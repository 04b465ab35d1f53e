"""SIGKILL the gateway mid-load while ClickHouse is down, restart it on a working store: the spool is replayed and
the counts reconcile (what the first process spooled is exactly what the second one re-sent and stored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import yaml

from gateway.auth import hash_key
from tests.gateway_fixture import free_port

KEY = "tw-kill-test-0123456789abcdefghijklmnopq"


def write_config(path, port, storage):
    cfg = {"server": {"host": "127.0.0.1", "port": port}, "storage": storage,
           "recording": {"batch_max_seconds": 0.2},
           "models": [{"name": "m", "provider": "mock"}],
           "tenants": [{"customer": "kill", "keys": [{"id": "k", "hash": hash_key(KEY)}]}]}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def start(config_path, port):
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", config_path],
                            stdout=subprocess.DEVNULL, stderr=open(config_path + ".stderr.log", "w"),
                            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {open(config_path + '.stderr.log').read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("gateway did not become ready")


def metric(port, name):
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_sigkill_mid_load_then_restart_replays_the_spool(tmp_path):
    spool = str(tmp_path / "spool")
    refused = free_port()  # nothing listens here: ClickHouse is "down" for the first process
    p1_port, p2_port = free_port(), free_port()
    cfg1 = write_config(tmp_path / "p1.yaml", p1_port, {"dsn": f"http://default:pw@127.0.0.1:{refused}/tagway",
                                                        "spool_dir": spool})
    p1 = start(cfg1, p1_port)
    answered: list[str] = []
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=5) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"http://127.0.0.1:{p1_port}/v1/chat/completions",
                               headers={"authorization": f"Bearer {KEY}", "x-tagway-intent": "refund"},
                               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
                    if r.status_code == 200:
                        answered.append(r.headers["x-tagway-trace-id"])
                except httpx.HTTPError:
                    pass  # the process is being killed under us

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while metric(p1_port, "tagway_spans_spooled_total") < 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        spooled_seen = metric(p1_port, "tagway_spans_spooled_total")
        assert spooled_seen >= 100
        assert metric(p1_port, "tagway_spans_dropped_total") == 0
        p1.send_signal(signal.SIGKILL)  # mid-load: no flush, no goodbye
        p1.wait(10)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(answered) >= spooled_seen

    data_dir = str(tmp_path / "data")
    cfg2 = write_config(tmp_path / "p2.yaml", p2_port, {"data_dir": data_dir, "spool_dir": spool})
    p2 = start(cfg2, p2_port)
    try:
        deadline = time.monotonic() + 30
        while (metric(p2_port, "tagway_spool_files_pending") > 0
               or metric(p2_port, "tagway_spans_resent_total") < spooled_seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        resent = metric(p2_port, "tagway_spans_resent_total")
        assert resent >= spooled_seen, "everything the first process had spooled was re-sent"
        assert metric(p2_port, "tagway_spans_dropped_total") == 0
    finally:
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful stop
    # count what landed, from a separate process (this one may hold another chDB directory)
    out = subprocess.run([sys.executable, "-c", (
        "import json,sys; from exporters.store import connect;"
        f"s=connect('chdb://{data_dir}/clickhouse');"
        "print(json.dumps([r['trace_id'] for r in s.query(\"SELECT trace_id FROM llm_calls WHERE customer='kill'\")]))")],
        capture_output=True, text=True, check=True, cwd=os.getcwd())
    stored = json.loads(out.stdout)
    assert len(stored) == len(set(stored)), "no call stored twice"
    assert len(stored) == resent, "rows stored == spans re-sent from the spool"
    assert set(stored) <= set(answered), "only calls that really happened"
    assert not os.listdir(spool) or all(not f.endswith(".spool") for f in os.listdir(spool))


def test_sigterm_flushes_everything_queued(tmp_path):
    port = free_port()
    data_dir = str(tmp_path / "data")
    cfg_path = tmp_path / "t.yaml"
    write_config(cfg_path, port, {"data_dir": data_dir})
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["recording"] = {"batch_max_seconds": 60, "batch_max_rows": 10_000}  # nothing leaves before the signal
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = start(str(cfg_path), port)
    ids = []
    try:
        with httpx.Client(timeout=5) as c:
            for _ in range(50):
                r = c.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                           json={"model": "m", "messages": [{"role": "user", "content": "bye"}]})
                ids.append(r.headers["x-tagway-trace-id"])
        assert metric(port, "tagway_spans_exported_total") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    out = subprocess.run([sys.executable, "-c", (
        "import json; from exporters.store import connect;"
        f"s=connect('chdb://{data_dir}/clickhouse');"
        "print(json.dumps([r['trace_id'] for r in s.query('SELECT trace_id FROM llm_calls')]))")],
        capture_output=True, text=True, check=True)
    assert sorted(json.loads(out.stdout)) == sorted(ids)


def test_second_process_on_the_same_embedded_store_fails_clearly(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "a.yaml", port, {"data_dir": str(tmp_path / "data")})
    first = start(cfg, port)
    try:
        other = write_config(tmp_path / "b.yaml", free_port(), {"data_dir": str(tmp_path / "data")})
        r = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", other], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another process" in lines[0] and "Traceback" not in r.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
