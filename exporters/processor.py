"""`DurableBatchSpanProcessor`: the SDK's batch processor contract without its silent drops.

The SDK's BatchSpanProcessor keeps a `deque(maxlen=2048)`: when ClickHouse is slow the oldest spans fall off the
end and nobody knows. Here nothing falls off:

* `on_end` (called on the gateway's event-loop thread) only appends to a deque and, at a threshold, sets an
  Event. No I/O, no locks beyond the Event's, no logging (a log handler exporting spans would recurse,
  opentelemetry-python#4261), no exceptions.
* An encoder thread turns queued spans into JSONEachRow bytes in chunks of ~256, soon after they end. The
  backlog is then held as bytes, not as SDK span objects (~11 GC-tracked objects each): a backlog of spans makes
  every full GC pause (and so the event loop) longer, measured at ~400 ms for a few tens of thousands of spans.
* A sender thread groups chunks into batches of up to `batch_max_rows` (or whatever is encoded after
  `batch_max_seconds`) and inserts them. chDB runs one statement at a time, so one sender is all it can use;
  the insert releases the GIL, so encoding goes on meanwhile.
* An insert that fails puts the batch's bytes in the spool and the processor turns *degraded*: new batches go to
  the spool behind the older ones, and the spool is replayed oldest first, with capped exponential backoff,
  until it is empty. Spool files left by a previous process are replayed the same way on start.
* If the sender is stuck in a slow insert and the encoded backlog passes `queue_max` rows, the encoder writes the
  oldest of it to the spool. A batch takes its spool sequence number when it is formed, so the spool replays
  batches in the order their spans ended.

* A spool file that ClickHouse refuses `poison_attempts` times with an error its rows can cause (a data error,
  not an outage: exporters/insert_errors.py) is halved until the refused rows stand alone; the rest is sent and the
  refused rows are quarantined (`*.poison`, kept on disk, counted, one log line; `tagway db spool` lists, re-queues
  or purges them), so one bad row never stops recording.

A spool write that fails (a full disk, an I/O error) keeps its batch and writes it again each retry interval
(straight to ClickHouse once it answers), in memory up to `queue_max_bytes` more; a stop before that leaves it in
the write-ahead log, which the next start spools. What neither can keep is counted as dropped and logged at ERROR:
the only loss.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from typing import Sequence

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from .clickhouse import ClickHouseSpanExporter
from .insert_errors import may_be_poison
from .metrics import ExportMetrics
from .rows import EncodedBatch
from .spool import Spool, SpoolFile, SpoolWriteError
from .store import StoreError
from .wal import WriteAheadLog

__all__ = ["DurableBatchSpanProcessor", "split_rows"]

log = logging.getLogger(__name__)

_CHUNK_ROWS = 256  # spans encoded per step: short GIL holds, few wake-ups
_CHUNK_BYTES = 4 << 20  # ...fewer when spans are big (captured content), so one step holds ~4 MB at most


@dataclasses.dataclass(slots=True)
class _Chunk:
    start: int  # on_end index of its first span
    rows: int
    body: bytes  # newline-terminated JSONEachRow lines


@dataclasses.dataclass(slots=True)
class _Batch:
    starts: list[int]
    encoded: EncodedBatch
    seq: int  # spool sequence number, reserved when the batch was formed


class DurableBatchSpanProcessor(SpanProcessor):
    """`batch_max_rows`/`batch_max_seconds`: an insert happens when that many rows are encoded, or that long after
    the previous partial one. `queue_max`: encoded rows held in memory while the sender is busy before the oldest
    are spilled to the spool. `retry_*`: backoff between replays while ClickHouse fails. `shutdown_timeout_seconds`:
    how long shutdown waits for a hanging insert before spooling the rest itself. `poison_attempts`: refusals of a
    spool file's rows (a data error, the server otherwise fine) before its refused rows are set aside."""

    def __init__(self, exporter: ClickHouseSpanExporter, spool: Spool, *, metrics: ExportMetrics | None = None,
                 batch_max_rows: int = 2000, batch_max_seconds: float = 1.0, queue_max: int = 50_000,
                 retry_min_seconds: float = 1.0, retry_max_seconds: float = 30.0,
                 shutdown_timeout_seconds: float = 30.0, poison_attempts: int = 3,
                 batch_max_bytes: int = 16 << 20, queue_max_bytes: int = 256 << 20,
                 wal: WriteAheadLog | None = None, flush_interval_seconds: float = 0.1) -> None:
        assert batch_max_rows > 0 and batch_max_seconds > 0, "batch limits must be positive"
        assert queue_max >= batch_max_rows, "queue_max must be at least batch_max_rows"
        self._exporter = exporter
        self._spool = spool
        self.metrics = metrics if metrics is not None else exporter.metrics
        self._batch_max_rows = batch_max_rows
        self._batch_max_seconds = batch_max_seconds
        # Equal chunks that add up to exactly one batch (2000 -> 8 x 250), so batches come out full.
        chunks_per_batch = -(-batch_max_rows // _CHUNK_ROWS)
        self._chunk_rows = max(1, batch_max_rows // chunks_per_batch)
        self._queue_max = queue_max
        self._batch_max_bytes = max(1, batch_max_bytes)
        self._queue_max_bytes = max(self._batch_max_bytes, queue_max_bytes)
        self._chunk_rows_now = self._chunk_rows  # lowered while spans are big (see _CHUNK_BYTES)
        self._retry_min = retry_min_seconds
        self._retry_max = retry_max_seconds
        self._shutdown_timeout = shutdown_timeout_seconds
        self._poison_attempts_max = max(1, poison_attempts)
        self._wal = wal
        self._flush_interval = flush_interval_seconds
        self._poison_attempts: dict[str, int] = {}  # spool file -> refusals that the rows may have caused
        self._rescan_at = 0.0  # monotonic: look for re-queued spool files no earlier than this

        # on_end appends spans on the right; the encoder pops them on the left (deque ops are atomic).
        self._spans: collections.deque[ReadableSpan] = collections.deque()
        self._encode_wake = threading.Event()
        self._send_wake = threading.Event()
        # Guards the bookkeeping below (never taken by on_end).
        self._cv = threading.Condition(threading.Lock())
        self._encoded: collections.deque[_Chunk] = collections.deque()
        self._encoded_rows = 0
        self._encoded_bytes = 0
        self._taken = 0  # spans popped from `_spans` so far
        self._inflight: set[int] = set()  # start index of every chunk not yet exported/spooled
        self._flush_target = 0  # spans below this index are wanted out now (force_flush)

        # Batches the spool could not write (a full disk): kept, oldest first, and written again each retry
        # interval; their chunks stay undone in the write-ahead log, so a stop before that rebuilds them at the
        # next start. Past queue_max_bytes the oldest are dropped, counted. Guarded by `_cv`.
        self._stranded: collections.deque[_Batch] = collections.deque()
        self._stranded_bytes = 0
        self._stranded_rows = 0
        self._stranded_retry_at = 0.0

        self._degraded = False
        self._inherited = False  # degraded only by an earlier process's spool, not by a failure seen here
        self.last_error = ""  # why the processor is degraded (the last ClickHouse error), for /readyz
        self._backoff = 0.0
        self._retry_at = 0.0  # monotonic; replay the spool no earlier than this
        self._shutdown = False  # no more waiting for full batches: encode everything, then stop
        self._sender_final = False  # the sender's last cycle: drain, no replay
        self._closed = False  # the final sweep has begun: a late span is spooled by on_end itself
        self._shutdown_lock = threading.Lock()

        self.metrics.set_gauge("queue_depth", lambda: len(self._spans) + self._encoded_rows + self._stranded_rows)
        self.metrics.set_gauge("queue_bytes", lambda: self._encoded_bytes + self._stranded_bytes)
        self.metrics.set_gauge("export_degraded", lambda: 1 if self._degraded else 0)
        if spool.pending_files:
            self._degraded = True  # behind the files of an earlier run until they are re-sent
            self._inherited = True  # ...which is not ClickHouse failing: _recovered says which it was
        self._encoder = threading.Thread(target=self._run_encoder, name="tagway-span-encode", daemon=True)
        self._sender = threading.Thread(target=self._run_sender, name="tagway-span-send", daemon=True)
        self._encoder.start()
        self._sender.start()

    # -- SpanProcessor ----------------------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: object = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        # Hot path: O(1), no I/O, no logging, never raises.
        try:
            if not span.context.trace_flags.sampled:
                return
            spans = self._spans
            spans.append(span)
            if len(spans) >= self._chunk_rows and not self._encode_wake.is_set():
                self._encode_wake.set()
            if self._closed:
                # Ended after shutdown's final sweep began: nobody else will see it. Shutdown is over, so
                # spooling here (synchronous I/O) is no longer on a serving event loop.
                self._sweep()
        except Exception:  # pragma: no cover - a processor must never break the instrumented code
            try:
                self.metrics.inc("spans_dropped")  # not silent: it shows on /metrics
            except Exception:
                pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export (or spool, while ClickHouse fails) every span ended before this call. False on timeout or
        after shutdown."""
        if self._shutdown:
            return False
        with self._cv:
            target = self._taken + len(self._spans)
            self._flush_target = max(self._flush_target, target)
        self._encode_wake.set()
        self._send_wake.set()
        with self._cv:
            return self._cv.wait_for(lambda: self._handled_upto() >= target, timeout_millis / 1000)

    def shutdown(self) -> None:
        """Idempotent. Flushes everything queued (to ClickHouse, or the spool if it is failing), stops the
        threads, then shuts the exporter down."""
        with self._shutdown_lock:
            if self._shutdown:
                return
            self._shutdown = True
        deadline = time.monotonic() + self._shutdown_timeout
        self._encode_wake.set()
        self._encoder.join(self._shutdown_timeout)
        self._sender_final = True
        self._send_wake.set()
        self._sender.join(max(0.1, deadline - time.monotonic()))
        stuck = self._sender.is_alive() or self._encoder.is_alive()
        if stuck:
            log.error("span export still busy after %.0fs (ClickHouse insert hanging?); spooling the %d queued"
                      " spans directly", self._shutdown_timeout, len(self._spans) + self._encoded_rows)
        self._closed = True
        self._sweep()
        if self._wal is not None and not stuck:
            self._wal.close()  # everything is stored or spooled: the log goes
        if stuck:
            return  # closing the store would wait for the hanging insert; the process is going away anyway
        self._exporter.shutdown()

    # -- introspection ----------------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def queue_depth(self) -> int:
        """Spans held in memory: not yet encoded, or encoded and not yet inserted or spooled (or kept after a spool
        write failed)."""
        return len(self._spans) + self._encoded_rows + self._stranded_rows

    @property
    def handled_spans(self) -> int:
        """Every span below this index (in on_end order, from this processor's start) has been exported, spooled
        or (on a failed spool write, logged) dropped."""
        with self._cv:
            return self._handled_upto()

    def _handled_upto(self) -> int:
        return min(self._inflight) if self._inflight else self._taken

    # -- encoding ---------------------------------------------------------------------------------------------
    def _run_encoder(self) -> None:
        # how long an ended span may wait to be encoded (and written to the write-ahead log, when there is one):
        # the most a SIGKILL can lose
        interval = min(self._flush_interval, self._batch_max_seconds / 4)
        while True:
            self._encode_wake.wait(interval)
            self._encode_wake.clear()
            stopping = self._shutdown
            try:
                self._encode_queued()
            except Exception:  # keep the thread alive whatever a bug does; the queue is intact
                log.exception("span encoding failed; retrying")
                time.sleep(interval)
            if stopping:
                return

    def _encode_queued(self) -> None:
        """Encode every queued span, a chunk at a time; spill the oldest of the backlog past `queue_max`."""
        while True:
            chunks = self._encode_chunk()
            if not chunks:
                return
            with self._cv:
                for chunk in chunks:
                    self._encoded.append(chunk)
                    self._encoded_rows += chunk.rows
                    self._encoded_bytes += len(chunk.body)
                backlog, backlog_bytes = self._encoded_rows, self._encoded_bytes
                flush_due = self._flush_target > self._encoded[0].start
            if backlog >= self._batch_max_rows or backlog_bytes >= self._batch_max_bytes or flush_due:
                self._send_wake.set()
            if backlog > self._queue_max or backlog_bytes > self._queue_max_bytes:
                self._spill(low_water=self._queue_max // 2, low_water_bytes=self._queue_max_bytes // 2)

    def _encode_chunk(self) -> list[_Chunk]:
        """The next spans, encoded: one chunk, or several when their bytes pass what one batch may hold."""
        with self._cv:
            n = min(len(self._spans), self._chunk_rows_now)
            if n == 0:
                return []
            popleft = self._spans.popleft
            spans = [popleft() for _ in range(n)]
            start = self._taken
            self._taken += n
            self._inflight.add(start)
        body, rows = self._encode(spans)
        if rows:  # big spans (captured content): encode fewer at a time, so a step holds a few MB at most
            self._chunk_rows_now = max(1, min(self._chunk_rows, _CHUNK_BYTES * rows // max(1, len(body))))
        if len(body) <= self._batch_max_bytes:
            chunks = [_Chunk(start, rows, body)]
        else:
            chunks = [_Chunk(start + offset, k, part) for offset, k, part in split_rows(body, self._batch_max_bytes)]
            with self._cv:  # each piece is tracked on its own (`start` stays in flight until the first is handled)
                self._inflight.update(c.start for c in chunks)
        if self._wal is not None:
            for c in chunks:
                self._wal.chunk(c.start, c.rows, c.body)
        return chunks

    def _encode(self, spans: Sequence[ReadableSpan]) -> tuple[bytes, int]:
        try:
            b = self._exporter.encode(spans)
            return b.body, b.rows
        except Exception:
            log.exception("encoding %d spans failed; encoding them one by one", len(spans))
        bodies: list[bytes] = []
        for span in spans:
            try:
                bodies.append(self._exporter.encode([span]).body)
            except Exception as e:
                log.error("span %r could not be encoded and is DROPPED: %s", getattr(span, "name", "?"), e)
                self.metrics.inc("spans_dropped")
        return b"".join(bodies), len(bodies)

    def _form_batch(self) -> _Batch | None:
        """The oldest encoded chunks, up to `batch_max_rows` rows (caller holds `_cv`)."""
        if not self._encoded:
            return None
        chunks: list[_Chunk] = []
        rows = size = 0
        while self._encoded and (not chunks or (rows + self._encoded[0].rows <= self._batch_max_rows
                                                and size + len(self._encoded[0].body) <= self._batch_max_bytes)):
            chunk = self._encoded.popleft()
            chunks.append(chunk)
            rows += chunk.rows
            size += len(chunk.body)
        self._encoded_rows -= rows
        self._encoded_bytes -= size
        return _Batch([c.start for c in chunks], EncodedBatch.of(self._exporter.table, [c.body for c in chunks], rows),
                      self._spool.reserve())

    def _formed(self, batch: _Batch) -> None:
        """Note the batch's make-up before it goes anywhere, so a restart can rebuild it byte for byte."""
        if self._wal is not None:
            self._wal.batch(batch.seq, batch.starts)

    def _done(self, batch: _Batch) -> None:
        if self._wal is not None:
            self._wal.done(batch.starts)
        with self._cv:
            self._inflight.difference_update(batch.starts)
            self._cv.notify_all()

    def _spill(self, *, low_water: int, low_water_bytes: int = 0) -> None:
        """Write the oldest encoded batches to the spool until the backlog is down to `low_water` rows and
        `low_water_bytes` bytes (0: all of it)."""
        while True:
            with self._cv:
                if not self._encoded or (low_water > 0 and self._encoded_rows <= low_water
                                         and self._encoded_bytes <= low_water_bytes):
                    return
                batch = self._form_batch()
            if batch is None:
                return
            self._formed(batch)
            handled = True
            try:
                handled = self._spool_or_keep(batch)
            finally:
                if handled:
                    self._done(batch)

    def _spool_or_keep(self, b: _Batch) -> bool:
        """Spool the batch; True when that is settled (written, or dropped by the cap's policy, counted). A write
        that fails keeps the batch for a later try (False): a full disk does not drop what can wait. A kept batch
        no longer holds up a flush (it cannot reach the store before the disk has room, and a flush that waited
        for it would stall every local command and the spool's replay), but its chunks stay undone in the
        write-ahead log until it is written."""
        try:
            self._spool.write(b.encoded, b.seq, keep_on_error=True)
            return True
        except SpoolWriteError:
            pass
        dropped: list[_Batch] = []
        with self._cv:
            self._keep(b)
            self._inflight.difference_update(b.starts)
            while self._stranded_bytes > self._queue_max_bytes and len(self._stranded) > 1:
                dropped.append(self._take())
            self._cv.notify_all()
        for old in dropped:  # memory is bounded too: the oldest go, counted
            log.error("spool still cannot be written (%s): %d spans kept too long are DROPPED",
                      self._spool.write_error, old.encoded.rows)
            self.metrics.inc("spans_dropped", old.encoded.rows)
            self._done(old)
        return False

    def _keep(self, b: _Batch, *, first: bool = False) -> None:
        """Hold a batch the spool could not take (caller holds `_cv`): last, or `first` when it goes back."""
        (self._stranded.appendleft if first else self._stranded.append)(b)
        self._stranded_bytes += b.encoded.size
        self._stranded_rows += b.encoded.rows

    def _take(self) -> _Batch:
        """The oldest kept batch, out of the count (caller holds `_cv`)."""
        b = self._stranded.popleft()
        self._stranded_bytes -= b.encoded.size
        self._stranded_rows -= b.encoded.rows
        return b

    def _retry_stranded(self, *, final: bool = False) -> None:
        """Store the kept batches, oldest first: straight into ClickHouse while it answers, else into the spool,
        until one fails again (at most once a retry interval, unless `final`). At the end (`final`), what still
        cannot be written stays in the write-ahead log for the next start where the log holds it, and is dropped,
        counted, where it does not."""
        now = time.monotonic()
        if not self._stranded or (not final and now < self._stranded_retry_at):
            return
        self._stranded_retry_at = now + self._retry_min
        while True:
            with self._cv:
                if not self._stranded:
                    return
                b = self._take()
            if not final and (not self._degraded or time.monotonic() >= self._retry_at):
                try:  # ClickHouse answers (or it is time to ask again): the batch needs no disk at all
                    self._exporter.send(b.encoded)
                    self.metrics.inc("spans_exported", b.encoded.rows)
                    self._done(b)
                    if self._degraded and not self._spool.pending_files:
                        self._recovered(0)
                    continue
                except StoreError as e:
                    self._failed(e, b.encoded.rows)
            try:
                self._spool.write(b.encoded, b.seq, keep_on_error=True)
            except SpoolWriteError:
                with self._cv:
                    self._keep(b, first=True)
                if final:
                    self._give_up_stranded()
                return
            self._done(b)

    def _give_up_stranded(self) -> None:
        with self._cv:
            left = [self._take() for _ in range(len(self._stranded))]
        held: list[_Batch] = []
        lost: list[_Batch] = []
        for b in left:
            (held if self._wal is not None and self._wal.holds(b.starts) else lost).append(b)
        if held:  # undone there: rebuilt into the spool at the next start
            log.error("spool cannot be written (%s): %d spans stay in the write-ahead log and are spooled at the "
                      "next start", self._spool.write_error, sum(b.encoded.rows for b in held))
        if lost:  # the log could not take them either (the same full disk), or there is none
            rows = sum(b.encoded.rows for b in lost)
            log.error("spool cannot be written (%s): %d spans DROPPED", self._spool.write_error, rows)
            self.metrics.inc("spans_dropped", rows)
            for b in lost:
                self._done(b)

    # -- sending ----------------------------------------------------------------------------------------------
    def _run_sender(self) -> None:
        # The exporter's own I/O (an instrumented HTTP client, say) must not produce spans.
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            self._connect_early()
            next_partial = time.monotonic() + self._batch_max_seconds
            while True:
                now = time.monotonic()
                wait = next_partial - now
                if self._degraded and self._spool.pending_files:
                    wait = min(wait, self._retry_at - now)
                if wait > 0:
                    self._send_wake.wait(wait)
                self._send_wake.clear()
                final = self._sender_final
                partial = final or time.monotonic() >= next_partial
                try:
                    self._send_cycle(partial=partial, final=final)
                except Exception:  # keep the thread alive whatever a bug does; the backlog is intact
                    log.exception("span export cycle failed; retrying")
                    time.sleep(min(1.0, self._batch_max_seconds))
                if partial:
                    next_partial = time.monotonic() + self._batch_max_seconds
                if final:
                    return
        finally:
            detach(token)

    def _connect_early(self) -> None:
        """Reach ClickHouse (and migrate) now rather than at the first batch, here on the sender thread: the
        gateway serves meanwhile, and a server that is down or hangs at start-up only means spooling."""
        try:
            self._exporter.connect()
        except StoreError as e:
            self._failed(e, 0)
        except Exception as e:  # a driver bug: the first send will try again
            self._failed(StoreError(f"{type(e).__name__}: {e}"), 0)

    def _retry_connect(self, *, final: bool) -> None:
        """Reach ClickHouse again, on the backoff's schedule, when start-up could not (down, refusing, too old, its
        schema behind what this user may migrate) and nothing waits in the spool to retry with: /readyz then clears
        as soon as it answers, not at the next call."""
        if (final or not self._degraded or self._spool.pending_files or self._stranded
                or getattr(self._exporter, "ready", True) or time.monotonic() < self._retry_at):
            return
        try:
            self._exporter.connect()
        except Exception as e:  # noqa: BLE001 - a driver bug counts as a failure too; the next cycle asks again
            self._failed(e if isinstance(e, StoreError) else StoreError(f"{type(e).__name__}: {e}"), 0)
            return
        self._recovered(0)

    def _send_cycle(self, *, partial: bool, final: bool) -> None:
        now = time.monotonic()
        if now >= self._rescan_at and not final:  # files re-queued by `tagway db spool retry`
            self._rescan_at = now + 5.0
            self._spool.rescan()
        self._maybe_replay(final=final)
        self._retry_connect(final=final)
        # A partial (timed) send takes what was encoded when it began. Taking what arrives during its inserts too
        # chained small batches back to back as long as spans kept coming (~250 a batch at ~1,000 calls/s instead of
        # ~1,000), and each insert's fixed cost (~50-100 ms of chDB CPU through the views) with them.
        self._retry_stranded()
        with self._cv:
            cutoff = self._taken if not final else float("inf")
        while True:
            with self._cv:
                if not self._encoded:
                    return
                wanted = (self._encoded_rows >= self._batch_max_rows
                          or (partial and self._encoded[0].start < cutoff)
                          or self._encoded_bytes >= self._batch_max_bytes
                          or self._flush_target > self._encoded[0].start)
                batch = self._form_batch() if wanted else None
            if batch is None:
                return
            self._formed(batch)
            handled = True
            try:
                handled = self._export_or_spool(batch, final=final)
            finally:
                if handled:
                    self._done(batch)

    def _export_or_spool(self, b: _Batch, *, final: bool) -> bool:
        """Insert the batch, or spool it; False when the spool could not take it and it is kept for later."""
        batch, seq = b.encoded, b.seq
        if batch.rows == 0:
            return True
        if self._degraded and (final or time.monotonic() < self._retry_at):
            return self._spool_or_keep(b)  # still backing off (or shutting down): queue up behind older batches
        # Batches spooled before this one (seq < ours) must reach ClickHouse first.
        self._maybe_replay(final=final, before=seq)
        oldest = self._spool.oldest_seq()
        if (self._degraded and time.monotonic() < self._retry_at) or (oldest is not None and oldest < seq):
            return self._spool_or_keep(b)
        try:
            self._exporter.send(batch)
        except StoreError as e:
            self._failed(e, batch.rows)
            return self._spool_or_keep(b)
        self.metrics.inc("spans_exported", batch.rows)
        if self._degraded and not self._spool.pending_files:
            self._recovered(0)
        return True

    def _maybe_replay(self, *, final: bool, before: int | None = None) -> None:
        """Re-send spool files oldest first (only those older than sequence `before`, when given), if the backoff
        allows. Stops at the first failure, and when a flush or shutdown is waiting for the queue."""
        if final or not self._spool.pending_files or time.monotonic() < self._retry_at:
            # At shutdown the spool stays for the next start: replaying a backlog could outlast the process.
            return
        resent = 0
        for f in self._spool.pending():
            if before is not None and f.seq >= before:
                break
            if self._flush_target > self._handled_upto_unlocked() or self._shutdown:
                return  # the queue is wanted now (flush/shutdown); resume on the next cycle
            try:
                batch = self._spool.read(f)
            except OSError as e:
                self._failed(e, 0)
                return
            if batch is None:
                continue  # quarantined (logged and counted) or gone
            try:
                self._exporter.send(batch)
            except StoreError as e:
                if not self._poisoned(f, batch, e):
                    self._failed(e, 0)
                    return
                resent += self._isolate(f, batch, e)
                continue
            self._poison_attempts.pop(f.name, None)
            self._spool.remove(f)
            self.metrics.inc("spans_resent", batch.rows)
            resent += batch.rows
        if not self._spool.pending_files:
            self._recovered(resent)

    # -- poison batches -----------------------------------------------------------------------------------------
    def _poisoned(self, f: SpoolFile, batch: EncodedBatch, err: StoreError) -> bool:
        """Has ClickHouse refused this file's rows `poison_attempts` times with an error the rows can cause?"""
        if not may_be_poison(err):
            return False
        n = self._poison_attempts[f.name] = self._poison_attempts.get(f.name, 0) + 1
        if n < self._poison_attempts_max:
            log.warning("ClickHouse refused spool file %s (%d rows), attempt %d of %d before it is set aside: %s",
                        f.name, batch.rows, n, self._poison_attempts_max, err)
            return False
        self._poison_attempts.pop(f.name, None)
        return True

    def _isolate(self, f: SpoolFile, batch: EncodedBatch, err: StoreError) -> int:
        """Halve a refused file until the refused rows stand alone; send every half ClickHouse takes and
        quarantine the rows it refuses (kept on disk, listed by `tagway db spool`), so one bad row holds back
        neither its batch nor the batches behind it. Returns the rows that got through. A transient error midway
        leaves the remaining halves in the spool, in order, for the next replay."""
        if batch.rows <= 1:
            self._spool.quarantine(f.name, str(err), poison=True, rows=batch.rows)
            return 0
        sent = 0
        for half in self._spool.split(f, batch):
            part = self._spool.read(half)
            if part is None:
                continue
            try:
                self._exporter.send(part)
            except StoreError as e:
                if not may_be_poison(e):
                    return sent
                sent += self._isolate(half, part, e)
                continue
            self._spool.remove(half)
            self.metrics.inc("spans_resent", part.rows)
            sent += part.rows
        return sent

    def _handled_upto_unlocked(self) -> int:
        with self._cv:
            return self._handled_upto()

    def _failed(self, err: Exception, rows: int) -> None:
        if self._degraded:
            self._backoff = min(self._retry_max, max(self._retry_min, self._backoff * 2))
        else:
            self._backoff = self._retry_min
        # Jitter, so gateway replicas do not retry against a recovering server in lockstep.
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
        self.last_error = str(err)
        self._inherited = False  # a failure of its own now
        what = (f"{rows} spans go to the spool at {self._spool.directory}" if rows else
                "replay of the spool failed" if self._spool.pending_files else
                f"spans go to the spool at {self._spool.directory} until it answers")
        if not self._degraded:
            log.error("ClickHouse unreachable or failing: %s; %s, and are re-sent when ClickHouse answers (retry"
                      " in %.1fs, backing off up to %.0fs)", err, what, self._backoff, self._retry_max)
        else:
            log.warning("ClickHouse still failing: %s; %s; %d spool files pending; next retry in %.1fs",
                        err, what, self._spool.pending_files, self._backoff)
        self._degraded = True

    def _recovered(self, resent: int) -> None:
        if self._degraded and self._inherited:
            log.warning("stored %d spans an earlier process left in the spool (or its write-ahead log); spool empty",
                        resent)
        elif self._degraded:
            log.warning("ClickHouse reachable again: re-sent %d spooled spans; spool empty", resent)
        self._inherited = False
        self._degraded = False
        self.last_error = ""
        self._backoff = 0.0
        self._retry_at = 0.0

    # -- after shutdown ---------------------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Spool everything still in memory, from the calling thread (the worker threads are gone or stuck)."""
        while self._encode_chunk_into_backlog():
            pass
        self._spill(low_water=0)
        self._retry_stranded(final=True)

    def _encode_chunk_into_backlog(self) -> bool:
        chunks = self._encode_chunk()
        with self._cv:
            for chunk in chunks:
                self._encoded.append(chunk)
                self._encoded_rows += chunk.rows
                self._encoded_bytes += len(chunk.body)
        return bool(chunks)


def split_rows(body: bytes, limit: int) -> list[tuple[int, int, bytes]]:
    """Newline-terminated rows cut into pieces of at most `limit` bytes (a longer row is a piece of its own):
    (row offset, rows, bytes) each."""
    out: list[tuple[int, int, bytes]] = []
    begin = row = first_row = 0
    pos = 0
    while pos < len(body):
        end = body.index(b"\n", pos) + 1
        if end - begin > limit and pos > begin:
            out.append((first_row, row - first_row, body[begin:pos]))
            begin, first_row = pos, row
        pos = end
        row += 1
    if pos > begin:
        out.append((first_row, row - first_row, body[begin:pos]))
    return out

