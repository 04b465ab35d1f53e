"""OpenTelemetry SDK spans -> `otel_traces` rows, in the OpenTelemetry Collector ClickHouse exporter's layout.

Pure functions. The Collector (exporter/clickhouseexporter, traces) writes: hex ids, `SpanKind`/`StatusCode` as
the short names of `traceutil.SpanKindStr`/`StatusCodeStr`, every attribute as a string (`pcommon.Value.AsString`:
bools "true"/"false", arrays as JSON) and Events/Links as parallel arrays of the Nested columns. Grafana's trace
view and our `llm_calls` materialized view read exactly that, so we write exactly that (a span with no events or
no links leaves those arrays out of its row: the table's default for them is the same empty array).

These run on the export thread and hold the GIL, so they stay flat: one dict and one `orjson.dumps` per span,
no intermediate objects, the resource's map converted and serialised once per resource rather than once per span.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Iterable, Mapping, Sequence

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

__all__ = ["EncodedBatch", "TABLE", "JSONTypedSpan", "INSERT_SETTINGS", "encode_spans", "encode_rows", "span_to_row",
           "attributes_to_strings", "strings_only", "format_timestamp"]

TABLE = "otel_traces"

_KIND = {
    SpanKind.INTERNAL: "Internal",
    SpanKind.SERVER: "Server",
    SpanKind.CLIENT: "Client",
    SpanKind.PRODUCER: "Producer",
    SpanKind.CONSUMER: "Consumer",
}
_STATUS = {StatusCode.UNSET: "Unset", StatusCode.OK: "Ok", StatusCode.ERROR: "Error"}


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """The bytes of one batch, built once: inserted as they are, or written to the spool as they are.

    `parts` are the bytes in order: one, or the encoded chunks a batch was formed from, never joined on the way to
    the store or the spool (a 5 s batch is ~30 MB: joining it cost ~3.7 µs a span in page faults alone). `digest`
    (sha256 hex of the bytes) is both the spool checksum and the insert deduplication token; it is computed when
    first asked for, so the encoder's ~100 ms chunks, which are batched before anything needs one, pay for none."""

    table: str
    parts: tuple[bytes, ...]
    rows: int

    @classmethod
    def of(cls, table: str, body: bytes | Sequence[bytes], rows: int) -> EncodedBatch:
        return cls(table, (body,) if isinstance(body, (bytes, bytearray)) else tuple(body), rows)

    @property
    def body(self) -> bytes:
        """The bytes as one object (joined when there are several parts: only the rare paths ask)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    @functools.cached_property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for p in self.parts:
            h.update(p)
        return h.hexdigest()


# How ClickHouse reads a JSON number, bool or array where a String is expected (an attribute map's values): as its JSON
# text, verbatim (1 -> "1", true -> "true", ["stop"] -> '["stop"]'). The defaults of current servers and chDB; sent with
# every insert all the same. A server that lacks one (before 24.1) gets `strings_only` rows (exporters/clickhouse.py).
INSERT_SETTINGS = {"input_format_json_read_numbers_as_strings": 1, "input_format_json_read_bools_as_strings": 1,
                   "input_format_json_read_arrays_as_strings": 1}


class JSONTypedSpan(ReadableSpan):
    """A ReadableSpan whose attribute values are JSON-typed by construction (str, bool, int, finite float, tuples
    of str), as the gateway's call and attempt spans are (gateway/telemetry.py). Its row carries the attributes as
    they are: ClickHouse renders each value as the string `attributes_to_strings` would (INSERT_SETTINGS), except a
    float, written as orjson's shortest text (`3.15e-6`, not Python's `3.15e-06`; the Collector's `AsString` writes
    a third form, so no reader can rely on one). Converting ~30 values a span in Python was ~2 of the encoder's
    ~7.5 µs a call span in a hot loop. A value orjson cannot write (an integer past 64 bits) sends the span through
    `attributes_to_strings` after all."""


def format_timestamp(ns: int) -> str:
    """DateTime64(9) as JSONEachRow accepts it without loss: "seconds.nanoseconds"."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def attributes_to_strings(attrs: Mapping[str, Any] | None) -> dict[str, str]:
    """Map(String, String) values the way the Collector's `AsString` renders them."""
    if not attrs:
        return {}
    out: dict[str, str] = {}
    for k, v in attrs.items():
        t = type(v)
        if t is str:
            out[k] = v
        elif t is bool:
            out[k] = "true" if v else "false"
        elif t is int or t is float:
            out[k] = str(v)
        elif t is tuple or t is list:  # SDK sequence attributes (finish reasons): skip the ABC checks below
            out[k] = _json_array(v)
        else:
            out[k] = _to_string(v)
    return out


def _json_array(v: Sequence[Any]) -> str:
    try:
        return orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return orjson.dumps([str(x) for x in v]).decode()


