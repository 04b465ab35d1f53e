"""The one call the gateway makes at start-up: `start_recording(...)` -> `Recorder`.

It wires store, schema, spool, exporter and processor into a private `TracerProvider` (never the global one:
tests and embedders may run several) and hands back what the gateway needs: a tracer to stamp spans with, the
metrics to serve on /metrics, the store for its read APIs, and `force_flush`/`shutdown`.

`start_recording(enabled=False)` (or `disabled_recorder()`) gives the same surface with a processor that
discards every span on purpose, counted as `spans_discarded`: the benchmark's "recording off" mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
import time
from typing import Any, Iterable, Mapping

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, Tracer, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from .clickhouse import ClickHouseSpanExporter
from .metrics import ExportMetrics
from .processor import DurableBatchSpanProcessor
from .rows import TABLE, EncodedBatch
from .schema import SchemaSettings, migrate
from .semconv import SCOPE_NAME
from .spool import Spool, SpoolLockedError, SpoolWriteError
from .store import Store, StoreError, StoreLockedError, connect, is_embedded, redact_dsn
from .wal import HELD_PREFIX, WAL_DIR, WriteAheadLog, read_pending


__all__ = ["Recorder", "RecordingLimits", "start_recording", "disabled_recorder", "DiscardingSpanProcessor"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recorder:
    tracer_provider: TracerProvider
    tracer: trace_api.Tracer
    metrics: ExportMetrics
    processor: SpanProcessor
    exporter: ClickHouseSpanExporter | None = None
    spool: Spool | None = None
    enabled: bool = True

    @property
    def store(self) -> Store | None:
        """The ClickHouse store, or None while it has not been reached (server down at start-up) or when
        recording is disabled."""
        return self.exporter.store if self.exporter is not None else None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.tracer_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Idempotent: flush (to ClickHouse, or to the spool), stop the threads, close the store and spool."""
        self.tracer_provider.shutdown()
        if self.spool is not None:
            self.spool.close()

    def render_metrics(self) -> str:
        return self.metrics.render()


@dataclasses.dataclass(frozen=True)
class RecordingLimits:
    """Byte caps of the pipeline and what happens at them (see DurableBatchSpanProcessor and Spool)."""
    queue_max_bytes: int = 256 << 20
    batch_max_bytes: int = 16 << 20
    spool_max_bytes: int = 5 << 30
    spool_full: str = "drop_oldest"
    poison_attempts: int = 3
    write_ahead: bool = True  # encoded spans go to a write-ahead log within flush_interval_seconds of ending
    flush_interval_seconds: float = 0.1


def start_recording(*, dsn: str, spool_dir: str, schema: SchemaSettings | None = None,
                    batch_max_rows: int = 2000, batch_max_seconds: float = 1.0, queue_max: int = 50_000,
                    retry_min_seconds: float = 1.0, retry_max_seconds: float = 30.0, service_name: str = "tagway",
                    resource_attributes: Mapping[str, Any] | None = None, enabled: bool = True,
                    store: Store | None = None, limits: RecordingLimits | None = None,
                    adopt: Iterable[str] = ()) -> Recorder:
    """Connect, migrate, replay any spool left by an earlier process, and return a recording `Recorder`.

    Raises `StoreLockedError` (one clear line) when another process holds the embedded data directory or the
    spool directory, and `StoreError` when the embedded store cannot be opened. A ClickHouse *server* that is
    down is not an error: spans are spooled and the schema is migrated once it answers.

    `store` overrides `dsn` with an already open store, which the recorder then does not close. `adopt`: other
    spool directories whose leftovers this recorder sends, when no process holds them (`adopt_spools`).
    """
    if not enabled:
        return disabled_recorder(service_name=service_name, resource_attributes=resource_attributes)
    provider = _provider(service_name, resource_attributes)
    tracer = _tracer(provider)  # before anything is opened: it refuses an SDK turned off
    schema = schema if schema is not None else SchemaSettings()
    metrics = ExportMetrics()
    owns_store = store is None
    # The spool first: it is the cheap lock to take (and to fail on) before anything is connected.
    limits = limits if limits is not None else RecordingLimits()
    spool = Spool(spool_dir, metrics=metrics, max_bytes=limits.spool_max_bytes, on_full=limits.spool_full)
    try:
        recover_wal(os.path.join(spool.directory, WAL_DIR), spool, schema.name(TABLE), limits.batch_max_bytes)
        adopt_spools(spool, adopt, schema.name(TABLE), limits.batch_max_bytes)
        store, schema_ready = _connect_and_migrate(dsn, store, schema, owns_store, spool_dir)
    except BaseException:
        spool.close()
        raise
    try:
        exporter = ClickHouseSpanExporter(store=store, dsn=dsn, schema=schema, metrics=metrics,
                                          owns_store=owns_store, schema_ready=schema_ready)
        processor = DurableBatchSpanProcessor(exporter, spool, metrics=metrics, batch_max_rows=batch_max_rows,
                                              batch_max_seconds=batch_max_seconds, queue_max=queue_max,
                                              retry_min_seconds=retry_min_seconds,
                                              retry_max_seconds=retry_max_seconds,
                                              poison_attempts=limits.poison_attempts,
                                              batch_max_bytes=limits.batch_max_bytes,
                                              queue_max_bytes=limits.queue_max_bytes,
                                              wal=WriteAheadLog(os.path.join(spool.directory, WAL_DIR))
                                              if limits.write_ahead else None,
                                              flush_interval_seconds=limits.flush_interval_seconds)
    except BaseException:
        spool.close()
        if store is not None and owns_store:
            store.close()
        raise
    provider.add_span_processor(processor)
    return Recorder(tracer_provider=provider, tracer=tracer, metrics=metrics, processor=processor,
                    exporter=exporter, spool=spool, enabled=True)


