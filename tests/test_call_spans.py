"""gateway/telemetry.CallSpans builds each call's finished span itself instead of living through the SDK's
start_span / set_attributes / end. Whatever reads spans (the exporter's rows, an added OTLP exporter, the tests'
in-memory exporter) must get what the SDK's own lifecycle gives for the same call: compared here field by field,
with the same ids, on a call with a caller's traceparent, a failed fallback attempt and an error."""
from __future__ import annotations

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from exporters.recording import _provider, _tracer
from exporters.clickhouse import ClickHouseSpanExporter
from exporters.rows import INSERT_SETTINGS, EncodedBatch, attributes_to_strings, encode_spans, span_to_row
from tests.replay_support import unique
from gateway.telemetry import Attempt, CallRecord, CallSpans, call_attributes, span_name

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
START, END = 1_700_000_000_000_000_000, 1_700_000_000_900_000_000


class FixedIds(IdGenerator):
    """The same trace and span ids in both worlds."""

    def __init__(self) -> None:
        self.span = 0x10

    def generate_trace_id(self) -> int:
        return 0x1234ABCD

    def generate_span_id(self) -> int:
        self.span += 1
        return self.span

    def is_trace_id_random(self) -> bool:
        return True


def world():
    provider = _provider("tagway", {"deployment.environment": "test"})
    provider.id_generator = FixedIds()
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return _tracer(provider), spans


def record() -> CallRecord:
    r = CallRecord(operation="chat", start_ns=START, requested_model="gpt", customer="acme", intent="refund",
                   tags={"tier": "pro"}, finish_reasons=["stop"], input_tokens=12, output_tokens=3, cost_usd=1e-5,
                   temperature=0.2, input_messages='[{"role":"user","parts":[{"type":"text","content":"hi"}]}]')
    r.attempts.append(Attempt("a", "openai", "m-a", START + 100, START + 200, "http_503", 503, "up-a"))
    r.attempts.append(Attempt("b", "openai", "m-b", START + 300))
    r.fail("upstream_error", "boom", 502)
    return r


def the_sdk_way(tracer: trace.Tracer, r: CallRecord) -> None:
    """The SDK's own lifecycle of one call, as the gateway stamped calls before CallSpans."""
    ctx = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": TRACEPARENT}))
    span = tracer.start_span(r.operation, context=Context(), kind=SpanKind.CLIENT, start_time=START,
                             links=[Link(ctx.get_span_context(), {"tagway.link": "caller"})])
    span.update_name(span_name(r))
    span.set_attributes(call_attributes(r, (END - START) / 1e6))
    span.set_status(Status(StatusCode.ERROR, r.error_message))
    parent = trace.set_span_in_context(span)
    for i, at in enumerate(r.attempts):
        attrs = {"tagway.kind": "attempt", "gen_ai.operation.name": r.operation, "gen_ai.request.model": at.model,
                 "gen_ai.provider.name": at.provider, "tagway.deployment": at.deployment,
                 "tagway.model.requested": r.requested_model, "tagway.attempt": i + 1}
        attrs.update({"server.address": at.server_address} if at.server_address else {})
        attrs.update({"http.response.status_code": at.status} if at.status else {})
        attrs.update({"error.type": at.error_type} if at.error_type else {})
        child = tracer.start_span(f"{r.operation} {at.model}", context=parent, kind=SpanKind.CLIENT,
                                  start_time=at.start_ns, attributes=attrs)
        if at.error_type:
            child.set_status(Status(StatusCode.ERROR, at.error_type))
        child.end(end_time=at.end_ns or END)
    span.end(end_time=END)


def test_call_spans_hand_the_processor_what_the_sdk_would():
    sdk_tracer, sdk_spans = world()
    the_sdk_way(sdk_tracer, record())
    tracer, spans = world()
    calls = CallSpans(tracer)
    ids = calls.begin(TRACEPARENT)
    assert ids.header == b"%032x" % 0x1234ABCD
    calls.finish(ids, record(), START, END)
    want, got = sdk_spans.get_finished_spans(), spans.get_finished_spans()
    assert [s.name for s in got] == [s.name for s in want] == ["chat m-a", "chat m-b", "chat gpt"]
    for w, g in zip(want, got):
        assert orjson.loads(g.to_json()) == orjson.loads(w.to_json())  # ids, parent, kind, times, status, attrs...
        assert g.context.trace_flags == w.context.trace_flags and g.context.trace_flags.sampled
        assert (g.parent and g.parent.trace_flags) == (w.parent and w.parent.trace_flags)
        assert g.instrumentation_scope == w.instrumentation_scope and g.instrumentation_info == w.instrumentation_info
        assert dict(g.attributes) == dict(w.attributes)
        assert [type(v) for v in g.attributes.values()] == [type(v) for v in w.attributes.values()]
        grow, wrow = span_to_row(g), span_to_row(w)  # the otel_traces row: the same but for the attributes' types
        assert grow.pop("SpanAttributes") == dict(g.attributes) and wrow.pop("SpanAttributes") == \
            attributes_to_strings(w.attributes)
        assert orjson.dumps(grow) == orjson.dumps(wrow)
    assert got[-1].parent is None and [s.parent.span_id for s in got[:2]] == [got[-1].context.span_id] * 2
    assert got[-1].links[0].context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


