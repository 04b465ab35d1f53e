"""Run the real gateway app under uvicorn on 127.0.0.1 in a background thread, against the test upstream.

Spans go to the OpenTelemetry SDK's in-memory exporter here, so gateway tests can assert exactly what was stamped;
the ClickHouse recording path has its own tests with chDB.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any, Iterator

import pytest
import uvicorn
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from tests.http_server import free_port
from tests.upstream import Upstream

UPSTREAM_KEY = "sk-upstream-secret-should-never-leak"
KEYS = {
    "acme": "tw-test-acme-0123456789abcdefghijklmnop",
    "globex": "tw-test-globex-0123456789abcdefghijklmno",
    "platform": "tw-test-platform-0123456789abcdefghijklm",
    "support": "tw-test-support-0123456789abcdefghijklmn",
    "revoked": "tw-test-revoked-0123456789abcdefghijklmn",
}
ADMIN_KEY = "tw-test-admin-0123456789abcdefghijklmnopq"


class MemoryRecorder:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(resource=Resource.create({"service.name": "tagway"}))
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.tracer_provider.get_tracer(sc.SCOPE_NAME)
        self.store = None

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()

    def spans(self, trace_id: str) -> list[Any]:
        return [s for s in self.exporter.get_finished_spans() if f"{s.context.trace_id:032x}" == trace_id]

    def call(self, trace_id: str, timeout: float = 5.0) -> Any:
        """The call span of a trace (waits briefly: spans end after the last byte is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            calls = [s for s in self.spans(trace_id) if s.attributes.get(sc.KIND) == "call"]
            if calls or time.monotonic() > deadline:
                assert len(calls) == 1, f"expected one call span for {trace_id}, got {len(calls)}"
                return calls[0]
            time.sleep(0.01)


_HELD: list[socket.socket] = []


def refusing_port() -> int:
    """A port that refuses connections for the rest of the session: bound and never listening, so no server started
    later can take it (a port free_port() found free was once taken by the gateway under test, which answered the
    'down' model's call with a 401)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _HELD.append(s)
    return s.getsockname()[1]


def gateway_config(upstream_base: str, **overrides: Any) -> dict:
    root = upstream_base.rsplit("/v1", 1)[0]
    openai = {"provider": "openai", "base_url": upstream_base, "api_key_env": "TEST_UPSTREAM_KEY"}
    cfg = {
        "models": [
            {"name": "gpt-test", "model": "ok-model", **openai, "input_cost_per_token": 1e-6,
             "output_cost_per_token": 2e-6},
            {"name": "gpt-4o-mini", "model": "ok-4o-mini", **openai},
            {"name": "flaky", "model": "fail503-a", **openai, "fallbacks": ["gpt-test"]},
            {"name": "rate-limited", "model": "fail429-a", **openai, "fallbacks": ["flaky"]},
            {"name": "rate-limited-alone", "model": "fail429-b", **openai},
            {"name": "broken", "model": "fail500-a", **openai},
            {"name": "provider-key-bad", "model": "fail401-a", **openai},
            {"name": "provider-forbids", "model": "fail403-a", **openai, "fallbacks": ["gpt-test"]},
            {"name": "bad-request", "model": "fail400-a", **openai, "fallbacks": ["gpt-test"]},
            {"name": "garbage", "model": "garbage-a", **openai},
            {"name": "slow", "model": "slow-a", **openai, "timeout": 0.5, "fallbacks": ["gpt-test"]},
            {"name": "slow-alone", "model": "slow-b", **openai, "timeout": 0.5},
            {"name": "down", "model": "ok-x", "provider": "openai", "base_url": f"http://127.0.0.1:{refusing_port()}/v1",
             "fallbacks": ["gpt-test"]},
            {"name": "cut", "model": "cut-a", **openai},
            {"name": "midstream-error", "model": "midstreamerror-a", **openai},
            {"name": "error-end", "model": "errorend-a", **openai},
            {"name": "slowstream", "model": "slowstream-a", **openai},
            {"name": "tools", "model": "tools-a", **openai},
            {"name": "embed", "model": "ok-embed", **openai},
            {"name": "json-stream", "model": "jsonstream-a", **openai},
            {"name": "sse-whole", "model": "ssewhole-a", **openai},
            {"name": "bad-json", "model": "badjson-a", **openai},
            {"name": "bad-json-fb", "model": "badjson-b", **openai, "fallbacks": ["gpt-test"]},
            {"name": "claude", "provider": "anthropic", "model": "claude-test", "base_url": root,
             "api_key_env": "TEST_UPSTREAM_KEY", "input_cost_per_token": 3e-6, "output_cost_per_token": 1.5e-5},
            {"name": "mock", "provider": "mock", "mock": {"reply": "hello from mock"}},
        ],
        "tenants": [
            {"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEYS["acme"])},
                                          {"id": "acme-old", "hash": hash_key(KEYS["revoked"]), "revoked": True}]},
            {"customer": "globex", "allowed_models": ["gpt-test"], "capture_content": False,
             "keys": [{"id": "globex-1", "hash": hash_key(KEYS["globex"])}]},
            {"customer": "platform", "may_set_customer": True,
             "keys": [{"id": "platform-1", "hash": hash_key(KEYS["platform"])}]},
            {"customer": "support-bot", "tags": {"intent": "support"},
             "keys": [{"id": "support-1", "hash": hash_key(KEYS["support"]), "tags": {"team": "cx"}}]},
        ],
        "admin_key_hash": hash_key(ADMIN_KEY),
        "server": {"max_body_bytes": 64 * 1024},
        "taxonomy": {"keys": {"region": {"values": ["eu", "us"]}, "team": {}, "feature": {}}, "unknown": "keep"},
    }
    cfg.update(overrides)
    return cfg


class GatewayServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, lifespan="on",
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "GatewayServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def recorded_gateway(upstream: Upstream, store: Any, spool_dir: str, *, providers: dict[str, Any] | None = None,
                     models: list[dict] | None = None, config: dict | None = None,
                     **recording: Any) -> Iterator[GatewayServer]:
    """The test gateway recording for real (durable processor, spool) into `store`, e.g. the session's chDB.
    `models` are added to the test models; `providers` (provider name -> e.g. a HandlerProvider) serve them;
    `config` replaces top-level settings (tenants, cooldown, ...)."""
    from exporters.recording import start_recording  # noqa: PLC0415
    from gateway.providers import ProviderRegistry  # noqa: PLC0415

    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    recorder = start_recording(dsn=store.dsn, spool_dir=spool_dir, store=store,
                               **{"batch_max_seconds": 0.2, **recording})
    cfg = gateway_config(upstream.base_url)
    cfg["models"] = [*cfg["models"], *(models or [])]
    cfg.update(config or {})
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=recorder,
                                     providers=ProviderRegistry(overrides=providers))).start()
    server.recorder = recorder
    try:
        yield server
    finally:
        server.stop()
        recorder.shutdown()


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    up = Upstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def gateway(upstream: Upstream) -> GatewayServer:
    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    recorder = MemoryRecorder()
    app = TagwayApp(GatewayConfig(**gateway_config(upstream.base_url)), recorder=recorder)
    server = GatewayServer(app).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()
