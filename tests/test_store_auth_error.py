"""A wrong ClickHouse password (the usual first mistake with compose.yaml) is told in tagway's own log and on
/readyz, with the password redacted; calls keep working and their spans wait in the spool."""
from __future__ import annotations

import logging
import os
import time

import httpx
import openai

from exporters.recording import start_recording
from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from tests.fake_clickhouse import WrongPasswordClickHouse
from tests.gateway_fixture import KEYS, UPSTREAM_KEY, GatewayServer, gateway_config


def test_wrong_password_is_in_the_log_and_on_readyz(tmp_path, caplog, upstream):
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    with WrongPasswordClickHouse() as ch, caplog.at_level(logging.ERROR, logger="exporters"):
        recorder = start_recording(dsn=ch.dsn(), spool_dir=str(tmp_path / "spool"), batch_max_seconds=0.2,
                                   retry_min_seconds=30)
        server = GatewayServer(TagwayApp(GatewayConfig(**gateway_config(upstream.base_url)), recorder=recorder)).start()
        try:
            deadline = time.monotonic() + 10  # the exporter's thread reaches ClickHouse right after start-up
            while (ready := httpx.get(server.url + "/readyz")).json().get("recording") != "degraded":
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.05)
            assert ready.status_code == 200  # still in rotation: spans go to the spool
            assert "Authentication failed" in ready.json()["reason"] and "wrong-password" not in ready.text
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["acme"], max_retries=0)
            client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
        finally:
            server.stop()
            recorder.shutdown()
    assert "Authentication failed" in caplog.text and "wrong-password" not in caplog.text
    assert recorder.metrics.get("spans_spooled") == 1 and recorder.metrics.get("spans_dropped") == 0
