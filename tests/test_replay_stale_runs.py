"""A run whose process died mid-run (its final write never made) reads as incomplete once it has been silent for
STALE_RUN_SECONDS, everywhere runs are read; a live run, or one still writing results, stays 'running'."""
from __future__ import annotations

import time
import uuid

import orjson

from exporters import replays
from replay import store as run_store


def _run_row(store, run_id: str, written: float) -> None:
    store.insert_json_rows("replay_runs", orjson.dumps({
        "run_id": run_id, "created_at": written, "status": "running", "spec_json": "{}", "dataset_id": "d",
        "candidates": ["cand"], "segment_by": ["customer"], "n_cases": 3, "version": int(written * 1e9)}))


def _result(store, run_id: str, at: float) -> None:
    store.insert_json_rows("replay_results", orjson.dumps({
        "run_id": run_id, "case_id": "c1", "candidate": "cand", "Timestamp": f"{at:.6f}", "status": "passed"}))


def test_a_silent_running_run_reads_as_incomplete(chdb_store):
    now = time.time()
    tag = uuid.uuid4().hex[:8]
    dead, live, busy = f"dead-{tag}", f"live-{tag}", f"busy-{tag}"
    _run_row(chdb_store, dead, now - replays.STALE_RUN_SECONDS - 60)  # started 16 min ago, never heard of since
    _run_row(chdb_store, live, now - 30)
    _run_row(chdb_store, busy, now - replays.STALE_RUN_SECONDS - 600)  # started long ago, a result a minute ago
    _result(chdb_store, busy, now - 60)
    expected = {dead: "incomplete", live: "running", busy: "running"}
    assert {r: replays.get_run(chdb_store, r)["status"] for r in expected} == expected
    listed = {r["run_id"]: r["status"] for r in replays.list_runs(chdb_store, limit=1000)}
    assert {r: listed[r] for r in expected} == expected
    assert {r: run_store.get_run(chdb_store, r).status for r in expected} == expected
    assert {r.run_id: r.status for r in run_store.list_runs(chdb_store, limit=1000) if r.run_id in expected} == expected