def test_a_call_span_is_stored_as_the_sdk_spans_string_attributes(chdb_store):
    """A call span's row carries its attributes typed (exporters/rows.JSONTypedSpan); ClickHouse, with the exporter's
    insert settings, stores each as the SDK span's string rendering: the same text, but for a float (the same
    number, written `1e-5` or `0.00001` instead of Python's `1e-05`)."""
    sdk_tracer, sdk_spans = world()
    the_sdk_way(sdk_tracer, record())
    tracer, spans = world()
    calls = CallSpans(tracer)
    calls.finish(calls.begin(TRACEPARENT), record(), START, END)
    # the session's store: tables of this test's own
    mine, twin = unique("typed").replace("-", "_"), unique("strings").replace("-", "_")
    chdb_store.command(f"CREATE TABLE {mine} AS otel_traces")
    chdb_store.command(f"CREATE TABLE {twin} AS otel_traces")
    for table, finished in ((mine, spans), (twin, sdk_spans)):
        rows = finished.get_finished_spans()
        body = encode_spans(rows).body
        assert (b'"tagway.attempts":2' in body) == (table == mine)  # typed, or strings
        chdb_store.insert_json_rows(table, body, settings=ClickHouseSpanExporter.insert_settings(
            EncodedBatch.of(table, body, len(rows))))
    sql = "SELECT SpanId, SpanAttributes FROM {} ORDER BY SpanId"
    got, want = chdb_store.query_rows(sql.format(mine))[0], chdb_store.query_rows(sql.format(twin))[0]
    assert len(got) == len(want) == 3
    floats = {k for s in sdk_spans.get_finished_spans() for k, v in s.attributes.items() if type(v) is float}
    assert floats  # latency, cost, temperature
    for (gid, gattrs), (wid, wattrs) in zip(got, want):
        assert gid == wid and gattrs.keys() == wattrs.keys()
        assert {k: v for k, v in gattrs.items() if k not in floats} == \
            {k: v for k, v in wattrs.items() if k not in floats}
        assert all(float(gattrs[k]) == float(wattrs[k]) for k in floats & gattrs.keys())
    for table in (mine, twin):
        chdb_store.command(f"DROP TABLE {table}")
    # chDB knows every setting: the exporter sends it typed rows (a server before 24.1 gets strings: below)
    assert ClickHouseSpanExporter(store=chdb_store, schema_ready=True, owns_store=False)._reads_typed_rows(chdb_store)


def test_a_value_orjson_cannot_write_is_stored_as_its_string():
    """An integer past 64 bits (a provider adapter's own JSON parser can give one) sends the span's attributes through
    attributes_to_strings instead of failing the chunk's encoding."""
    tracer, spans = world()
    calls = CallSpans(tracer)
    r = record()
    r.attempts = r.attempts[:1]
    r.input_tokens = 2 ** 70
    calls.finish(calls.begin(), r, START, END)
    calls.finish(calls.begin(), record(), START, END)
    finished = spans.get_finished_spans()
    lines = encode_spans(finished).body.splitlines()
    assert len(lines) == len(finished) == 4
    big = orjson.loads(lines[0])["SpanAttributes"]
    assert big["gen_ai.usage.input_tokens"] == str(2 ** 70) and big["tagway.attempts"] == "1"
    assert orjson.loads(lines[-1])["SpanAttributes"]["tagway.attempts"] == 2  # the others stay typed


class _Server:
    """A store that records what it is sent and knows the settings a ClickHouse version has."""
    dsn = "clickhouse://127.0.0.1:8123/default"

    def __init__(self, known: list[str]) -> None:
        self.known, self.sent, self.asked = known, [], 0

    def query_rows(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> tuple:
        self.asked += 1
        return [(sum(n in self.known for n in (parameters or {}).get("names", ())),)], ("count()",)

    def insert_json_rows(self, table: str, body: bytes, settings: dict | None = None) -> None:
        self.sent.append((body, settings))


@pytest.mark.parametrize("version, known", [("24.1+", list(INSERT_SETTINGS)), ("23.8", list(INSERT_SETTINGS)[:2])])
def test_the_exporter_sends_typed_rows_only_to_a_server_that_reads_them(version, known):
    """Every insert carries INSERT_SETTINGS, so the server renders typed values as strings; a server that lacks one
    (before 24.1) would refuse each insert for an unknown setting (read as the rows' fault: every call quarantined),
    so it gets the rows with string attributes and no such setting. The server is asked once."""
    tracer, spans = world()
    calls = CallSpans(tracer)
    calls.finish(calls.begin(), record(), START, END)
    server = _Server(known)
    exporter = ClickHouseSpanExporter(store=server, schema_ready=True, owns_store=False)
    for _ in range(2):
        exporter.send(exporter.encode(spans.get_finished_spans()))
    assert server.asked == 1 and len(server.sent) == 2
    body, settings = server.sent[0]
    attrs = orjson.loads(body.splitlines()[-1])["SpanAttributes"]
    assert settings["insert_deduplication_token"].startswith("tagway-")
    if version == "24.1+":
        assert all(settings[k] == 1 for k in INSERT_SETTINGS) and attrs["tagway.attempts"] == 2
    else:
        assert not set(INSERT_SETTINGS) & set(settings)
        assert all(type(v) is str for line in body.splitlines() for v in orjson.loads(line)["SpanAttributes"].values())
        assert attrs["tagway.attempts"] == "2" and attrs["gen_ai.response.finish_reasons"] == '["stop"]'
