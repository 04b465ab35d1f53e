"""The columns of `otel_traces` in the OpenTelemetry Collector ClickHouse exporter's order: what a row of ours must
hold (test_export_rows) and what the table has (test_export_pipeline checks them against DESCRIBE)."""
from __future__ import annotations

COLUMNS = ["Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
           "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode",
           "StatusMessage", "Events.Timestamp", "Events.Name", "Events.Attributes", "Links.TraceId", "Links.SpanId",
           "Links.TraceState", "Links.Attributes"]
