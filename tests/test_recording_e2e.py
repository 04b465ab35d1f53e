"""Every call through the real gateway becomes one `llm_calls` row in ClickHouse (chDB), including failed,
rejected, fallback, cut and cancelled calls; a ClickHouse outage loses nothing."""
from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anthropic
import httpx
import openai
import pytest

from exporters.store import Store, StoreError
from tests.gateway_fixture import KEYS, recorded_gateway

MSG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]


class SwitchableStore:
    """The real chDB store, except that while `down` is set every insert fails like a refused connection."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.down = threading.Event()
        self.failed_inserts = 0

    def insert_json_rows(self, table: str, body: bytes, settings: dict | None = None) -> None:
        if self.down.is_set():
            self.failed_inserts += 1
            raise StoreError("ClickHouse unreachable: [Errno 111] Connection refused (simulated)")
        self._store.insert_json_rows(table, body, settings)

    def ping(self) -> bool:
        return not self.down.is_set() and self._store.ping()

    def close(self) -> None:
        pass  # the session's store outlives this test

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture(scope="module")
def recorded(upstream, chdb_store, tmp_path_factory):
    store = SwitchableStore(chdb_store)
    with recorded_gateway(upstream, store, str(tmp_path_factory.mktemp("spool")), retry_max_seconds=0.5) as server:
        server.store = store
        yield server


def rows_for(store: Store, trace_ids: list[str]) -> dict[str, dict]:
    rows = store.query("SELECT * FROM llm_calls WHERE trace_id IN {ids:Array(String)}", parameters={"ids": trace_ids})
    out: dict[str, dict] = {}
    for r in rows:
        assert r["trace_id"] not in out, f"duplicate llm_calls row for {r['trace_id']}"
        out[r["trace_id"]] = r
    return out


def call(gw, model: str, key: str = KEYS["platform"], customer: str = "", **kw) -> str:
    headers = {"authorization": f"Bearer {key}", "x-tagway-intent": "refund", "x-tagway-tags": "region=eu"}
    if customer:
        headers["x-tagway-customer"] = customer
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": model, "messages": MSG, **kw}, headers=headers,
                   timeout=20)
    return r.headers["x-tagway-trace-id"]


def test_every_kind_of_call_is_one_typed_row(recorded, chdb_store):
    cust = f"rec-{uuid.uuid4().hex[:8]}"
    c = openai.OpenAI(base_url=recorded.url + "/v1", api_key=KEYS["platform"], max_retries=0,
                      default_headers={"x-tagway-customer": cust, "x-tagway-intent": "refund",
                                       "x-tagway-prompt-version": "refund-v4", "x-tagway-tags": "region=eu,tier=pro"})
    ids: dict[str, str] = {}
    ids["ok"] = c.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG).headers["x-tagway-trace-id"]
    raw = c.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, stream=True)
    list(raw.parse())
    ids["stream"] = raw.headers["x-tagway-trace-id"]
    ids["fallback"] = c.chat.completions.with_raw_response.create(model="flaky", messages=MSG).headers[
        "x-tagway-trace-id"]
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model="broken", messages=MSG)
    ids["failed"] = e.value.response.headers["x-tagway-trace-id"]
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=MSG)
    ids["unknown_model"] = e.value.response.headers["x-tagway-trace-id"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=recorded.url + "/v1", api_key="tw-bad", max_retries=0).chat.completions.create(
            model="gpt-test", messages=MSG)
    ids["bad_key"] = e.value.response.headers["x-tagway-trace-id"]
    raw = c.chat.completions.with_raw_response.create(model="cut", messages=MSG, stream=True)
    with pytest.raises(openai.APIError):
        list(raw.parse())
    ids["cut"] = raw.headers["x-tagway-trace-id"]
    with httpx.Client(base_url=recorded.url, timeout=10) as h:
        with h.stream("POST", "/v1/chat/completions", json={"model": "slowstream", "messages": MSG, "stream": True},
                      headers={"authorization": f"Bearer {KEYS['platform']}", "x-tagway-customer": cust}) as r:
            ids["cancelled"] = r.headers["x-tagway-trace-id"]
            next(r.iter_raw())
    time.sleep(0.5)  # the cancelled stream's span ends when the server notices the hang-up
    assert recorded.recorder.force_flush()
    rows = rows_for(chdb_store, list(ids.values()))
    assert set(rows) == set(ids.values()), "every call, whatever its outcome, has exactly one row"
    ok = rows[ids["ok"]]
    assert (ok["customer"], ok["intent"], ok["prompt_version"], ok["tags"]) == (cust, "refund", "refund-v4",
                                                                                {"region": "eu", "tier": "pro"})
    assert (ok["status"], ok["error_type"], ok["http_status"]) == ("ok", "", 200)
    assert (ok["input_tokens"], ok["output_tokens"]) == (11, 2)
    assert ok["cost_usd"] == pytest.approx(11e-6 + 2 * 2e-6)
    assert ok["model_requested"] == "gpt-test" and ok["model_served"] == "ok-model-2026"
    assert ok["provider"] == "openai" and ok["operation"] == "chat" and ok["key_id"] == "platform-1"
    assert ok["source"] == "production" and ok["latency_ms"] > 0 and ok["ttft_ms"] is None
    assert '"content":"hello"' in ok["request_json"] and "Be brief." in ok["system_instructions"]
    assert "Echo: hello" in ok["response_json"]
    st = rows[ids["stream"]]
    assert st["stream"] is True and st["ttft_ms"] > 0 and st["output_tokens"] == 2
    fb = rows[ids["fallback"]]
    assert (fb["status"], fb["attempts"], fb["deployment"], fb["model_requested"]) == ("ok", 2, "gpt-test", "flaky")
    failed = rows[ids["failed"]]
    assert (failed["status"], failed["error_type"], failed["http_status"]) == ("error", "http_500", 500)
    nf = rows[ids["unknown_model"]]
    assert (nf["status"], nf["error_type"], nf["http_status"], nf["customer"]) == ("error", "model_not_found", 404, cust)
    bad = rows[ids["bad_key"]]
    assert (bad["status"], bad["error_type"], bad["http_status"], bad["customer"]) == ("error", "invalid_api_key", 401, "")
    assert (rows[ids["cut"]]["status"], rows[ids["cut"]]["error_type"]) == ("error", "stream_cut")
    cancelled = rows[ids["cancelled"]]
    assert (cancelled["status"], cancelled["error_type"], cancelled["client_disconnected"]) == (
        "cancelled", "client_disconnected", True)
    # the fallback's attempts are child spans in otel_traces, under the call span
    spans = chdb_store.query("SELECT SpanAttributes['tagway.kind'] AS kind, SpanAttributes['error.type'] AS err,"
                             " ParentSpanId != '' AS child FROM otel_traces WHERE TraceId = {t:String}"
                             " ORDER BY Timestamp", parameters={"t": ids["fallback"]})
    assert sorted((s["kind"], s["err"], bool(s["child"])) for s in spans) == [
        ("attempt", "", True), ("attempt", "http_503", True), ("call", "", False)]


EXPECTED_OTEL_TRACES = [
    ("Timestamp", "DateTime64(9)"), ("TraceId", "String"), ("SpanId", "String"), ("ParentSpanId", "String"),
    ("TraceState", "String"), ("SpanName", "LowCardinality(String)"), ("SpanKind", "LowCardinality(String)"),
    ("ServiceName", "LowCardinality(String)"), ("ResourceAttributes", "Map(LowCardinality(String), String)"),
    ("ScopeName", "String"), ("ScopeVersion", "String"), ("SpanAttributes", "Map(LowCardinality(String), String)"),
    ("Duration", "UInt64"), ("StatusCode", "LowCardinality(String)"), ("StatusMessage", "String"),
    ("Events.Timestamp", "Array(DateTime64(9))"), ("Events.Name", "Array(LowCardinality(String))"),
    ("Events.Attributes", "Array(Map(LowCardinality(String), String))"), ("Links.TraceId", "Array(String)"),
    ("Links.SpanId", "Array(String)"), ("Links.TraceState", "Array(String)"),
    ("Links.Attributes", "Array(Map(LowCardinality(String), String))"),
]


def test_a_stream_cut_short_is_billed_at_estimated_counts(upstream, chdb_store, tmp_path, chdb_dsn):
    """The provider bills a stream that broke off for its prompt and what it generated; without a usage chunk the
    call was recorded with no tokens and no cost, so stats and budgets counted it free. Its counts are now
    estimated (~4 characters a token, a few tokens a message), priced, and marked as estimates in `tagway show`."""
    from typer.testing import CliRunner  # noqa: PLC0415
    import typer  # noqa: PLC0415
    from gateway import stats_cli  # noqa: PLC0415

    cust = f"cut-{uuid.uuid4().hex[:8]}"
    priced = {"name": "cut-priced", "model": "cut-priced", "provider": "openai", "base_url": upstream.base_url,
              "api_key_env": "TEST_UPSTREAM_KEY", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    long = "word " * 400  # 2,000 characters -> 500 tokens
    with recorded_gateway(upstream, chdb_store, str(tmp_path / "spool"), models=[priced]) as gw:
        c = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["platform"], max_retries=0,
                          default_headers={"x-tagway-customer": cust})
        raw = c.chat.completions.with_raw_response.create(model="cut-priced", stream=True, messages=[
            {"role": "user", "content": long}])
        with pytest.raises(openai.APIError):
            list(raw.parse())
        tid = raw.headers["x-tagway-trace-id"]
        assert gw.recorder.force_flush()
    row = rows_for(chdb_store, [tid])[tid]
    assert (row["error_type"], row["input_tokens"], row["output_tokens"]) == ("stream_cut", 500 + 6, 2)
    assert row["cost_usd"] == pytest.approx(506e-6 + 2 * 2e-6)
    app = typer.Typer()
    stats_cli.register(app)
    shown = CliRunner().invoke(app, ["show", tid, "--dsn", chdb_dsn], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "506 in / 2 out (estimated: the stream gave no count of its own)" in shown.stdout


@pytest.fixture(scope="module")
def priced_streams(upstream, chdb_store, tmp_path_factory):
    """A gateway with priced Responses and Anthropic Messages models, each in a version whose upstream breaks off
    after the first text delta (cut-*) and one that streams slowly enough for a client to hang up (slowstream-*)."""
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, "api_key_env": "TEST_UPSTREAM_KEY"}
    oa = {"provider": "openai", "base_url": upstream.base_url, **prices}
    claude = {"provider": "anthropic", "base_url": upstream.base_url.rsplit("/v1", 1)[0], **prices}
    models = [{"name": "resp-cut", "model": "cut-resp", **oa}, {"name": "resp-slow", "model": "slowstream-resp", **oa},
              {"name": "claude-cut", "model": "cut-claude", **claude},
              {"name": "claude-slow", "model": "slowstream-claude", **claude}]
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("spool")), models=models) as gw:
        yield gw


def estimated_call(gw, store: Store, trace_id: str) -> tuple[dict, str]:
    """The recorded call's row, and its span's `tagway.usage.estimated` (a call the client left ends once the
    gateway sees it gone: waited for)."""
    deadline = time.monotonic() + 10
    while True:
        assert gw.recorder.force_flush()
        row = rows_for(store, [trace_id]).get(trace_id)
        if row is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row is not None, f"call {trace_id} was not recorded"
    marks = store.query("SELECT SpanAttributes['tagway.usage.estimated'] AS e FROM otel_traces WHERE TraceId = "
                        "{id:String} AND SpanAttributes['tagway.kind'] = 'call'", parameters={"id": trace_id})
    return row, marks[0]["e"]


LONG = "word " * 400  # 2,000 characters -> 500 tokens


@pytest.mark.parametrize("how", ["upstream breaks off", "client hangs up"])
def test_a_responses_stream_cut_short_is_billed_at_estimated_counts(priced_streams, chdb_store, how):
    """A Responses stream cut before its last event (which alone carries usage) was recorded with no tokens and
    cost $0, so budgets missed it. It is billed as chat's is: the prompt (~4 characters a token, 3 a message and
    3 for the reply) and what was streamed so far, priced, marked as an estimate."""
    c = openai.OpenAI(base_url=priced_streams.url + "/v1", api_key=KEYS["platform"], max_retries=0,
                      default_headers={"x-tagway-customer": f"cutr-{uuid.uuid4().hex[:8]}"})
    model = "resp-cut" if how == "upstream breaks off" else "resp-slow"
    raw = c.responses.with_raw_response.create(model=model, input=LONG, stream=True)
    stream = raw.parse()
    if how == "upstream breaks off":
        with pytest.raises(openai.APIError, match="Upstream stream failed"):
            list(stream)
    else:
        for event in stream:
            if event.type == "response.output_text.delta":
                break  # "Echo:" arrived; the rest comes 0.3 s a word
        stream.close()
    row, estimated = estimated_call(priced_streams, chdb_store, raw.headers["x-tagway-trace-id"])
    error = "stream_cut" if how == "upstream breaks off" else "client_disconnected"
    # prompt: 500 tokens + 3 for the one input item + 3 for the reply; output: "Echo:" -> 2
    assert (row["error_type"], row["input_tokens"], row["output_tokens"], estimated) == (error, 506, 2, "true")
    assert row["cost_usd"] == pytest.approx(506e-6 + 2 * 2e-6)


@pytest.mark.parametrize("how", ["upstream breaks off", "client hangs up"])
def test_an_anthropic_messages_stream_cut_short_is_billed_at_estimated_counts(priced_streams, chdb_store, how):
    """An Anthropic stream cut before message_delta (which carries the output count) was recorded at
    message_start's stub (1 output token). The prompt count message_start gave is kept (the provider's, 11 here);
    the output is estimated from what was streamed, priced, and the call marked as an estimate."""
    c = anthropic.Anthropic(base_url=priced_streams.url, api_key=KEYS["platform"], max_retries=0,
                            default_headers={"x-tagway-customer": f"cutm-{uuid.uuid4().hex[:8]}"})
    model = "claude-cut" if how == "upstream breaks off" else "claude-slow"
    raw = c.messages.with_raw_response.create(model=model, max_tokens=64, system="Be brief.", stream=True,
                                              messages=[{"role": "user", "content": LONG}])
    stream = raw.parse()
    if how == "upstream breaks off":
        with pytest.raises(anthropic.APIError, match="Upstream stream failed"):
            list(stream)
    else:
        for event in stream:
            if event.type == "content_block_delta":
                break  # "Claude " arrived; the rest comes 0.3 s a word
        stream.close()
    row, estimated = estimated_call(priced_streams, chdb_store, raw.headers["x-tagway-trace-id"])
    error = "stream_cut" if how == "upstream breaks off" else "client_disconnected"
    # output: "Claude " (7 characters) -> 2 tokens, over message_start's stub of 1
    assert (row["error_type"], row["input_tokens"], row["output_tokens"], estimated) == (error, 11, 2, "true")
    assert row["cost_usd"] == pytest.approx(11e-6 + 2 * 2e-6)


def test_prompt_estimates_of_responses_and_messages_requests():
    """Without a count from the stream, the prompt is estimated from what the request sends: a Responses call's
    instructions and input items, an Anthropic call's system and messages (their ids and inline data left out)."""
    from gateway.usage_estimate import estimate_prompt_tokens  # noqa: PLC0415

    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    resp = {"instructions": "x" * 40, "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "y" * 40}, image]},
        {"type": "function_call_output", "call_id": "call_123", "output": "z" * 20}]}
    assert estimate_prompt_tokens(resp, "responses") == 25 + 3 * (3 + 1)  # 100 characters, 2 items + instructions
    assert estimate_prompt_tokens({"input": "y" * 40}, "responses") == 10 + 3 * 2
    msgs = {"system": [{"type": "text", "text": "x" * 40}], "messages": [{"role": "user", "content": [
        {"type": "text", "text": "y" * 40}, {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                        "data": "QUJD" * 1000}}]}]}
    assert estimate_prompt_tokens(msgs, "messages") == 20 + 3 * (2 + 1)