def recover_wal(directory: str, spool: Spool, table: str, max_bytes: int) -> int:
    """Spool what a killed process had in its write-ahead log (exporters/wal.py), then remove the log. Returns the
    rows recovered. A log that cannot be spooled now (a full disk) is moved aside whole, beside the spool, and tried
    again at every start, oldest first: the gateway starts meanwhile, and its own new log starts afresh."""
    parent = os.path.dirname(directory)
    held = sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(HELD_PREFIX)) \
        if os.path.isdir(parent) else []
    rows = 0
    for d in held + [directory]:
        got, ok = _spool_log(d, spool, table, max_bytes)
        rows += got
        if ok:
            continue
        if d == directory:  # its segments go aside whole (a rename needs no room), under a name of their own
            aside = os.path.join(parent, f"{HELD_PREFIX}{time.time_ns()}")
            try:
                os.rename(directory, aside)
            except OSError as e:
                raise StoreError(f"cannot spool what the write-ahead log in {directory} holds, nor set it aside "
                                 f"({e.strerror or e}); it is kept for the next start") from None
            d = aside
        log.error("cannot spool what the write-ahead log in %s holds (%s); it is kept there and spooled at a later "
                  "start", d, spool.write_error or "the spool cannot be written")
    if rows:
        log.warning("recovered %d spans from the write-ahead log of a process that did not stop cleanly; they are"
                    " in the spool and will be sent", rows)
    return rows


def _spool_log(directory: str, spool: Spool, table: str, max_bytes: int) -> tuple[int, bool]:
    """Spool one log directory's batches and remove it: (rows spooled, whether all of it was)."""
    batches, files = read_pending(directory, max_bytes)
    already = spool.digests()  # a batch spooled just before the kill (or by an earlier, partial try)
    rows = 0
    for bodies, n in batches:
        batch = EncodedBatch.of(table, bodies, n)
        if batch.digest in already:
            continue
        try:
            if spool.write(batch, keep_on_error=True) is None:
                continue  # the cap's policy dropped it, counted, as it drops any batch past the cap
        except SpoolWriteError:
            return rows, False
        rows += n
    for path in files:
        os.unlink(path)
    if os.path.basename(directory).startswith(HELD_PREFIX):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return rows, True


