"""The export pipeline end to end on the session's real chDB store: real OTel SDK spans through
`start_recording`, rows in otel_traces and llm_calls, ClickHouse failing and coming back, spool replay, queue
overflow, shutdown. Tests isolate their rows by unique trace ids / customers / run ids."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import orjson
import pytest
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from exporters import semconv as sc
from exporters.clickhouse import ClickHouseSpanExporter
from exporters.metrics import ExportMetrics
from exporters.processor import DurableBatchSpanProcessor
from exporters.recording import Recorder, start_recording
from exporters.spool import Spool
from exporters.store import Store, StoreError

from tests.otel_columns import COLUMNS


class FlakyStore:
    """The real store, except that inserts fail while `down` is set and block while `gate` is clear.
    Records the `run.seq` attribute of every row it lets through, in insert order."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.dsn = store.dsn
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.inserted: list[int] = []
        self.bodies: list[bytes] = []
        self.attempts = 0

    def insert_json_rows(self, table: str, body: bytes, settings: dict | None = None) -> None:
        self.attempts += 1
        self.gate.wait()
        if self.down:
            raise StoreError("ClickHouse unreachable: [Errno 111] Connection refused (simulated)")
        self._store.insert_json_rows(table, body, settings=settings)
        self.bodies.append(body)
        for line in body.splitlines():
            seq = orjson.loads(line)["SpanAttributes"].get("run.seq")
            if seq is not None:
                self.inserted.append(int(seq))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _emit(rec: Recorder, run: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with rec.tracer.start_as_current_span("chat m", kind=SpanKind.CLIENT) as span:
            span.set_attributes({"run.id": run, "run.seq": i, sc.KIND: "call", sc.CUSTOMER: run})


def _count(store: Store, run: str) -> tuple[int, int]:
    rows, _ = store.query_rows("SELECT count(), uniqExact(SpanId) FROM otel_traces "
                               "WHERE SpanAttributes['run.id'] = {r:String}", {"r": run})
    return int(rows[0][0]), int(rows[0][1])


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _run_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there, connects are refused


# -- (a) rows land, in the Collector layout, and feed llm_calls ---------------------------------------------------
def test_spans_land_in_otel_traces_and_llm_calls(chdb_dsn: str, chdb_store: Store, tmp_path) -> None:
    rec = start_recording(dsn=chdb_dsn, spool_dir=str(tmp_path / "spool"), batch_max_seconds=60,
                          resource_attributes={"deployment.environment": "test"})
    customer = _run_id()
    link_ctx = trace_api.SpanContext(0x1234, 0x5678, is_remote=True)
    with rec.tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER) as root:
        with rec.tracer.start_as_current_span("chat gpt-x", kind=SpanKind.CLIENT,
                                              links=[Link(link_ctx, {"k": "v"})]) as call:
            call.set_attributes({
                sc.KIND: "call", sc.CUSTOMER: customer, sc.INTENT: "summarize", sc.PROMPT_VERSION: "v7",
                sc.TAG_PREFIX + "team": "search", sc.TAG_PREFIX + "tier": "gold", sc.OPERATION: "chat",
                sc.REQUEST_MODEL: "gpt-x", sc.RESPONSE_MODEL: "gpt-x-2025", sc.PROVIDER: "openai",
                sc.INPUT_TOKENS: 123, sc.OUTPUT_TOKENS: 45, sc.REQUEST_STREAM: True, sc.TIME_TO_FIRST_CHUNK: 0.25,
                sc.ERROR_TYPE: "upstream_503", sc.HTTP_STATUS: 503, sc.COST_USD: 0.0125,
                sc.FINISH_REASONS: '["stop"]', sc.ATTEMPTS: 2})
            call.add_event("retry", {"attempt": 1})
            call.set_status(Status(StatusCode.ERROR, "upstream returned 503"))
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert rec.force_flush()
    store = rec.store
    assert store is chdb_store  # one shared client per DSN in a process

    described = [r[0] for r in store.query_rows("DESCRIBE TABLE otel_traces")[0]]
    assert described == COLUMNS
    rows = store.query("SELECT *, toUnixTimestamp64Nano(Timestamp) AS ts_ns FROM otel_traces "
                       "WHERE TraceId = {t:String} ORDER BY SpanKind", {"t": trace_id})
    assert [r["SpanKind"] for r in rows] == ["Client", "Server"]
    c, s = rows
    assert c["ts_ns"] == call.start_time and c["Duration"] == call.end_time - call.start_time
    assert c["SpanId"] == f"{call.get_span_context().span_id:016x}" and len(c["SpanId"]) == 16
    assert c["ParentSpanId"] == s["SpanId"] and s["ParentSpanId"] == ""
    assert c["SpanName"] == "chat gpt-x" and c["ServiceName"] == "tagway" and c["ScopeName"] == sc.SCOPE_NAME
    assert c["ResourceAttributes"]["deployment.environment"] == "test"
    assert c["ResourceAttributes"]["service.name"] == "tagway"
    assert c["SpanAttributes"][sc.INPUT_TOKENS] == "123" and c["SpanAttributes"][sc.REQUEST_STREAM] == "true"
    assert (c["StatusCode"], c["StatusMessage"]) == ("Error", "upstream returned 503")
    assert s["StatusCode"] == "Unset"
    # the server span had no events or links: its row left the arrays out and the table filled them empty
    assert (s["Events.Name"], s["Events.Timestamp"], s["Links.TraceId"], s["Links.Attributes"]) == ([], [], [], [])
    assert c["Events.Name"] == ["retry"] and c["Events.Attributes"] == [{"attempt": "1"}]
    assert c["Links.TraceId"] == [f"{0x1234:032x}"] and c["Links.Attributes"] == [{"k": "v"}]

    calls = store.query("SELECT * FROM llm_calls WHERE customer = {c:String}", {"c": customer})
    assert len(calls) == 1
    row = calls[0]
    assert row["trace_id"] == trace_id and row["intent"] == "summarize" and row["prompt_version"] == "v7"
    assert row["tags"] == {"team": "search", "tier": "gold"}
    assert (row["input_tokens"], row["output_tokens"]) == (123, 45)
    assert (row["status"], row["error_type"], row["http_status"]) == ("error", "upstream_503", 503)
    assert row["model_served"] == "gpt-x-2025" and row["stream"] is True and row["attempts"] == 2
    assert row["ttft_ms"] == pytest.approx(250.0) and row["cost_usd"] == pytest.approx(0.0125)
    m = rec.metrics.snapshot()
    assert m["spans_exported"] == 2 and m["batches_exported"] == 1 and m["spans_dropped"] == 0
    rec.shutdown()
    assert chdb_store.ping()  # the recorder released its reference, not the session's client


