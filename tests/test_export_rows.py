"""Span -> otel_traces row conversion (pure; no ClickHouse)."""
from __future__ import annotations

import hashlib

import orjson
from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from exporters.rows import attributes_to_strings, encode_spans, format_timestamp, span_to_row
from tests.otel_columns import COLUMNS


def _spans():
    mem = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc-x", "deployment.environment": "t",
                                                        "replicas": 3}))
    provider.add_span_processor(SimpleSpanProcessor(mem))
    tracer = provider.get_tracer("scope-x", "1.2.3")
    ctx = trace_api.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=trace_api.TraceFlags(1),
                                trace_state=trace_api.TraceState([("vendor", "v1")]))
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER):
        with tracer.start_as_current_span("chat m", kind=SpanKind.CLIENT, links=[Link(ctx, {"why": "replay"})],
                                          start_time=1_732_431_151_123_456_789) as span:
            span.set_attributes({"s": "x", "b": True, "f": False, "i": 42, "x": 0.5, "seq": ("a", "b"),
                                 "nums": (1, 2), "flags": (True, False)})
            span.add_event("first-chunk", {"n": 1}, timestamp=1_732_431_151_200_000_000)
            span.set_status(Status(StatusCode.ERROR, "upstream 503"))
            span.end(end_time=1_732_431_152_123_456_789)
    provider.shutdown()
    return mem.get_finished_spans()


def test_row_has_every_collector_column_in_its_format() -> None:
    child, parent = _spans()
    row = orjson.loads(orjson.dumps(span_to_row(child)))  # as inserted (the resource is a serialised fragment)
    assert list(row) == COLUMNS  # the pipeline test checks these against DESCRIBE otel_traces
    assert row["Timestamp"] == "1732431151.123456789"
    assert row["TraceId"] == f"{child.context.trace_id:032x}" and len(row["TraceId"]) == 32
    assert row["SpanId"] == f"{child.context.span_id:016x}" and len(row["SpanId"]) == 16
    assert row["ParentSpanId"] == f"{parent.context.span_id:016x}"
    assert row["SpanName"] == "chat m" and row["SpanKind"] == "Client"
    assert row["ServiceName"] == "svc-x"
    assert row["ResourceAttributes"]["deployment.environment"] == "t"
    assert row["ResourceAttributes"]["replicas"] == "3"
    assert (row["ScopeName"], row["ScopeVersion"]) == ("scope-x", "1.2.3")
    assert row["SpanAttributes"] == {"s": "x", "b": "true", "f": "false", "i": "42", "x": "0.5",
                                     "seq": '["a","b"]', "nums": "[1,2]", "flags": "[true,false]"}
    assert row["Duration"] == 1_000_000_000
    assert (row["StatusCode"], row["StatusMessage"]) == ("Error", "upstream 503")
    assert row["Events.Timestamp"] == ["1732431151.200000000"]
    assert row["Events.Name"] == ["first-chunk"] and row["Events.Attributes"] == [{"n": "1"}]
    assert row["Links.TraceId"] == [f"{0xABC:032x}"] and row["Links.SpanId"] == [f"{0xDEF:016x}"]
    assert row["Links.TraceState"] == ["vendor=v1"] and row["Links.Attributes"] == [{"why": "replay"}]

    prow = orjson.loads(orjson.dumps(span_to_row(parent)))
    assert prow["ParentSpanId"] == "" and prow["SpanKind"] == "Server" and prow["StatusCode"] == "Unset"
    # no events and no links: the seven arrays are left out (the table's default, [], fills them; the pipeline
    # test reads them back), every other column is there in order
    assert list(prow) == [c for c in COLUMNS if not c.startswith(("Events.", "Links."))]
    assert prow["ResourceAttributes"] == row["ResourceAttributes"]


def test_attribute_strings_match_the_collector() -> None:
    assert attributes_to_strings({"a": 1.25, "b": True, "c": (0.5, 1.0), "d": ""}) == {
        "a": "1.25", "b": "true", "c": "[0.5,1.0]", "d": ""}
    assert attributes_to_strings(None) == {}
    # lists and tuples (the fast path) and other sequences render alike; what JSON cannot hold, as its str()
    assert attributes_to_strings({"e": ["stop", "length"], "f": (b"x",), "g": (), "h": range(2)}) == {
        "e": '["stop","length"]', "f": '["b\'x\'"]', "g": "[]", "h": "[0,1]"}
    assert format_timestamp(5) == "0.000000005"


def test_encode_is_jsoneachrow_with_sha256_digest() -> None:
    spans = _spans()
    batch = encode_spans(spans)
    lines = batch.body.split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3 and batch.rows == 2
    assert [orjson.loads(x)["SpanName"] for x in lines[:-1]] == ["chat m", "parent"]
    assert batch.digest == hashlib.sha256(batch.body).hexdigest()
    assert batch.table == "otel_traces"
    assert encode_spans([]).rows == 0 and encode_spans([]).body == b""
