"""Counters of the export pipeline, collected for prometheus_client (the gateway serves them on /metrics).

Every span handed to the processor ends up in exactly one of: exported (straight to ClickHouse), spooled (on
disk, later counted again as resent once it reaches ClickHouse), dropped (the spool could not be written: disk
full or I/O error, the only way to lose a span short of a bug, always logged at ERROR) or discarded (recording
turned off on purpose). So `exported + resent` converges on the number of spans recorded, and `dropped` says what was lost.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

__all__ = ["ExportMetrics", "LATENCY_BUCKETS"]

# Seconds. chDB inserts of a 1k-5k row batch take tens of ms; a server over the network, up to seconds.
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name -> HELP text. Counters get `_total` appended in the exposition (prometheus_client does it).
_COUNTERS: dict[str, str] = {
    "spans_exported": "Spans inserted into ClickHouse straight from the in-memory queue.",
    "spans_spooled": "Spans written to the on-disk spool (ClickHouse down or slow, or the queue over its limit).",
    "spans_resent": "Spans inserted into ClickHouse from the spool.",
    "spans_dropped": "Spans lost: the spool could not be written (disk full, I/O error) or a span could not be"
                     " encoded (a bug). Logged at ERROR. Should be 0.",
    "spans_discarded": "Spans not recorded on purpose (recording disabled).",
    "spool_corrupt_files": "Spool files found torn or corrupt and quarantined as *.corrupt.",
    "spool_poison_files": "Spool files whose rows ClickHouse refuses, quarantined as *.poison (tagway db spool).",
    "spans_quarantined": "Spans in *.poison files: kept on disk, not in ClickHouse until re-queued.",
    "export_errors": "Failed insert attempts into ClickHouse (live batches and spool replays).",
    "batches_exported": "Batches inserted into ClickHouse (live and replayed).",
    "spool_write_errors": "Spool writes that failed (a full or failing disk; the batch is kept and written again "
                          "later, see spans_dropped for what could not be kept).",
}
_GAUGES: dict[str, str] = {
    "queue_depth": "Spans waiting in memory for the export thread.",
    "queue_bytes": "Bytes of encoded spans waiting in memory for the export thread.",
    "spool_files_pending": "Spool files waiting to be re-sent.",
    "spool_bytes_pending": "Bytes of spool files waiting to be re-sent.",
    "spool_full": "1 while the spool is at recording.spool_max_bytes and spans are being dropped, else 0.",
    "spool_spans_pending": "Spans in spool files waiting to be re-sent.",
    "export_degraded": "1 while ClickHouse is failing and new batches go to the spool, else 0.",
}


class ExportMetrics:
    """Thread-safe counters plus gauges read through callbacks at scrape time (so the hot path never updates a
    gauge). Counters are plain ints under one lock: updates happen per batch, not per span."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last slot is +Inf
        self._latency_sum = 0.0
        self._latency_count = 0

    def inc(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._counters[name] += value

    def get(self, name: str) -> float:
        """A counter's value, or a gauge read now."""
        if name in self._gauges:
            return self._read_gauge(name)
        with self._lock:
            return self._counters[name]

    def set_gauge(self, name: str, read: Callable[[], float]) -> None:
        assert name in _GAUGES, name
        self._gauges[name] = read

    def observe_export_seconds(self, seconds: float) -> None:
        with self._lock:
            self._latency_sum += seconds
            self._latency_count += 1
            self._latency_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge by its short name, plus export_seconds_sum/count."""
        with self._lock:
            out: dict[str, float] = dict(self._counters)
            out["export_seconds_sum"] = self._latency_sum
            out["export_seconds_count"] = self._latency_count
        for name in _GAUGES:
            out[name] = self._read_gauge(name)
        return out

    def _read_gauge(self, name: str) -> float:
        read = self._gauges.get(name)
        if read is None:
            return 0
        try:
            return read()
        except Exception:  # a scrape must never fail because one gauge did
            return float("nan")

    def collect(self, prefix: str = "tagway_") -> Iterator[Metric]:
        """The metric families for prometheus_client's registry (a custom collector: the counters live here)."""
        with self._lock:
            counters = dict(self._counters)
            buckets = list(self._latency_buckets)
            lat_sum = self._latency_sum
        for name, help_text in _COUNTERS.items():
            yield CounterMetricFamily(f"{prefix}{name}", help_text, value=counters[name])
        for name, help_text in _GAUGES.items():
            yield GaugeMetricFamily(f"{prefix}{name}", help_text, value=self._read_gauge(name))
        cumulative, points = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), buckets):
            cumulative += n
            points.append((bound, cumulative))
        yield HistogramMetricFamily(f"{prefix}export_duration_seconds", "Duration of ClickHouse inserts of span "
                                    "batches.", buckets=points, sum_value=lat_sum)

    def render(self) -> str:
        """The text exposition of these metrics alone (the gateway serves them beside its own on /metrics)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode()
