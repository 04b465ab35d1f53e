"""`ClickHouseSpanExporter`: the OpenTelemetry SDK `SpanExporter` that inserts spans into `otel_traces`.

Exporters decide *where*, processors decide *when* (the SDK's split). This one also exposes its two halves,
`encode()` and `send()`, so `DurableBatchSpanProcessor` can build a batch's bytes once and, if `send` fails, spool
those very bytes instead of building them again.

Every insert carries `insert_deduplication_token` = the payload's sha256, so re-sending a batch that did reach
ClickHouse (a crash between insert and spool cleanup, a timeout after the server committed) stores it once. The
token only takes effect on tables that deduplicate inserts: Replicated*MergeTree by default, a plain MergeTree
only with the table setting `non_replicated_deduplication_window` > 0 (and the MV target tables too).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .insert_errors import NotSentError
from .metrics import ExportMetrics
from .rows import INSERT_SETTINGS, TABLE, EncodedBatch, encode_spans, strings_only
from .schema import SchemaSettings, connect_creating_database, migrate
from .store import Store, StoreError, redact_dsn

__all__ = ["ClickHouseSpanExporter"]

log = logging.getLogger(__name__)


class ClickHouseSpanExporter(SpanExporter):
    """Insert spans into ClickHouse through `exporters.store.Store`.

    Give it a `store` (closed on shutdown only if `owns_store`) or a `dsn` (it connects lazily on the first send,
    and again after a failed connect: a server that is down at start-up is not an error here). Unless
    `schema_ready`, it runs `schema.migrate` once before the first insert.
    """

    def __init__(self, *, store: Store | None = None, dsn: str | None = None,
                 schema: SchemaSettings | None = None, table: str | None = None,
                 metrics: ExportMetrics | None = None, owns_store: bool | None = None,
                 schema_ready: bool = False) -> None:
        assert store is not None or dsn is not None, "need a store or a dsn"
        self._store = store
        self._owns_store = (store is None) if owns_store is None else owns_store
        self._dsn: str = dsn if dsn is not None else store.dsn  # type: ignore[union-attr]
        self._schema = schema if schema is not None else SchemaSettings()
        self.table = table if table is not None else self._schema.name(TABLE)
        self.metrics = metrics if metrics is not None else ExportMetrics()
        self._schema_ready = schema_ready
        self._ready_lock = threading.Lock()
        self._shutdown = False
        self._typed_rows: bool | None = None  # the server reads typed attribute values (INSERT_SETTINGS); asked once

    @property
    def store(self) -> Store | None:
        return self._store

    # -- the two halves ---------------------------------------------------------------------------------------
    def encode(self, spans: Sequence[ReadableSpan]) -> EncodedBatch:
        return encode_spans(spans, self.table)

    def send(self, batch: EncodedBatch) -> float:
        """Insert one encoded batch. Returns the insert's duration in seconds; raises StoreError on failure."""
        if self._shutdown:
            raise StoreError("exporter is shut down")
        t0 = time.perf_counter()
        try:
            try:
                store = self._ready()
            except StoreError as e:  # nothing was sent: never a reason to set the rows aside (insert_errors)
                raise NotSentError(str(e)) from e
            # our own Store takes the batch's parts as they are (no ~30 MB join); other stores (a test's, the
            # remote one) take the bytes of the insert_json_rows protocol
            body: Any = batch.parts if isinstance(store, Store) else batch.body
            settings = self.insert_settings(batch)
            if not self._reads_typed_rows(store):  # a server before 24.1: the attributes go as strings
                body = strings_only(batch.body)
                settings = {k: v for k, v in settings.items() if k not in INSERT_SETTINGS}
            store.insert_json_rows(batch.table, body, settings=settings)
        except StoreError:
            self.metrics.inc("export_errors")
            raise
        except Exception as e:  # a driver bug must look like a failed insert, not kill the export thread
            self.metrics.inc("export_errors")
            raise StoreError(f"insert failed: {type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - t0
        self.metrics.observe_export_seconds(elapsed)
        self.metrics.inc("batches_exported")
        return elapsed

    @staticmethod
    def insert_settings(batch: EncodedBatch) -> dict[str, Any]:
        return {**INSERT_SETTINGS, "insert_deduplication_token": f"tagway-{batch.digest}"}

    def _reads_typed_rows(self, store: Store) -> bool:
        """Whether the server knows every setting of INSERT_SETTINGS (ClickHouse 24.1 added the last; chDB has them
        all): one look at system.settings, kept. An older server would refuse each insert for an unknown setting,
        read as the rows' fault, and quarantine every call; it gets the rows with string attributes instead."""
        if self._typed_rows is None:
            try:
                rows, _ = store.query_rows("SELECT count() FROM system.settings WHERE name IN {names:Array(String)}",
                                           {"names": list(INSERT_SETTINGS)})
                self._typed_rows = bool(rows) and rows[0][0] == len(INSERT_SETTINGS)
            except Exception:  # noqa: BLE001 - not known yet: strings, which any server reads; asked again next time
                return False
            if not self._typed_rows:
                log.info("ClickHouse before 24.1 (no %s): spans are inserted with string attributes",
                         ", ".join(INSERT_SETTINGS))
        return self._typed_rows

    def connect(self) -> None:
        """Connect and migrate now (raises StoreError, counted as an export error, while ClickHouse cannot be
        reached)."""
        try:
            self._ready()
        except StoreError:
            self.metrics.inc("export_errors")
            raise

    @property
    def ready(self) -> bool:
        """Connected, and the schema migrated (no insert has to wait for either)."""
        return self._store is not None and self._schema_ready

    def _ready(self) -> Store:
        """The store, connected and migrated; raises StoreError while ClickHouse cannot be reached, is too old, or
        has migrations pending that this user may not apply (schema.MigrationsPendingError): asked again at the
        next send."""
        store = self._store
        if store is not None and self._schema_ready:
            return store
        with self._ready_lock:
            if self._store is None:
                self._store = connect_creating_database(self._dsn, self._schema)  # the DSN's database, if missing
                self._owns_store = True
                log.info("connected to ClickHouse at %s", redact_dsn(self._dsn))
            if not self._schema_ready:
                migrate(self._store, self._schema)
                self._schema_ready = True
            return self._store

    # -- SpanExporter -----------------------------------------------------------------------------------------
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            batch = self.encode(spans)
            self.send(batch)
        except StoreError as e:
            log.warning("export of %d spans to ClickHouse failed: %s", len(spans), e)
            return SpanExportResult.FAILURE
        self.metrics.inc("spans_exported", batch.rows)
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here; the processor owns the queue

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self._shutdown = True
        with self._ready_lock:
            if self._owns_store and self._store is not None:
                try:
                    self._store.close()
                except Exception as e:  # closing must not stop the caller's own shutdown
                    log.warning("closing the ClickHouse client failed: %s", e)
                self._store = None