# -- (b) ClickHouse down while spans flow, then back ----------------------------------------------------------------
def test_store_down_then_back_everything_arrives_once_in_order(chdb_dsn: str, chdb_store: Store, tmp_path,
                                                              caplog) -> None:
    flaky = FlakyStore(chdb_store)
    rec = start_recording(dsn=chdb_dsn, store=flaky, spool_dir=str(tmp_path / "spool"), batch_max_rows=100,
                          batch_max_seconds=0.05, retry_min_seconds=0.05, retry_max_seconds=0.2)
    run = _run_id()
    _emit(rec, run, 250)
    assert rec.force_flush()
    flaky.down = True
    with caplog.at_level(logging.WARNING, logger="exporters.processor"):
        _emit(rec, run, 600, start=250)
        assert rec.force_flush()
        m = rec.metrics.snapshot()
        assert m["spans_spooled"] >= 600 - 100 and m["export_degraded"] == 1 and m["spool_files_pending"] >= 5
        assert m["export_errors"] >= 1
        assert _wait(lambda: flaky.attempts >= 4)  # it keeps retrying (with backoff) while down
        _emit(rec, run, 150, start=850)  # more spans while degraded queue up behind the spooled ones
        assert rec.force_flush()
    assert any(r.levelno == logging.ERROR and "spool" in r.getMessage() for r in caplog.records)

    flaky.down = False
    assert _wait(lambda: rec.spool.pending_files == 0 and not rec.processor.degraded)
    assert _count(chdb_store, run) == (1000, 1000)
    assert flaky.inserted == list(range(1000))  # exactly once, and in the order the spans ended
    m = rec.metrics.snapshot()
    assert m["spans_exported"] + m["spans_resent"] == 1000
    assert m["spans_resent"] == m["spans_spooled"] and m["spans_dropped"] == 0
    assert m["export_degraded"] == 0 and m["spool_files_pending"] == 0 and m["spool_bytes_pending"] == 0
    rec.shutdown()


