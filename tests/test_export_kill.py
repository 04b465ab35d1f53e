"""SIGKILL mid-load, restart, replay: a child process records spans (ClickHouse failing half the time, so the spool
is busy) and is killed without warning; a second process on the same data and spool directories replays the spool.
Every span the first process reported as handled (exported or spooled) must be in ClickHouse, exactly once.

Runs in subprocesses: chDB allows one data directory per process, and the session's tests hold another.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The first process: spans in a loop, ClickHouse "down" for 1500 spans out of every 3000, progress on stdout.
WRITER = r'''
import sys, time
from exporters.recording import start_recording
from exporters.store import StoreError, connect
from exporters.schema import migrate

data, spool = sys.argv[1], sys.argv[2]
store = connect(f"chdb://{data}")
migrate(store)  # sets the deduplication window that lets a re-sent batch be dropped (migration 4)

class Flaky:
    def __init__(self, store):
        self.store, self.dsn, self.down = store, store.dsn, False
    def insert_json_rows(self, table, body, settings=None):
        if self.down:
            raise StoreError("ClickHouse unreachable (simulated)")
        self.store.insert_json_rows(table, body, settings=settings)
    def __getattr__(self, name):
        return getattr(self.store, name)

flaky = Flaky(store)
rec = start_recording(dsn=store.dsn, store=flaky, spool_dir=spool, batch_max_rows=200, batch_max_seconds=0.05,
                      queue_max=2000, retry_min_seconds=0.05, retry_max_seconds=0.2)
tracer = rec.tracer
i = 0
while True:
    flaky.down = (i // 1500) % 2 == 1
    with tracer.start_as_current_span("chat m") as span:
        span.set_attributes({"kill.seq": i, "tagway.kind": "call", "tagway.customer": "kill-test"})
    i += 1
    if i % 100 == 0:
        m = rec.metrics.snapshot()
        print(f"progress ended={i} handled={rec.processor.handled_spans} spooled={m['spans_spooled']} "
              f"dropped={m['spans_dropped']} pending={m['spool_files_pending']}", flush=True)
        time.sleep(0.005)
'''

# The second process: start on the same directories, let the spool drain, report what is stored.
REPLAYER = r'''
import json, sys, time
from exporters.recording import start_recording
from exporters.spool import quarantined

data, spool = sys.argv[1], sys.argv[2]
rec = start_recording(dsn=f"chdb://{data}", spool_dir=spool, batch_max_seconds=0.05)
pending_at_start = rec.spool.pending_files
deadline = time.monotonic() + 30
while rec.spool.pending_files and time.monotonic() < deadline:
    time.sleep(0.05)
rows, _ = rec.store.query_rows(
    "SELECT count(), uniqExact(SpanId), uniqExact(SpanAttributes['kill.seq']), "
    "max(toUInt64(SpanAttributes['kill.seq'])) FROM otel_traces WHERE SpanAttributes['tagway.customer'] = 'kill-test'")
seqs, _ = rec.store.query_rows("SELECT DISTINCT toUInt64(SpanAttributes['kill.seq']) FROM otel_traces "
                               "WHERE SpanAttributes['tagway.customer'] = 'kill-test'")
calls, _ = rec.store.query_rows("SELECT count() FROM llm_calls WHERE customer = 'kill-test'")
m = rec.metrics.snapshot()
rec.shutdown()
torn = [q.reason for q in quarantined(spool)]
print(json.dumps({"pending_at_start": pending_at_start, "pending_left": m["spool_files_pending"],
                  "count": rows[0][0], "uniq_span": rows[0][1], "uniq_seq": rows[0][2], "max_seq": rows[0][3],
                  "seqs": sorted(int(r[0]) for r in seqs), "llm_calls": calls[0][0], "resent": m["spans_resent"],
                  "corrupt": m["spool_corrupt_files"], "quarantined": torn}))
'''


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def test_sigkill_mid_load_then_restart_replays_the_spool(tmp_path) -> None:
    data, spool = str(tmp_path / "data"), str(tmp_path / "spool")
    child = subprocess.Popen([sys.executable, "-c", WRITER, data, spool], cwd=tmp_path, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 60
        for line in child.stdout:  # type: ignore[union-attr]
            if line.startswith("progress "):
                last = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
                # Kill during the second "down" phase, with files waiting in the spool and spans in flight.
                if last["ended"] >= 4000 and last["pending"] > 0 and last["handled"] >= 2000:
                    break
            assert time.monotonic() < deadline, "writer made no progress"
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=30)
    assert last, f"writer printed no progress: {err[-2000:]}"
    assert child.returncode == -signal.SIGKILL
    assert last["dropped"] == 0 and last["spooled"] > 0 and last["handled"] >= 2000

    out = subprocess.run([sys.executable, "-c", REPLAYER, data, spool], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["pending_at_start"] > 0 and res["pending_left"] == 0
    # The kill may land inside a spool write (its fsync is slow on a loaded machine): that one `.tmp` is set aside,
    # and its spans come back from the write-ahead log (the checks below). Nothing else may be.
    assert res["corrupt"] == len(res["quarantined"]) <= 1, res["quarantined"]
    assert all(r.startswith("incomplete write from an earlier process") for r in res["quarantined"]), res
    assert res["resent"] > 0
    # Nothing duplicated: one row per span, one span per sequence number, one llm_calls row per call span.
    assert res["count"] == res["uniq_span"] == res["uniq_seq"] == res["llm_calls"], (
        res["count"], res["uniq_span"], res["uniq_seq"], res["llm_calls"], out.stderr[-5000:])
    # Everything reported as handled before the kill is there (spans the child had not yet handled may or may
    # not be: they were only in memory).
    handled = last["handled"]
    assert set(range(handled)) <= set(res["seqs"])
    # ... and what is stored is every span up to some point: none lost in between (a torn write's included).
    assert res["seqs"] == list(range(len(res["seqs"])))
    assert res["max_seq"] < last["ended"] + 1000


# A process that creates the store, inserts one batch and is killed before it can remove the batch's spool file.
# With `cut` the kill falls inside the insert, after llm_calls got its part and before the rollups got theirs: the
# minute rollup's view is detached for the insert (a plain DETACH: the next process attaches it again).
INSERTED_THEN_KILLED = r'''
import datetime as dt, os, signal, sys
from exporters.clickhouse import ClickHouseSpanExporter
from exporters.rows import encode_rows
from exporters.schema import migrate
from exporters.spool import Spool
from exporters.store import connect
from tests.rollup_seed import span

data, spool_dir, cut = sys.argv[1], sys.argv[2], sys.argv[3] == "cut"
store = connect(f"chdb://{data}")
migrate(store)
now = dt.datetime.now(dt.timezone.utc)
batch = encode_rows([span(now - dt.timedelta(seconds=i), "landed-test") for i in range(60)])
Spool(spool_dir).write(batch)
if cut:
    store.command("DETACH TABLE llm_calls_1m_mv")
ClickHouseSpanExporter(store=store).send(batch)
os.kill(os.getpid(), signal.SIGKILL)
'''

# The next process on the same directories: replay the spool, then count the calls everywhere they are counted.
COUNT_AFTER_REPLAY = r'''
import json, sys, time
from exporters.recording import start_recording

rec = start_recording(dsn=f"chdb://{sys.argv[1]}", spool_dir=sys.argv[2], batch_max_seconds=0.05)
deadline = time.monotonic() + 30
while rec.spool.pending_files and time.monotonic() < deadline:
    time.sleep(0.05)
counts = {t: rec.store.query_rows(f"SELECT {e} FROM {t} WHERE {c} = 'landed-test'")[0][0][0] for t, e, c in (
    ("otel_traces", "count()", "SpanAttributes['tagway.customer']"), ("llm_calls", "count()", "customer"),
    ("llm_calls_1m", "sum(calls)", "customer"), ("llm_calls_1h", "sum(calls)", "customer"),
    ("llm_calls_customer_1d", "sum(calls)", "customer"))}
m = rec.metrics.snapshot()
rec.shutdown()
print(json.dumps({**counts, "pending": m["spool_files_pending"], "resent": m["spans_resent"]}))
'''


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=90)


def test_a_batch_stored_by_the_process_that_created_the_store_is_stored_once_when_re_sent(tmp_path) -> None:
    # The re-sent batch carries the same deduplication token, and every table that has it must drop it while every
    # table that lacks it takes it. chDB derived the views' deduplication ids differently in the process that
    # created the views, so before schema.migrate re-attached them, llm_calls and the rollups held 120 calls here
    # ("landed"), and 120 in llm_calls with 60 in the rollups ("cut").
    for case in ("landed", "cut"):
        data, spool = str(tmp_path / f"data-{case}"), str(tmp_path / f"spool-{case}")
        first = _run(INSERTED_THEN_KILLED, data, spool, case, cwd=tmp_path)
        assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
        out = _run(COUNT_AFTER_REPLAY, data, spool, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res == {"otel_traces": 60, "llm_calls": 60, "llm_calls_1m": 60, "llm_calls_1h": 60,
                       "llm_calls_customer_1d": 60, "pending": 0, "resent": 60}, (case, res)