def _to_string(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    if isinstance(v, Sequence) and not isinstance(v, str):
        return _json_array(list(v))
    return str(v)


# Resources are immutable and shared by every span of a provider: convert and serialise each once (an
# `orjson.Fragment` is written into every row as it is). The entry keeps the Resource alive, so its id() cannot be
# reused by another object while cached.
_RESOURCE_CACHE: dict[int, tuple[Resource, orjson.Fragment, str]] = {}


def _resource(resource: Resource) -> tuple[orjson.Fragment, str]:
    hit = _RESOURCE_CACHE.get(id(resource))
    if hit is not None and hit[0] is resource:
        return hit[1], hit[2]
    attrs = attributes_to_strings(resource.attributes)
    if len(_RESOURCE_CACHE) >= 64:
        _RESOURCE_CACHE.clear()
    fragment, service = orjson.Fragment(orjson.dumps(attrs)), attrs.get("service.name", "")
    _RESOURCE_CACHE[id(resource)] = (resource, fragment, service)
    return fragment, service


def _span_attributes(span: ReadableSpan) -> Mapping[str, Any]:
    # `ReadableSpan.attributes` wraps the attributes in a MappingProxy, and an SDK span's are a `BoundedAttributes`
    # (a Python-level MutableMapping): iterating those costs ~2x the conversion itself. Read the plain dict: the
    # gateway's call spans hold one (gateway/telemetry.py), SDK spans one underneath.
    raw = getattr(span, "_attributes", None)
    if type(raw) is dict:
        return raw
    d = getattr(raw, "_dict", None)
    return d if type(d) is dict else span.attributes


def span_to_row(span: ReadableSpan) -> dict[str, Any]:
    """One `otel_traces` row (JSONEachRow object; Nested columns as dotted parallel arrays)."""
    ctx = span.context
    parent = span.parent
    start = span.start_time or 0
    end = span.end_time or start
    scope = span.instrumentation_scope
    status = span.status
    res_attrs, service = _resource(span.resource)
    trace_state = ctx.trace_state
    row = {
        "Timestamp": f"{start // 1_000_000_000}.{start % 1_000_000_000:09d}",
        "TraceId": f"{ctx.trace_id:032x}",
        "SpanId": f"{ctx.span_id:016x}",
        "ParentSpanId": f"{parent.span_id:016x}" if parent is not None else "",
        "TraceState": trace_state.to_header() if trace_state else "",
        "SpanName": span.name,
        "SpanKind": _KIND.get(span.kind, "Unspecified"),
        "ServiceName": service,
        "ResourceAttributes": res_attrs,
        "ScopeName": scope.name if scope is not None else "",
        "ScopeVersion": (scope.version or "") if scope is not None else "",
        "SpanAttributes": _span_attributes(span) if type(span) is JSONTypedSpan else
        attributes_to_strings(_span_attributes(span)),
        "Duration": end - start if end > start else 0,
        "StatusCode": _STATUS.get(status.status_code, "Unset"),
        "StatusMessage": status.description or "",
    }
    # Most gateway spans carry neither events nor links: their seven arrays are left out, and ClickHouse fills an
    # omitted column with its default (an empty array), so the row is ~140 bytes shorter to build and to parse.
    events = getattr(span, "_events", None)  # the property copies to a tuple even when empty
    if events is None:
        events = span.events
    if events:
        row["Events.Timestamp"] = [format_timestamp(e.timestamp) for e in events]
        row["Events.Name"] = [e.name for e in events]
        row["Events.Attributes"] = [attributes_to_strings(e.attributes) for e in events]
    links = getattr(span, "_links", None)
    if links is None:
        links = span.links
    if links:
        row["Links.TraceId"] = [f"{lk.context.trace_id:032x}" for lk in links]
        row["Links.SpanId"] = [f"{lk.context.span_id:016x}" for lk in links]
        row["Links.TraceState"] = [lk.context.trace_state.to_header() if lk.context.trace_state else ""
                                   for lk in links]
        row["Links.Attributes"] = [attributes_to_strings(lk.attributes) for lk in links]
    return row


# Each row is dumped with its newline and the rows joined once: `b"\n".join(parts) + b"\n"` copied a chunk's
# ~370 KB a second time while the first copy was alive, which glibc serves from fresh pages (mmap), page faults
# and all: 0.65 µs a span of the encoder's ~10 in a hot loop.
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def encode_rows(rows: Iterable[dict[str, Any]], table: str = TABLE) -> EncodedBatch:
    """Newline-separated JSON objects (JSONEachRow), one `orjson.dumps` per row."""
    dumps = orjson.dumps
    parts = [dumps(r, option=_NEWLINE) for r in rows]
    return EncodedBatch.of(table, b"".join(parts), len(parts))


def encode_spans(spans: Sequence[ReadableSpan], table: str = TABLE) -> EncodedBatch:
    """A batch of spans as the bytes that are inserted into (or spooled for) `table`."""
    dumps = orjson.dumps
    # One short C call per row keeps the GIL hand-offs to the event loop frequent (no single long stall).
    try:
        parts = [dumps(span_to_row(s), option=_NEWLINE) for s in spans]
    except TypeError:  # a typed attribute orjson cannot write: that chunk's rows one by one
        parts = [_dump_row(s) for s in spans]
    return EncodedBatch.of(table, b"".join(parts), len(parts))


def strings_only(body: bytes) -> bytes:
    """JSONEachRow rows whose SpanAttributes hold typed values (JSONTypedSpan), with every value a string as
    `attributes_to_strings` renders it: for a server that cannot read them typed. A null (orjson's NaN) is "", as
    ClickHouse reads it."""
    out: list[bytes] = []
    for line in body.splitlines():
        if not line:
            continue
        row = orjson.loads(line)
        attrs = row.get("SpanAttributes")
        if attrs and any(type(v) is not str for v in attrs.values()):
            row["SpanAttributes"] = attributes_to_strings({k: "" if v is None else v for k, v in attrs.items()})
        out.append(orjson.dumps(row, option=_NEWLINE))
    return b"".join(out)


def _dump_row(span: ReadableSpan) -> bytes:
    row = span_to_row(span)
    try:
        return orjson.dumps(row, option=_NEWLINE)
    except TypeError:
        if type(span) is not JSONTypedSpan:
            raise
        row["SpanAttributes"] = attributes_to_strings(row["SpanAttributes"])
        return orjson.dumps(row, option=_NEWLINE)