def test_refused_connection_spools_then_a_later_start_replays(chdb_dsn: str, chdb_store: Store, tmp_path,
                                                              caplog) -> None:
    spool_dir = str(tmp_path / "spool")
    with caplog.at_level(logging.ERROR):
        rec = start_recording(dsn=f"http://default:secret@127.0.0.1:{_refused_port()}/default",
                              spool_dir=spool_dir, batch_max_rows=50, batch_max_seconds=0.05)
        assert rec.store is None  # a server down at start-up is not an error
        run = _run_id()
        _emit(rec, run, 120)
        assert rec.force_flush()
    assert "unreachable" in caplog.text and "secret" not in caplog.text
    assert rec.processor.degraded and "refused" in rec.processor.last_error.lower()
    m = rec.metrics.snapshot()
    assert m["spans_spooled"] == 120 and m["spans_exported"] == 0 and m["export_errors"] >= 1
    rec.shutdown()
    assert rec.spool.pending_files >= 3

    # Same spool, ClickHouse reachable: the files left behind are re-sent on start, and the log says what happened
    # (an earlier process's spool stored), not that ClickHouse came back (this process never saw it fail).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporters.processor"):
        rec2 = start_recording(dsn=chdb_dsn, spool_dir=spool_dir, batch_max_seconds=0.05)
        assert _wait(lambda: rec2.spool.pending_files == 0)
        assert _count(chdb_store, run) == (120, 120)
        assert rec2.metrics.get("spans_resent") == 120
        rec2.shutdown()
    assert "stored 120 spans an earlier process left in the spool" in caplog.text, caplog.text
    assert "reachable again" not in caplog.text


# -- (c) corruption in the spool is found and quarantined -----------------------------------------------------------
def test_corrupt_spool_file_is_quarantined_and_the_rest_replayed(chdb_dsn: str, chdb_store: Store, tmp_path,
                                                                 caplog) -> None:
    spool_dir = tmp_path / "spool"
    flaky = FlakyStore(chdb_store)
    flaky.down = True
    rec = start_recording(dsn=chdb_dsn, store=flaky, spool_dir=str(spool_dir), batch_max_rows=10,
                          batch_max_seconds=0.05)
    run = _run_id()
    _emit(rec, run, 30)
    rec.shutdown()
    files = sorted(p for p in spool_dir.iterdir() if p.name.endswith(".spool"))
    assert len(files) == 3
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-40])  # torn in the middle of the last row

    with caplog.at_level(logging.ERROR, logger="exporters.spool"):
        rec2 = start_recording(dsn=chdb_dsn, spool_dir=str(spool_dir), batch_max_seconds=0.05)
        assert _wait(lambda: rec2.spool.pending_files == 0)
    assert _count(chdb_store, run) == (20, 20)
    assert rec2.metrics.get("spool_corrupt_files") == 1 and rec2.metrics.get("spans_resent") == 20
    assert (spool_dir / (files[1].name + ".corrupt")).exists()
    assert "torn write" in caplog.text and "quarantined" in caplog.text
    assert "tagway_spool_corrupt_files_total 1" in rec2.render_metrics()
    rec2.shutdown()


