"""`tagway serve`'s operational log: tagway's own lines (`tagway.*`, `exporters.*`) and uvicorn's share one format
with a UTC time, level and logger, in the access log's format (text, or one JSON object a line that an access line
can be told from), at `--log-level`, in every worker of `--workers N` too. They were bare messages with no time or
level, and `--log-level` reached uvicorn only (tagway's INFO lines never appeared). Through the real `tagway serve`
(one process, and two workers), real upstreams on 127.0.0.1 and the openai SDK."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import time

import openai
import orjson
import pytest
import yaml

from gateway.auth import hash_key
from tests.gateway_process import ENV
from tests.http_server import free_port
from tests.test_serve_cli import wait_ready
from tests.upstream import Upstream

KEY = "tw-oplog-acme-0123456789abcdefghijklmnopq"
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
OPERATIONAL = re.compile(rf"^{STAMP} (TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): \S")


@pytest.fixture(scope="module")
def upstream():
    up = Upstream().start()
    yield up
    up.stop()


def _serve(tmp_path, models: list[dict], *args: str, **extra) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    cfg = {"server": {"host": "127.0.0.1", "port": port}, "storage": {"data_dir": str(tmp_path / "data")},
           "models": models, "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEY)}]}],
           **extra}
    path = tmp_path / "tagway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    err = str(tmp_path / "stderr.log")
    with open(err, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path), *args],
                                stdout=subprocess.DEVNULL, stderr=f, env={**ENV, "UP_KEY": "sk-up"})
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url, err


def _unpriced(upstream: Upstream, name: str = "chat", **more) -> dict:
    """A model with no price: the gateway warns about it at start (logger `tagway`)."""
    return {"name": name, "provider": "openai", "model": "ok-unpriced", "base_url": upstream.base_url,
            "api_key_env": "UP_KEY", **more}


def _call(url: str, model: str = "chat") -> str:
    raw = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == "Echo: hi"
    return raw.headers["x-tagway-trace-id"]


def _stop(proc: subprocess.Popen, err: str) -> str:
    proc.terminate()
    proc.wait(60)
    return open(err).read()


def test_text_lines_have_time_level_and_logger_and_log_level_reaches_tagway(tmp_path, upstream):
    """A deployment that cannot be reached cools down (a WARNING of tagway's) and, once it answers, says so at INFO:
    a line `--log-level info` showed only for uvicorn."""
    flaky = Upstream()  # its port is free until it starts: connection refused, a failure the fallback takes over
    models = [_unpriced(flaky, "flaky", fallbacks=["chat"]), _unpriced(upstream)]
    proc, url, err = _serve(tmp_path, models, "--log-level", "info", cooldown={"after_failures": 1, "seconds": 0.2})
    try:
        first = _call(url, "flaky")  # answered by the fallback
        with flaky:
            time.sleep(0.3)  # the cooldown is over: the next call tries it again, and it answers
            again = _call(url, "flaky")
    finally:
        text = _stop(proc, err)
    lines = text.splitlines()
    for line in lines:  # the CLI's own lines, an access line, or an operational line: nothing bare
        assert line.startswith(("tagway: serving on ", "time=")) or OPERATIONAL.match(line), line
    said = {(m.group(1), m.group(2)) for m in map(OPERATIONAL.match, lines) if m}
    assert {("WARNING", "tagway.cooldowns"), ("INFO", "tagway.cooldowns")} <= said, text  # tagway's INFO shows now
    assert ("INFO", "uvicorn.error") in said, text  # uvicorn's own lines, in the same format
    answers = [ln for ln in lines if "'flaky' answers again" in ln]
    assert len(answers) == 1 and re.match(rf"{STAMP} INFO tagway.cooldowns: deployment 'flaky' answers again",
                                          answers[0]), answers
    unpriced = [ln for ln in lines if "has no price" in ln]
    assert len(unpriced) == 2 and re.match(rf"{STAMP} WARNING tagway: model 'flaky' \(openai/ok-unpriced\) has no "
                                           "price", unpriced[0]), unpriced
    access = [ln for ln in lines if ln.startswith("time=")]  # access lines as they were
    assert len(access) == 2 and f"trace_id={first} " in access[0] and f"trace_id={again} " in access[1], access
    assert "Traceback" not in text


def test_json_lines_in_every_worker_and_apart_from_access_lines(tmp_path, upstream):
    proc, url, err = _serve(tmp_path, [_unpriced(upstream)], "--log-level", "info", "--workers", "2",
                            recording={"enabled": False}, access_log={"format": "json"})
    try:
        trace = _call(url)
    finally:
        text = _stop(proc, err)
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("tagway: serving on http://127.0.0.1:") and "with 2 workers" in lines[0], lines[0]
    ops, access = [], []
    for line in lines[1:]:
        obj = orjson.loads(line)  # every line after the CLI's first is one JSON object
        (ops if "level" in obj else access).append(obj)
    for obj in ops:
        assert set(obj) == {"time", "level", "logger", "message"}, obj
        assert re.fullmatch(STAMP, obj["time"]) and obj["level"] in ("INFO", "WARNING"), obj
    assert len(access) == 1 and access[0]["trace_id"] == trace and "logger" not in access[0], access
    said = [(o["level"], o["logger"], o["message"]) for o in ops]
    # each worker set up its own log (a spawned process inherits none of the parent's) at --log-level, and so did
    # the parent, which says what concerns them all once (the unpriced model: it was said once a worker)
    assert sum(1 for lv, lg, m in said if (lv, lg) == ("INFO", "tagway") and m.startswith("ready (pid ")) == 2, said
    assert sum(1 for lv, lg, m in said if (lv, lg) == ("WARNING", "tagway") and "has no price" in m) == 1, said
    assert sum(1 for lv, lg, m in said if (lv, lg) == ("INFO", "uvicorn.error")
               and m.startswith("Application startup complete")) == 2, said
    assert any(lg == "uvicorn.error" and m.startswith("Started parent process") for _, lg, m in said), said


def test_log_level_reaches_the_workers(tmp_path, upstream):
    """`--log-level error` quiets tagway's own warnings, as in one process (each worker's INFO lines: above)."""
    proc, url, err = _serve(tmp_path, [_unpriced(upstream)], "--log-level", "error", "--workers", "2",
                            recording={"enabled": False})
    try:
        _call(url)
    finally:
        text = _stop(proc, err)
    assert "has no price" not in text and "ready (pid" not in text and "trace_id=" in text, text


def test_an_exception_is_one_field_of_one_json_line():
    from gateway.observe import LogFormatter  # noqa: PLC0415

    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("tagway.proxy", logging.ERROR, __file__, 1, "internal error on %s", ("/v1/x",),
                                   sys.exc_info())
    line = LogFormatter(json=True).format(record)
    assert "\n" not in line
    obj = orjson.loads(line)
    assert obj["level"] == "ERROR" and obj["logger"] == "tagway.proxy" and obj["message"] == "internal error on /v1/x"
    assert obj["exception"].startswith("Traceback") and "ValueError: bad\nvalue" in obj["exception"]
    text = LogFormatter().format(record)
    assert re.match(rf"{STAMP} ERROR tagway.proxy: internal error on /v1/x\nTraceback", text), text
