"""Export counters and their Prometheus exposition (through prometheus_client); the disabled ("recording off") recorder."""
from __future__ import annotations

import re
import threading

from prometheus_client.parser import text_string_to_metric_families

from exporters.metrics import ExportMetrics
from exporters.recording import disabled_recorder, start_recording


def samples_of(text: str) -> dict[str, float]:
    """name{labels} -> value, parsed by prometheus_client's own parser (what a scraper reads)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_prometheus_exposition_has_help_type_and_values() -> None:
    m = ExportMetrics()
    m.inc("spans_exported", 5)
    m.inc("spans_spooled", 2)
    m.set_gauge("queue_depth", lambda: 7)
    m.observe_export_seconds(0.02)
    m.observe_export_seconds(3.0)
    m.observe_export_seconds(45.0)  # over the last bound: only +Inf
    text = m.render()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) tagway_[a-z_]+ .+", line), line
    samples = samples_of(text)
    assert samples["tagway_spans_exported_total"] == 5
    assert samples["tagway_spans_spooled_total"] == 2
    assert samples["tagway_spans_dropped_total"] == 0
    assert samples["tagway_queue_depth"] == 7
    assert samples["tagway_spool_files_pending"] == 0  # gauges without a source read 0
    assert samples['tagway_export_duration_seconds_bucket{le="0.025"}'] == 1
    assert samples['tagway_export_duration_seconds_bucket{le="5.0"}'] == 2
    assert samples['tagway_export_duration_seconds_bucket{le="30.0"}'] == 2
    assert samples['tagway_export_duration_seconds_bucket{le="+Inf"}'] == 3
    assert samples["tagway_export_duration_seconds_count"] == 3
    assert samples["tagway_export_duration_seconds_sum"] == 48.02
    assert "# TYPE tagway_spans_exported_total counter" in text
    assert "# TYPE tagway_queue_depth gauge" in text
    assert "# TYPE tagway_export_duration_seconds histogram" in text
    for name in ("spans_resent", "spool_corrupt_files", "spans_quarantined", "export_errors", "batches_exported"):
        assert samples[f"tagway_{name}_total"] == 0
    assert samples["tagway_spool_spans_pending"] == 0


def test_counters_are_thread_safe() -> None:
    m = ExportMetrics()

    def bump() -> None:
        for _ in range(10_000):
            m.inc("spans_exported")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("spans_exported") == 40_000


def test_a_failing_gauge_does_not_break_the_scrape() -> None:
    m = ExportMetrics()
    m.set_gauge("queue_depth", lambda: 1 / 0)
    assert "tagway_queue_depth NaN" in m.render()


def test_disabled_recorder_discards_on_purpose_and_counts() -> None:
    rec = disabled_recorder()
    for _ in range(5):
        with rec.tracer.start_as_current_span("chat m"):
            pass
    assert rec.enabled is False and rec.store is None
    assert rec.metrics.get("spans_discarded") == 5 and rec.metrics.get("spans_dropped") == 0
    assert rec.force_flush()
    rec.shutdown()
    off = start_recording(dsn="chdb:///nowhere", spool_dir="/nonexistent", enabled=False)
    assert off.enabled is False and off.spool is None  # nothing opened, nothing created
    off.shutdown()
