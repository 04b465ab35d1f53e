"""SIGTERM with calls still running when `server.graceful_shutdown_seconds` has passed, through the real `tagway serve`,
a real upstream streaming SSE slowly on 127.0.0.1 and the openai SDK: a stream ends with an OpenAI-shaped error event
the SDK raises (it ended in a bare EOF, which the SDK reads as a complete answer), a whole call gets the 503
`gateway_shutting_down`, on a passed-through route (moderations) too; every cut call is recorded as cancelled and has
its access line, and the gateway logs one WARNING saying how many, not uvicorn's "Exception in ASGI application"
traceback (and, on a passed-through route, its plain-text 500) for each."""
from __future__ import annotations

import re
import threading
import time
from typing import Any

import openai
import pytest

from gateway.auth import hash_key
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

ADMIN = "tw-grace-admin-0123456789abcdefghijklmnop"
KEY = "tw-grace-acme-0123456789abcdefghijklmnopq"
LONG = " ".join(f"w{i}" for i in range(60))  # slowstream-*: 0.3 s a word, an 18 s answer
GRACE = 2.0


@pytest.fixture(scope="module")
def upstream():
    up = Upstream().start()
    yield up
    up.stop()


def _consume(what: str, create: Any, started: threading.Event, out: dict) -> None:
    """Read a stream to its end (or its error), as an application does; `out[what]` says how it ended."""
    got: dict[str, Any] = {"text": ""}
    out[what] = got
    try:
        raw = create()
        got["trace_id"] = raw.headers["x-tagway-trace-id"]
        for event in raw.parse():
            if what == "chat" and event.choices and event.choices[0].delta.content:
                got["text"] += event.choices[0].delta.content
            elif what == "responses" and event.type == "response.output_text.delta":
                got["text"] += event.delta
            if got["text"]:
                started.set()
        got["ended"] = "complete"  # the SDK saw the end of the stream and no error
    except Exception as e:  # noqa: BLE001 - what the application would see
        got["error"] = e
    finally:
        started.set()


def test_calls_cut_at_the_grace_deadline_get_an_error_and_are_recorded(tmp_path, upstream):
    cfg = {"admin_key_env": "TAGWAY_ADMIN_KEY", "server": {"graceful_shutdown_seconds": GRACE},
           "models": [{"name": "long", "provider": "openai", "model": "slowstream-long", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY", "input_cost_per_token": 0.001, "output_cost_per_token": 0.001},
                      {"name": "slow", "provider": "mock", "mock": {"reply": "late", "latency_ms": 30_000}},
                      {"name": "hangmod", "provider": "openai", "model": "hang-mod", "base_url": upstream.base_url,
                       "api_key_env": "UP_KEY"}],
           "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEY)}]}]}
    gw = GatewayProcess(tmp_path, cfg, env={"TAGWAY_ADMIN_KEY": ADMIN, "UP_KEY": "sk-up"}).start()
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    out: dict[str, Any] = {}
    chat_started, responses_started = threading.Event(), threading.Event()
    chat = threading.Thread(target=_consume, args=("chat", lambda: client.chat.completions.with_raw_response.create(
        model="long", stream=True, messages=[{"role": "user", "content": LONG}]), chat_started, out))
    responses = threading.Thread(target=_consume, args=("responses", lambda: client.responses.with_raw_response.create(
        model="long", stream=True, input=LONG), responses_started, out))

    def whole() -> None:
        try:
            out["whole"] = client.chat.completions.with_raw_response.create(
                model="slow", messages=[{"role": "user", "content": "hi"}])
        except Exception as e:  # noqa: BLE001
            out["whole"] = e

    def moderation() -> None:  # a passed-through route (gateway/passthrough.py)
        try:
            out["moderation"] = client.moderations.with_raw_response.create(model="hangmod", input="hi")
        except Exception as e:  # noqa: BLE001
            out["moderation"] = e

    calls = [chat, responses, threading.Thread(target=whole), threading.Thread(target=moderation)]
    try:
        for t in calls:
            t.start()
        assert chat_started.wait(30) and responses_started.wait(30), out
        time.sleep(0.3)  # the whole call and the moderation are in flight too
        sigterm = time.monotonic()
        err = gw.stop()
        took = time.monotonic() - sigterm
        for t in calls:
            t.join(30)
    finally:
        if gw.proc.poll() is None:
            gw.stop()
    assert GRACE - 0.2 < took < GRACE + 20, took  # the grace, not the 18 s streams

    # the streams: what had come, then the error the SDK raises, not a silent end read as the whole answer
    for what in ("chat", "responses"):
        got = out[what]
        assert got["text"].startswith("Echo: w0"), got
        assert "ended" not in got, f"{what}: the stream ended without an error after {got['text']!r}"
        e = got["error"]
        assert isinstance(e, openai.APIError) and not isinstance(e, openai.APIConnectionError), repr(e)
        assert e.code == "gateway_shutting_down" and e.type == "server_error", e.body
        assert "graceful_shutdown_seconds" in e.message
    whole_err = out["whole"]
    assert isinstance(whole_err, openai.InternalServerError) and whole_err.status_code == 503, repr(whole_err)
    assert whole_err.code == "gateway_shutting_down"
    whole_trace = whole_err.response.headers["x-tagway-trace-id"]
    moderation_err = out["moderation"]
    assert isinstance(moderation_err, openai.InternalServerError) and moderation_err.status_code == 503, \
        repr(moderation_err)
    assert moderation_err.code == "gateway_shutting_down"
    moderation_trace = moderation_err.response.headers["x-tagway-trace-id"]

    # the log: one WARNING for the four, no traceback
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    said = [ln for ln in err.splitlines() if "graceful_shutdown_seconds passed" in ln]
    assert len(said) == 1 and re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z WARNING tagway\.proxy: "
                                       r"server\.graceful_shutdown_seconds passed: 4 call\(s\) still running were cut",
                                       said[0]), said
    access = {m.group(1): ln for ln in err.splitlines() if (m := re.search(r" trace_id=(\w+) ", ln))}
    traces = [out["chat"]["trace_id"], out["responses"]["trace_id"], whole_trace, moderation_trace]
    assert all("error_type=cancelled" in access[t] for t in traces), access

    # recorded: the store the gateway wrote at shutdown has the four calls, cancelled, the streams billed
    gw.start()
    try:
        for trace in traces:
            row = gw.call_row(trace, ADMIN)
            assert row["error_type"] == "cancelled", row
        assert gw.call_row(out["chat"]["trace_id"], ADMIN)["usage_estimated"] is True
    finally:
        gw.stop()
