"""tagway's way out: the ClickHouse schema and store, the OpenTelemetry span exporter and its durable processor."""
