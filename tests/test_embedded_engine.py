"""The embedded engine's start-up options (exporters/store.EMBEDDED_ENGINE_OPTIONS): applied, and merges still follow
inserts although the idle background poll is slow."""
from __future__ import annotations

import time
import uuid

from exporters.store import EMBEDDED_ENGINE_OPTIONS


def test_the_embedded_engine_runs_with_tagways_start_up_options(chdb_store):
    rows, _ = chdb_store.query_rows("SELECT value FROM system.server_settings WHERE name = 'memory_worker_period_ms'")
    assert rows[0][0] == EMBEDDED_ENGINE_OPTIONS["memory_worker_period_ms"] != "0"  # chDB's own default is 0 (50 ms)


def test_parts_are_still_merged_soon_after_inserts(chdb_store):
    # the idle poll waits 5 s; an insert wakes its table's merge selection at once, so small parts do not pile up
    table = f"merge_probe_{uuid.uuid4().hex[:8]}"
    chdb_store.command(f"CREATE TABLE {table} (a UInt64) ENGINE = MergeTree ORDER BY a")
    try:
        for i in range(8):
            chdb_store.command(f"INSERT INTO {table} SELECT number FROM numbers({i * 10}, 10)")
        deadline, parts = time.monotonic() + 3, 8  # under the 5 s idle poll
        while time.monotonic() < deadline:
            rows, _ = chdb_store.query_rows(f"SELECT count() FROM system.parts WHERE table = '{table}' AND active")
            parts = rows[0][0]
            if parts < 8:
                break
            time.sleep(0.2)
        assert parts < 8, "no merge within 3 s of eight inserts"
        rows, _ = chdb_store.query_rows(f"SELECT count() FROM {table}")
        assert rows[0][0] == 80
    finally:
        chdb_store.command(f"DROP TABLE {table} SYNC")