# -- (d) a stuck insert: the queue spills to the spool instead of dropping ------------------------------------------
def test_queue_over_limit_spills_instead_of_dropping(chdb_dsn: str, chdb_store: Store, tmp_path) -> None:
    flaky = FlakyStore(chdb_store)
    rec = start_recording(dsn=chdb_dsn, store=flaky, spool_dir=str(tmp_path / "spool"), batch_max_rows=100,
                          batch_max_seconds=0.05, queue_max=500, retry_min_seconds=0.05)
    run = _run_id()
    flaky.gate.clear()  # the next insert hangs
    try:
        _emit(rec, run, 100)
        assert _wait(lambda: flaky.attempts == 1)
        _emit(rec, run, 3000, start=100)  # 6x queue_max while the sender is stuck
        assert _wait(lambda: rec.processor.queue_depth <= 500)
        m = rec.metrics.snapshot()
        # All but queue_max rows (and the chunk being encoded) went to disk instead of piling up in memory.
        assert m["spans_spooled"] >= 3000 - 500 - 100 and m["spans_dropped"] == 0 and m["spans_exported"] == 0
    finally:
        flaky.gate.set()
    assert rec.force_flush()
    assert _wait(lambda: rec.spool.pending_files == 0)
    assert _count(chdb_store, run) == (3100, 3100)
    assert flaky.inserted == list(range(3100))
    m = rec.metrics.snapshot()
    assert m["spans_exported"] + m["spans_resent"] == 3100 and m["spans_dropped"] == 0
    rec.shutdown()


def test_on_end_is_cheap_and_never_raises_even_when_the_exporter_breaks(chdb_store: Store, tmp_path) -> None:
    class Broken(FlakyStore):
        def insert_json_rows(self, table: str, body: bytes, settings: dict | None = None) -> None:
            raise ZeroDivisionError("driver bug")

    rec = start_recording(dsn=chdb_store.dsn, store=Broken(chdb_store), spool_dir=str(tmp_path / "spool"),
                          batch_max_rows=50, batch_max_seconds=0.05)
    run = _run_id()
    t0 = time.perf_counter()
    _emit(rec, run, 200)  # spans end (on_end runs) without error on the caller's side
    per_span = (time.perf_counter() - t0) / 200
    assert per_span < 0.005
    assert rec.force_flush()
    assert rec.metrics.get("spans_spooled") == 200 and rec.metrics.get("spans_dropped") == 0
    rec.shutdown()


# -- (e) shutdown flushes ------------------------------------------------------------------------------------------
def test_shutdown_flushes_queued_spans_and_is_idempotent(chdb_dsn: str, chdb_store: Store, tmp_path) -> None:
    rec = start_recording(dsn=chdb_dsn, spool_dir=str(tmp_path / "spool"), batch_max_seconds=3600)
    run = _run_id()
    _emit(rec, run, 42)
    time.sleep(0.05)
    assert _count(chdb_store, run) == (0, 0)  # nothing is due yet: still queued
    rec.shutdown()
    rec.shutdown()
    assert _count(chdb_store, run) == (42, 42)
    assert rec.force_flush() is False  # the SDK contract after shutdown
    _emit(rec, run, 3, start=42)  # late spans after shutdown are spooled, not lost
    assert rec.spool.pending_files == 3 and rec.metrics.get("spans_spooled") == 3  # one file per late span


def test_shutdown_while_down_leaves_everything_in_the_spool(chdb_store: Store, tmp_path) -> None:
    flaky = FlakyStore(chdb_store)
    flaky.down = True
    rec = start_recording(dsn=chdb_store.dsn, store=flaky, spool_dir=str(tmp_path / "spool"),
                          batch_max_rows=1000, batch_max_seconds=3600)
    _emit(rec, _run_id(), 25)
    rec.shutdown()
    m = rec.metrics.snapshot()
    assert m["spans_spooled"] == 25 and m["spool_files_pending"] == 1 and m["spans_dropped"] == 0