def adopt_spools(spool: Spool, directories: Iterable[str], table: str, max_bytes: int) -> int:
    """Move into `spool` the files (and write-ahead logs, recovered first) that other spool directories hold, each
    while no process holds it: a gateway restarted with fewer workers sends what the missing workers' spools kept,
    which nobody would ever open again. A directory in use (a running worker's) is left alone. Returns the files
    moved."""
    moved = 0
    for directory in directories:
        if os.path.realpath(directory) == spool.directory or not os.path.isdir(directory):
            continue
        try:
            other = Spool(directory, metrics=ExportMetrics())
        except SpoolLockedError:
            continue
        try:
            recover_wal(os.path.join(other.directory, WAL_DIR), other, table, max_bytes)
            for f in other.pending():  # the same file system: a rename, oldest first
                os.rename(os.path.join(other.directory, f.name), os.path.join(spool.directory, f.name))
                moved += 1
        finally:
            other.close()
    if moved:
        spool.rescan()
        log.warning("took over %d spool file(s) left by gateway processes that no longer run (a restart with fewer "
                    "workers); they will be sent", moved)
    return moved


def _connect_and_migrate(dsn: str, store: Store | None, schema: SchemaSettings, owns_store: bool,
                         spool_dir: str) -> tuple[Store | None, bool]:
    """The store (None while a server is unreachable) and whether its schema is migrated. A ClickHouse server is
    reached later, by the exporter's own thread: one that hangs must not hold the gateway's start-up."""
    if store is None and not is_embedded(dsn):
        return None, False
    if store is None:
        try:
            store = connect(dsn)
        except StoreLockedError:
            raise
        except StoreError as e:
            if is_embedded(dsn):
                raise
            log.error("ClickHouse at %s is unreachable (%s): recording to the spool at %s until it answers",
                      redact_dsn(dsn), e, spool_dir)
            return None, False
    try:
        migrate(store, schema)
        return store, True
    except StoreError as e:
        if is_embedded(store.dsn) and owns_store:
            store.close()
            raise
        log.error("migrating the ClickHouse schema failed (%s): spooling spans until it succeeds", e)
        return store, False


def disabled_recorder(*, service_name: str = "tagway",
                      resource_attributes: Mapping[str, Any] | None = None) -> Recorder:
    """A Recorder whose spans are created as usual (each call still gets its trace id and is counted) but discarded.
    The gateway captures no content for it (gateway/proxy.py): nothing would store it."""
    metrics = ExportMetrics()
    processor = DiscardingSpanProcessor(metrics)
    provider = _provider(service_name, resource_attributes)
    provider.add_span_processor(processor)
    return Recorder(tracer_provider=provider, tracer=_tracer(provider), metrics=metrics, processor=processor,
                    enabled=False)


class DiscardingSpanProcessor(SpanProcessor):
    """Recording turned off on purpose: every span is counted as `spans_discarded` and nothing else."""

    def __init__(self, metrics: ExportMetrics) -> None:
        self._metrics = metrics

    def on_end(self, span: ReadableSpan) -> None:
        self._metrics.inc("spans_discarded")


def _provider(service_name: str, resource_attributes: Mapping[str, Any] | None) -> TracerProvider:
    attrs: dict[str, Any] = {"service.name": service_name}
    version = _version()
    if version:
        attrs["service.version"] = version
    attrs.update(resource_attributes or {})
    # ALWAYS_ON, not the default ParentBased: a caller's `traceparent` with sampled=0 must not switch recording
    # off, since every call has to be counted.
    # The gateway's call spans are built finished and never pass through these limits (gateway/telemetry.CallSpans);
    # they hold for any span started the SDK's way on this provider. The SDK's default (128 attributes, oldest
    # dropped first) would silently cut a span's first attributes (tagway.kind, the customer) when it carried many
    # tags; 256 leaves room for ~40 of a call's own and 64 tags.
    limits = SpanLimits(max_span_attributes=256, max_attribute_length=None)
    return TracerProvider(resource=Resource.create(attrs), sampler=ALWAYS_ON, span_limits=limits)


class SdkDisabledError(StoreError):
    """The OpenTelemetry SDK is turned off in this process (OTEL_SDK_DISABLED), so no call could be stamped."""


def _tracer(provider: TracerProvider) -> trace_api.Tracer:
    tracer = provider.get_tracer(SCOPE_NAME, _version() or None)
    if not isinstance(tracer, Tracer):  # what the SDK hands out under OTEL_SDK_DISABLED=true: a no-op tracer
        raise SdkDisabledError("OTEL_SDK_DISABLED=true turns off the OpenTelemetry SDK, which tagway stamps every "
                               "call with: unset it for the gateway (recording.enabled: false stops storing calls)")
    return tracer


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("tagway")
    except importlib.metadata.PackageNotFoundError:
        return ""