def test_otel_traces_has_the_collector_columns(chdb_store):
    got = [(r["name"], r["type"]) for r in chdb_store.query("DESCRIBE TABLE otel_traces")]
    assert got == EXPECTED_OTEL_TRACES
    helper = [(r["name"], r["type"]) for r in chdb_store.query("DESCRIBE TABLE otel_traces_trace_id_ts")]
    assert helper == [("TraceId", "String"), ("Start", "DateTime"), ("End", "DateTime")]


def spans_metrics(recorded) -> dict[str, float]:
    metrics = httpx.get(recorded.url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("tagway_spans_") and not line.startswith("#")}


def test_clickhouse_outage_while_traffic_flows_loses_nothing(recorded, chdb_store):
    cust = f"outage-{uuid.uuid4().hex[:8]}"
    m = recorded.recorder.metrics
    spooled_before = m.snapshot()["spans_spooled"] if hasattr(m, "snapshot") else None
    spooled_at_start = spans_metrics(recorded)["tagway_spans_spooled_total"]
    recorded.store.down.set()
    try:
        during = [call(recorded, "gpt-test", customer=cust) for _ in range(30)]
        deadline = time.monotonic() + 10
        while (recorded.store.failed_inserts == 0 or httpx.get(recorded.url + "/readyz").json()["recording"] != "degraded"
               ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert recorded.store.failed_inserts > 0, "the exporter must have tried (and failed) while ClickHouse was down"
        # every call of the outage goes through a failed insert before ClickHouse is back (else a span still waiting
        # for its batch is inserted directly, never spooled, and the spool counts below race the flush)
        deadline = time.monotonic() + 10
        while spans_metrics(recorded)["tagway_spans_spooled_total"] - spooled_at_start < 30 \
                and time.monotonic() < deadline:
            recorded.recorder.force_flush()
            time.sleep(0.05)
        ready = httpx.get(recorded.url + "/readyz").json()
        # calls keep flowing: the spool absorbs it; /readyz says why
        assert ready == {"status": "ready", "recording": "degraded",
                         "reason": "ClickHouse unreachable: [Errno 111] Connection refused (simulated)"}
    finally:
        recorded.store.down.clear()
    after = [call(recorded, "gpt-test", customer=cust) for _ in range(10)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        recorded.recorder.force_flush()
        if len(rows_for(chdb_store, during + after)) == 40:
            break
        time.sleep(0.2)
    rows = rows_for(chdb_store, during + after)  # also asserts no duplicates
    assert httpx.get(recorded.url + "/readyz").json() == {"status": "ready", "recording": "ok"}  # error cleared
    assert set(rows) == set(during + after)
    metrics = httpx.get(recorded.url + "/metrics").text
    assert "tagway_spans_dropped_total 0" in metrics
    values = spans_metrics(recorded)
    assert values["tagway_spans_spooled_total"] >= 30 and values["tagway_spans_resent_total"] >= 30
    if spooled_before is not None:
        assert values["tagway_spans_spooled_total"] - spooled_before >= 30


def test_readyz_says_when_spool_writes_fail_and_the_calls_are_kept(recorded, monkeypatch):
    """ClickHouse down and the spool's disk full: where the pipeline may lose spans. /readyz says so first (it said
    only that ClickHouse was down), and stops saying it once nothing needs the spool; the call made meanwhile was
    kept (it used to be dropped) and is stored once ClickHouse answers."""
    import errno  # noqa: PLC0415

    from exporters import spool as spool_mod  # noqa: PLC0415

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    directory = recorded.recorder.spool.directory
    monkeypatch.setattr(spool_mod, "_write_all", full)
    recorded.store.down.set()
    try:
        kept = call(recorded, "gpt-test", customer=f"full-{uuid.uuid4().hex[:8]}")
        deadline = time.monotonic() + 10
        while "spool writes" not in (ready := httpx.get(recorded.url + "/readyz").json()).get("reason", "") \
                and time.monotonic() < deadline:
            recorded.recorder.force_flush()
            time.sleep(0.05)
        assert ready == {"status": "ready", "recording": "degraded",
                         "reason": f"spool writes failing (disk full at {directory}): spans that cannot be inserted "
                                   "are kept in memory (up to recording.queue_max_bytes, then dropped, counted in "
                                   "/metrics) until it has room"}
    finally:
        recorded.store.down.clear()
        monkeypatch.undo()
    monkeypatch.setattr(spool_mod, "WRITE_ERROR_SECONDS", 0.0)  # news for a minute in production
    deadline = time.monotonic() + 20
    while httpx.get(recorded.url + "/readyz").json() != {"status": "ready", "recording": "ok"} \
            and time.monotonic() < deadline:
        call(recorded, "gpt-test")
        recorded.recorder.force_flush()
        time.sleep(0.1)
    assert httpx.get(recorded.url + "/readyz").json() == {"status": "ready", "recording": "ok"}
    assert recorded.recorder.force_flush() and set(rows_for(recorded.store, [kept])) == {kept}