# -- idempotent re-send ---------------------------------------------------------------------------------------------
def test_resending_a_batch_that_already_landed_does_not_duplicate(chdb_store: Store, tmp_path) -> None:
    """A crash between a successful insert and the unlink of its spool file re-sends the file on the next start;
    `insert_deduplication_token` makes that a no-op on a table that deduplicates (MergeTree needs the table
    setting `non_replicated_deduplication_window`, set here on a probe copy of otel_traces)."""
    table = f"dedup_probe_{uuid.uuid4().hex[:8]}"
    chdb_store.command(f"CREATE TABLE {table} AS otel_traces")
    chdb_store.command(f"ALTER TABLE {table} MODIFY SETTING non_replicated_deduplication_window = 100")
    try:
        mem = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(mem))
        for i in range(10):
            with provider.get_tracer("t").start_as_current_span("s") as span:
                span.set_attribute("run.seq", i)
        spans = mem.get_finished_spans()
        exporter = ClickHouseSpanExporter(store=chdb_store, table=table, schema_ready=True)
        batch = exporter.encode(spans)
        spool = Spool(str(tmp_path / "spool"))
        spool.write(batch)
        exporter.send(batch)  # it landed ... and the process died before removing the spool file
        spool.close()

        spool = Spool(str(tmp_path / "spool"))
        metrics = ExportMetrics()
        proc = DurableBatchSpanProcessor(ClickHouseSpanExporter(store=chdb_store, table=table, metrics=metrics,
                                                                schema_ready=True), spool, metrics=metrics)
        assert _wait(lambda: spool.pending_files == 0)
        proc.shutdown()
        spool.close()
        assert metrics.get("spans_resent") == 10
        rows, _ = chdb_store.query_rows(f"SELECT count() FROM {table}")
        assert rows[0][0] == 10
    finally:
        chdb_store.command(f"DROP TABLE IF EXISTS {table}")


# -- how an embedded insert runs (issue 17) -------------------------------------------------------------------------
def test_an_embedded_insert_runs_on_one_thread_and_the_callers_settings_still_apply(chdb_store: Store) -> None:
    """Views run inside the insert's query, so one that reads getSetting() records the settings the insert had:
    the embedded store parses and runs its views on the calling thread alone (a pool of parsing threads waking on
    the cores that serve calls made recording cost up to 15% more CPU a call), and a caller's own setting wins."""
    probe, seen = f"insert_probe_{uuid.uuid4().hex[:8]}", f"insert_seen_{uuid.uuid4().hex[:8]}"
    chdb_store.command(f"CREATE TABLE {probe} (x UInt8) ENGINE = Null")
    chdb_store.command(f"CREATE TABLE {seen} (x UInt8, parallel_parsing UInt8, max_threads UInt64) "
                       "ENGINE = MergeTree ORDER BY x")
    chdb_store.command(f"CREATE MATERIALIZED VIEW {seen}_mv TO {seen} AS SELECT x, "
                       "toUInt8(getSetting('input_format_parallel_parsing')) AS parallel_parsing, "
                       f"toUInt64(getSetting('max_threads')) AS max_threads FROM {probe}")
    try:
        chdb_store.insert_json_rows(probe, b'{"x": 1}\n{"x": 1}\n',
                                    settings={"insert_deduplication_token": uuid.uuid4().hex})
        chdb_store.insert_json_rows(probe, b'{"x": 2}\n', settings={"max_threads": 3})
        rows, _ = chdb_store.query_rows(f"SELECT x, parallel_parsing, max_threads FROM {seen} ORDER BY x")
        assert [tuple(r) for r in rows] == [(1, 0, 1), (1, 0, 1), (2, 0, 3)]
    finally:
        for name in (f"{seen}_mv", seen, probe):
            chdb_store.command(f"DROP TABLE IF EXISTS {name}")


# -- byte caps (issue 19): rows with big captured content are not interchangeable with small ones -----------------
def test_batches_and_the_memory_backlog_are_capped_in_bytes(chdb_dsn: str, chdb_store: Store, tmp_path) -> None:
    flaky = FlakyStore(chdb_store)
    flaky.gate.clear()  # the first insert hangs: the backlog must go to the spool by bytes, not wait for 50k rows
    metrics = ExportMetrics()
    exporter = ClickHouseSpanExporter(store=flaky, metrics=metrics, owns_store=False, schema_ready=True)
    spool = Spool(str(tmp_path / "spool"), metrics=metrics, fsync=False)
    proc = DurableBatchSpanProcessor(exporter, spool, metrics=metrics, batch_max_rows=5000, batch_max_seconds=0.05,
                                     queue_max=50_000, batch_max_bytes=256 << 10, queue_max_bytes=1 << 20)
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    run, blob = _run_id(), "x" * 20_000
    for i in range(1000):  # ~20 MB of rows, ~20 KB each
        with tracer.start_as_current_span("chat m") as span:
            span.set_attributes({"run.id": run, "run.seq": i, sc.KIND: "call", sc.INPUT_MESSAGES: blob})
    # while the insert hangs, the backlog is spilled by bytes: what stays in memory is about the cap (1 MB, plus
    # the chunk being encoded, at most ~4 MB), not 1,000 rows
    assert _wait(lambda: metrics.get("spans_spooled") > 0 and proc.queue_depth * 20_000 < 6 << 20, 20)
    assert metrics.get("queue_bytes") <= 5 << 20
    flaky.gate.set()
    assert proc.force_flush(60_000)
    assert _wait(lambda: _count(chdb_store, run) == (1000, 1000), 60)
    assert flaky.bodies and all(len(b) <= (256 << 10) + 25_000 for b in flaky.bodies)  # inserts capped in bytes
    provider.shutdown()
    spool.close()


