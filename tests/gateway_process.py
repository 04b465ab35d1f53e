"""The real `tagway serve` as a subprocess on a store of its own, for tests that need the gateway as users run it
(embedded chDB, spool, signals). No tests here."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import yaml

from exporters.remote_store import decode_value

from tests.http_server import free_port

ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "NO_COLOR": "1"}
ENV.pop("TAGWAY_DSN", None)
ENV.pop("TAGWAY_VERBOSE", None)


class GatewayProcess:
    """`config` is the YAML config as a dict; `server.port`, `storage.data_dir` and a short batch interval are
    filled in unless given. `env` adds to the environment (e.g. provider keys)."""

    def __init__(self, tmp_path: Any, config: dict, *, env: dict[str, str] | None = None) -> None:
        self.port = config.setdefault("server", {}).setdefault("port", free_port())
        config["server"].setdefault("host", "127.0.0.1")
        config.setdefault("storage", {}).setdefault("data_dir", str(tmp_path / "data"))
        config.setdefault("recording", {}).setdefault("batch_max_seconds", 0.2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = str(tmp_path / "tagway.yaml")
        self.stderr_path = str(tmp_path / "gateway.stderr.log")  # a file: an undrained pipe fills with access lines
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.env = {**ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "GatewayProcess":
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", self.config_path],
                                         stdout=subprocess.DEVNULL, stderr=err, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.stderr()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError("gateway did not become ready")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> str:
        """Stop the gateway; returns what it wrote on stderr."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.stderr()

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    def get(self, path: str, key: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kw)

    def call_row(self, trace_id: str, admin_key: str, timeout: float = 15) -> dict:
        """The llm_calls row of a call, through the admin API (waits for the batch to be written)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/admin/calls/{trace_id}", admin_key)
            if r.status_code == 200 or time.monotonic() > deadline:
                assert r.status_code == 200, r.text
                return r.json()
            time.sleep(0.1)

    def query(self, sql: str, admin_key: str, **params: Any) -> list[dict]:
        """A read through the gateway's loopback store API (the admin key may use it)."""
        r = httpx.post(f"{self.url}/admin/store/query", json={"sql": sql, "parameters": params},
                       headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        assert r.status_code == 200, r.text
        d = r.json()
        return [dict(zip(d["columns"], decode_value(row))) for row in d["rows"]]

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**self.env, "TAGWAY_CONFIG": self.config_path})


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        base, _, rest = head.partition("{")
        if base == name and not line.startswith("#") and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return float(value)
    return 0.0
