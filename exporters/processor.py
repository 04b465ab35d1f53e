"""`DurableBatchSpanProcessor`: the SDK's batch processor contract without its silent drops.

The SDK's BatchSpanProcessor keeps a `deque(maxlen=2048)`: when ClickHouse is slow the oldest spans fall off the
end and nobody knows. Here nothing falls off:

* `on_end` (called on the gateway's event-loop thread) only appends to an unbounded deque and, at a threshold,
  sets an Event. No I/O, no locks beyond the Event's, no logging (a log handler exporting spans would recurse,
  opentelemetry-python#4261), no exceptions.
* One export thread takes batches of up to `batch_max_rows` (or whatever is queued after `batch_max_seconds`),
  builds their bytes once and inserts them. chDB runs one statement at a time, so one thread is all it can use.
* An insert that fails puts the batch's bytes in the spool and the processor turns *degraded*: new batches go to
  the spool behind the older ones, and the spool is replayed oldest first, with capped exponential backoff,
  until it is empty. Spool files left by a previous process are replayed the same way on start.
* If the export thread is stuck in a slow insert and the queue passes `queue_max`, a spill thread moves batches
  from the queue to the spool. Batches take their spool sequence number when they leave the queue, so the spool
  replays them in the order the spans ended.

The only loss is a spool write that fails (disk full / I/O error): counted as dropped and logged at ERROR.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Sequence

from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY, attach, detach, set_value
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from .clickhouse import ClickHouseSpanExporter
from .metrics import ExportMetrics
from .rows import EncodedBatch
from .spool import Spool
from .store import StoreError

__all__ = ["DurableBatchSpanProcessor"]

log = logging.getLogger(__name__)


class DurableBatchSpanProcessor(SpanProcessor):
    def __init__(self, exporter: ClickHouseSpanExporter, spool: Spool, *, metrics: ExportMetrics | None = None,
                 batch_max_rows: int = 2000, batch_max_seconds: float = 1.0, queue_max: int = 50_000,
                 retry_min_seconds: float = 1.0, retry_max_seconds: float = 30.0,
                 shutdown_timeout_seconds: float = 30.0) -> None:
        assert batch_max_rows > 0 and batch_max_seconds > 0, "batch limits must be positive"
        assert queue_max >= batch_max_rows, "queue_max must be at least batch_max_rows"
        self._exporter = exporter
        self._spool = spool
        self.metrics = metrics if metrics is not None else exporter.metrics
        self._batch_max_rows = batch_max_rows
        self._batch_max_seconds = batch_max_seconds
        self._queue_max = queue_max
        self._retry_min = retry_min_seconds
        self._retry_max = retry_max_seconds
        self._shutdown_timeout = shutdown_timeout_seconds

        # on_end appends on the right; the export and spill threads pop on the left (deque ops are atomic).
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()  # export thread: a full batch, a flush, or shutdown
        self._spill_wake = threading.Event()  # spill thread: queue over queue_max, or shutdown
        # Guards taking from the queue and the bookkeeping below; never taken by on_end.
        self._cv = threading.Condition(threading.Lock())
        self._taken = 0  # spans taken from the queue so far
        self._inflight: dict[int, int] = {}  # first index of a batch being handled -> its size
        self._flush_target = 0  # drain partial batches until `_taken` reaches this

        self._degraded = False
        self._backoff = 0.0
        self._retry_at = 0.0  # monotonic; replay the spool no earlier than this
        self._shutdown = False
        self._closed = False  # set once the final sweep starts: late spans are then spooled by on_end itself
        self._shutdown_lock = threading.Lock()

        self.metrics.set_gauge("queue_depth", lambda: len(self._queue))
        self.metrics.set_gauge("export_degraded", lambda: 1 if self._degraded else 0)
        if spool.pending_files:
            # Behind the files of an earlier run: new batches queue up behind them until they are re-sent.
            self._degraded = True
        self._writer = threading.Thread(target=self._run_writer, name="tagway-span-export", daemon=True)
        self._spiller = threading.Thread(target=self._run_spiller, name="tagway-span-spill", daemon=True)
        self._writer.start()
        self._spiller.start()

    # -- SpanProcessor ----------------------------------------------------------------------------------------
    def on_start(self, span: Span, parent_context: object = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        # Hot path: O(1), no I/O, no logging, never raises.
        try:
            if not span.context.trace_flags.sampled:
                return
            queue = self._queue
            queue.append(span)
            n = len(queue)
            if n >= self._batch_max_rows and not self._wake.is_set():
                self._wake.set()
            if n > self._queue_max and not self._spill_wake.is_set():
                self._spill_wake.set()
            if self._closed:
                # Ended after shutdown's final sweep started: nobody else will see it. Shutdown is over, so
                # spooling here (synchronous I/O) is no longer on a serving event loop.
                self._sweep_to_spool()
        except Exception:  # pragma: no cover - a processor must never break the instrumented code
            pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export (or spool, while ClickHouse fails) every span ended before this call. False on timeout or
        after shutdown."""
        if self._shutdown:
            return False
        with self._cv:
            target = self._taken + len(self._queue)
            self._flush_target = max(self._flush_target, target)
        self._wake.set()
        with self._cv:
            return self._cv.wait_for(lambda: self._handled_upto() >= target, timeout_millis / 1000)

    def shutdown(self) -> None:
        """Idempotent. Flushes everything queued (to ClickHouse, or the spool if it is failing), stops the
        threads, then shuts the exporter down."""
        with self._shutdown_lock:
            if self._shutdown:
                return
            self._shutdown = True
        self._wake.set()
        self._spill_wake.set()
        self._writer.join(self._shutdown_timeout)
        self._spiller.join(max(1.0, self._shutdown_timeout / 10))
        stuck = self._writer.is_alive()
        if stuck:
            log.error("span export thread still busy after %.0fs (ClickHouse insert hanging?); spooling the %d"
                      " queued spans directly", self._shutdown_timeout, len(self._queue))
        self._closed = True
        self._sweep_to_spool()
        if stuck:
            # Closing the store would wait for the hanging insert; the process is going away anyway.
            return
        self._exporter.shutdown()

    # -- introspection ----------------------------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def handled_spans(self) -> int:
        """Every span up to this index (in on_end order, counting from this processor's start) has been
        exported, spooled or (on a failed spool write, logged) dropped."""
        with self._cv:
            return self._handled_upto()

    def _handled_upto(self) -> int:
        return min(self._inflight) if self._inflight else self._taken

    # -- taking batches ---------------------------------------------------------------------------------------
    def _take(self, limit: int) -> tuple[list[ReadableSpan], int, int]:
        """Pop up to `limit` spans (caller holds `_cv`). Returns (spans, first index, spool sequence)."""
        popleft = self._queue.popleft
        spans = [popleft() for _ in range(min(limit, len(self._queue)))]
        start = self._taken
        self._taken += len(spans)
        self._inflight[start] = len(spans)
        return spans, start, self._spool.reserve()

    def _done(self, start: int) -> None:
        with self._cv:
            del self._inflight[start]
            self._cv.notify_all()

    # -- the export thread ------------------------------------------------------------------------------------
    def _run_writer(self) -> None:
        # The exporter's own I/O (an instrumented HTTP client, say) must not produce spans.
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            next_partial = time.monotonic() + self._batch_max_seconds
            while True:
                now = time.monotonic()
                wait = next_partial - now
                if self._degraded and self._spool.pending_files:
                    wait = min(wait, self._retry_at - now)
                if wait > 0:
                    self._wake.wait(wait)
                self._wake.clear()
                final = self._shutdown
                now = time.monotonic()
                partial = final or now >= next_partial
                try:
                    self._cycle(partial=partial, final=final)
                except Exception:  # keep the thread alive whatever a bug does; the queue is still intact
                    log.exception("span export cycle failed; retrying")
                    time.sleep(min(1.0, self._batch_max_seconds))
                if partial:
                    next_partial = time.monotonic() + self._batch_max_seconds
                if final:
                    return
        finally:
            detach(token)

    def _cycle(self, *, partial: bool, final: bool) -> None:
        self._maybe_replay(final=final)
        while True:
            with self._cv:
                n = len(self._queue)
                if n == 0:
                    return
                if n < self._batch_max_rows and not (partial or self._taken < self._flush_target):
                    return
                spans, start, seq = self._take(self._batch_max_rows)
            try:
                self._export_or_spool(spans, seq, final=final)
            finally:
                self._done(start)

    def _export_or_spool(self, spans: Sequence[ReadableSpan], seq: int, *, final: bool) -> None:
        batch = self._encode(spans)
        if batch.rows == 0:
            return
        if self._degraded and (final or time.monotonic() < self._retry_at):
            self._spool.write(batch, seq)  # still backing off (or shutting down): queue up behind older batches
            return
        # Batches spooled before this one (seq < ours) must reach ClickHouse first.
        self._maybe_replay(final=final, before=seq)
        oldest = self._spool.oldest_seq()
        if (self._degraded and time.monotonic() < self._retry_at) or (oldest is not None and oldest < seq):
            self._spool.write(batch, seq)
            return
        try:
            self._exporter.send(batch)
        except StoreError as e:
            self._failed(e, batch.rows)
            self._spool.write(batch, seq)
            return
        self.metrics.inc("spans_exported", batch.rows)
        if self._degraded and not self._spool.pending_files:
            self._recovered(0)

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
            if self._taken < self._flush_target or self._shutdown:
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
                self._failed(e, 0)
                return
            self._spool.remove(f)
            self.metrics.inc("spans_resent", batch.rows)
            resent += batch.rows
        if not self._spool.pending_files:
            self._recovered(resent)

    def _failed(self, err: Exception, rows: int) -> None:
        if self._degraded:
            self._backoff = min(self._retry_max, max(self._retry_min, self._backoff * 2))
        else:
            self._backoff = self._retry_min
        # Jitter, so gateway replicas do not retry against a recovering server in lockstep.
        self._retry_at = time.monotonic() + self._backoff * random.uniform(0.8, 1.2)
        what = f"{rows} spans go to the spool at {self._spool.directory}" if rows else "replay of the spool failed"
        if not self._degraded:
            log.error("ClickHouse insert failed: %s; %s, and it is re-sent when ClickHouse answers (retry in"
                      " %.1fs, backing off up to %.0fs)", err, what, self._backoff, self._retry_max)
        else:
            log.warning("ClickHouse still failing: %s; %s; %d spool files pending; next retry in %.1fs",
                        err, what, self._spool.pending_files, self._backoff)
        self._degraded = True

    def _recovered(self, resent: int) -> None:
        if self._degraded:
            log.warning("ClickHouse reachable again: re-sent %d spooled spans; spool empty", resent)
        self._degraded = False
        self._backoff = 0.0
        self._retry_at = 0.0

    def _encode(self, spans: Sequence[ReadableSpan]) -> EncodedBatch:
        try:
            return self._exporter.encode(spans)
        except Exception:
            log.exception("encoding a batch of %d spans failed; encoding span by span", len(spans))
        bodies: list[bytes] = []
        for span in spans:
            try:
                bodies.append(self._exporter.encode([span]).body)
            except Exception as e:
                log.error("span %r could not be encoded and is DROPPED: %s", getattr(span, "name", "?"), e)
                self.metrics.inc("spans_dropped")
        return EncodedBatch.of(self._exporter.table, b"".join(bodies), len(bodies))

    # -- the spill thread -------------------------------------------------------------------------------------
    def _run_spiller(self) -> None:
        token = attach(set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            low_water = self._queue_max // 2
            while not self._shutdown:
                self._spill_wake.wait()
                self._spill_wake.clear()
                while len(self._queue) > low_water and not self._shutdown:
                    with self._cv:
                        spans, start, seq = self._take(self._batch_max_rows)
                    try:
                        self._spool.write(self._encode(spans), seq)
                    except Exception:  # write() reports its own I/O errors; this is a bug, still counted
                        log.exception("spilling %d spans to the spool failed; they are DROPPED", len(spans))
                        self.metrics.inc("spans_dropped", len(spans))
                    finally:
                        self._done(start)
        finally:
            detach(token)

    # -- after shutdown ---------------------------------------------------------------------------------------
    def _sweep_to_spool(self) -> None:
        """Spool whatever is still queued, from the calling thread (only once the export thread is gone)."""
        while True:
            with self._cv:
                if not self._queue:
                    return
                spans, start, seq = self._take(self._batch_max_rows)
            try:
                self._spool.write(self._encode(spans), seq)
            finally:
                self._done(start)