def test_a_timed_send_takes_what_was_encoded_when_it_began(chdb_dsn: str, chdb_store: Store, tmp_path) -> None:
    """Spans keep coming while each insert takes a while: the timed send inserts the backlog it found and waits
    for the next tick, rather than chaining small inserts (each costs chDB a fixed ~50-100 ms through the views)."""

    class SlowStore(FlakyStore):
        def insert_json_rows(self, table: str, body: bytes, settings: dict | None = None) -> None:
            time.sleep(0.15)
            super().insert_json_rows(table, body, settings)

    slow = SlowStore(chdb_store)
    rec = start_recording(dsn=chdb_dsn, store=slow, spool_dir=str(tmp_path / "spool"), batch_max_rows=20_000,
                          batch_max_seconds=1.0)
    run = _run_id()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < 3.2:  # ~400 spans a second, steadily
        _emit(rec, run, 20, start=n)
        n += 20
        time.sleep(0.05)
    assert rec.force_flush()
    assert _count(chdb_store, run) == (n, n) and slow.inserted == list(range(n))
    # ~one insert per 1 s tick (3) plus the flush; chaining inserted every ~0.15 s (~20 inserts)
    assert slow.attempts <= 6, slow.attempts
    rec.shutdown()


# -- a full disk while ClickHouse is down (an operator's trial): the spool's copy needs room the disk lacks ------
def _full_disk_run(chdb_store: Store, directory: str, monkeypatch, *, then: str, wal_fails: bool = False
                   ) -> tuple[ExportMetrics, list]:
    """60 spans while ClickHouse is down and every spool write fails as ENOSPC would (a full disk cannot be made
    here without privileges, as in tests/test_export_spool.py); then `then`: "room" (the disk has room again),
    "clickhouse" (ClickHouse answers, the disk still full) or "stop" (shut down while it is all still so)."""
    import errno  # noqa: PLC0415

    from exporters import spool as spool_mod  # noqa: PLC0415
    from exporters import wal as wal_mod  # noqa: PLC0415
    from exporters.recording import WAL_DIR  # noqa: PLC0415
    from exporters.wal import WriteAheadLog  # noqa: PLC0415

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    flaky = FlakyStore(chdb_store)
    flaky.down = True  # every batch goes to the spool
    metrics = ExportMetrics()
    exporter = ClickHouseSpanExporter(store=flaky, metrics=metrics, owns_store=False, schema_ready=True)
    spool = Spool(directory, metrics=metrics, fsync=False)
    proc = DurableBatchSpanProcessor(exporter, spool, metrics=metrics, batch_max_rows=100, batch_max_seconds=0.05,
                                     queue_max=1000, retry_min_seconds=0.05, retry_max_seconds=0.1,
                                     wal=WriteAheadLog(os.path.join(spool.directory, WAL_DIR)))
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    monkeypatch.setattr(spool_mod, "_write_all", full)
    if wal_fails:  # the log is on the same full disk
        monkeypatch.setattr(wal_mod.os, "writev", full)
    run = _run_id()
    for i in range(60):
        with tracer.start_as_current_span("chat m") as span:
            span.set_attributes({"run.id": run, "run.seq": i, sc.KIND: "call"})
    assert _wait(lambda: metrics.get("spool_write_errors") > 0 and proc.queue_depth == 60, 10)
    assert metrics.get("spans_dropped") == 0 and spool.pending_files == 0
    t0 = time.monotonic()
    assert proc.force_flush(10_000)  # kept batches hold no flush up: a local command does not wait on a full disk
    assert time.monotonic() - t0 < 5
    if then == "room":
        monkeypatch.setattr(spool_mod, "_write_all", _REAL_WRITE_ALL)
        assert _wait(lambda: proc.queue_depth == 0, 10) and spool.pending_spans() == 60
    elif then == "clickhouse":  # the kept batches go straight in: they need no disk
        flaky.down = False
        assert _wait(lambda: proc.queue_depth == 0, 10) and _count(chdb_store, run) == (60, 60)
        assert spool.pending_files == 0
    provider.shutdown()
    monkeypatch.undo()
    spool.close()
    return metrics, sorted(flaky.inserted)


def _real_write_all() -> Any:
    from exporters import spool as spool_mod  # noqa: PLC0415
    return spool_mod._write_all


_REAL_WRITE_ALL = _real_write_all()


def test_a_full_disk_keeps_the_batches_and_writes_them_once_there_is_room(chdb_store: Store, tmp_path, monkeypatch,
                                                                          caplog) -> None:
    """With the write-ahead log on, a nearly full disk dropped every batch whose spool write failed ("60 spans
    DROPPED"), deleting the log's copy too. Now the batch is kept and written once the disk has room, or sent
    straight to ClickHouse once it answers."""
    with caplog.at_level(logging.ERROR):
        metrics, _ = _full_disk_run(chdb_store, str(tmp_path / "room"), monkeypatch, then="room")
    assert metrics.get("spans_dropped") == 0
    assert caplog.text.count("spool write failed: disk full") == 1  # said when it starts, not on every retry
    metrics, inserted = _full_disk_run(chdb_store, str(tmp_path / "ch"), monkeypatch, then="clickhouse")
    assert metrics.get("spans_dropped") == 0 and inserted == list(range(60))


def test_a_stop_on_a_full_disk_leaves_the_batches_to_the_next_start(chdb_store: Store, tmp_path, monkeypatch,
                                                                    caplog) -> None:
    """Stopping while the disk is still full: what the write-ahead log holds is spooled at the next start (moved
    aside whole if the disk is still full then, and the gateway starts anyway); what it could not take (the same
    full disk) is counted as dropped, not claimed safe."""
    from exporters.recording import HELD_PREFIX, WAL_DIR, recover_wal  # noqa: PLC0415
    from exporters import spool as spool_mod  # noqa: PLC0415
    from exporters.spool import unsent_spans  # noqa: PLC0415

    with caplog.at_level(logging.ERROR):
        metrics, _ = _full_disk_run(chdb_store, str(tmp_path / "stop"), monkeypatch, then="stop")
    assert metrics.get("spans_dropped") == 0
    assert "60 spans stay in the write-ahead log and are spooled at the next start" in caplog.text
    assert unsent_spans(str(tmp_path / "stop")) == 60
    # the next start, the disk still full: the log goes aside whole, the start goes on
    again = Spool(str(tmp_path / "stop"), fsync=False)
    monkeypatch.setattr(spool_mod, "_write_all", lambda *_: (_ for _ in ()).throw(OSError(28, "No space left")))
    assert recover_wal(os.path.join(again.directory, WAL_DIR), again, "otel_traces", 16 << 20) == 0
    monkeypatch.undo()
    assert [n for n in os.listdir(again.directory) if n.startswith(HELD_PREFIX)] and unsent_spans(again.directory) == 60
    # and the start after, with room: spooled, the held log removed
    assert recover_wal(os.path.join(again.directory, WAL_DIR), again, "otel_traces", 16 << 20) == 60
    assert again.pending_spans() == 60 and not [n for n in os.listdir(again.directory) if n.startswith(HELD_PREFIX)]
    again.close()

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        metrics, _ = _full_disk_run(chdb_store, str(tmp_path / "both"), monkeypatch, then="stop", wal_fails=True)
    assert metrics.get("spans_dropped") == 60 and "60 spans DROPPED" in caplog.text
    assert "stay in the write-ahead log" not in caplog.text
