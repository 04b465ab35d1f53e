"""The durable spool on its own: atomic files, order, corruption quarantine, torn writes, disk full, locking."""
from __future__ import annotations

import errno
import logging
import os

import pytest

from exporters import spool as spool_mod
from exporters.metrics import ExportMetrics
from exporters.rows import EncodedBatch
from exporters.spool import Spool, SpoolLockedError


def _batch(i: int, rows: int = 3) -> EncodedBatch:
    body = b"".join(b'{"SpanName":"s%d-%d"}\n' % (i, r) for r in range(rows))
    return EncodedBatch.of("otel_traces", body, rows)


def test_write_read_in_order_and_remove(tmp_path) -> None:
    m = ExportMetrics()
    sp = Spool(str(tmp_path), metrics=m)
    seqs = [sp.reserve() for _ in range(3)]
    # Written out of order (a slow insert that failed after two spills): read back in reservation order.
    for i in (1, 2, 0):
        assert sp.write(_batch(i), seqs[i])
    files = sp.pending()
    assert [sp.read(f).body for f in files] == [_batch(i).body for i in range(3)]
    assert [f.name for f in files] == sorted(os.listdir(tmp_path))[: 3]
    assert sp.pending_files == 3 and sp.pending_bytes == sum(f.size for f in files)
    assert m.get("spans_spooled") == 9 and m.get("spool_files_pending") == 3 and m.get("spool_spans_pending") == 9
    assert sp.oldest_seq() == seqs[0]
    sp.remove(files[0])
    assert sp.pending_files == 2 and not (tmp_path / files[0].name).exists()
    assert m.get("spool_spans_pending") == 6
    sp.close()
    # A new process continues after the highest sequence number on disk, and counts the spans left (headers).
    m2 = ExportMetrics()
    sp2 = Spool(str(tmp_path), metrics=m2)
    assert sp2.pending_files == 2 and sp2.reserve() == seqs[-1] + 1
    assert m2.get("spool_spans_pending") == 6
    sp2.close()


def test_corrupt_and_torn_files_are_quarantined_loudly(tmp_path, caplog) -> None:
    sp = Spool(str(tmp_path))
    names = [sp.write(_batch(i)) for i in range(4)]
    sp.close()
    flipped = bytearray((tmp_path / names[0]).read_bytes())
    flipped[-3] ^= 0x01
    (tmp_path / names[0]).write_bytes(bytes(flipped))  # bit rot
    data = (tmp_path / names[1]).read_bytes()
    (tmp_path / names[1]).write_bytes(data[: len(data) - 5])  # torn
    (tmp_path / names[2]).write_bytes(b"garbage without a header")
    # A write cut short before its rename, and one that completed its fsync but not its rename.
    (tmp_path / ".0000000000000100-1.spool.tmp").write_bytes(data[:10])
    good_tmp = (tmp_path / names[3]).read_bytes()
    (tmp_path / ".0000000000000101-1.spool.tmp").write_bytes(good_tmp)

    m = ExportMetrics()
    with caplog.at_level(logging.ERROR, logger="exporters.spool"):
        sp = Spool(str(tmp_path), metrics=m)
        assert m.get("spool_corrupt_files") == 1  # the torn .tmp, at start-up
        results = [sp.read(f) for f in sp.pending()]
    assert [r is not None for r in results] == [False, False, False, True, True]
    assert m.get("spool_corrupt_files") == 4
    assert m.get("spool_spans_pending") == 6  # names[3] and the promoted .tmp, 3 spans each (from their headers)
    assert sp.pending_files == 2  # names[3] and the promoted .tmp
    corrupt = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".corrupt"))
    assert len(corrupt) == 4 and all(p.endswith(".spool.corrupt") for p in corrupt)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4 and all("quarantined" in r.getMessage() for r in errors)
    assert any("checksum" in r.getMessage() for r in errors)
    assert any("torn write" in r.getMessage() for r in errors)
    sp.close()


def test_disk_full_counts_dropped_and_logs_error(tmp_path, monkeypatch, caplog) -> None:
    m = ExportMetrics()
    sp = Spool(str(tmp_path), metrics=m)

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "_write_all", full)
    with caplog.at_level(logging.ERROR, logger="exporters.spool"):
        assert sp.write(_batch(0, rows=7)) is None
    assert m.get("spans_dropped") == 7 and m.get("spool_write_errors") == 1 and m.get("spans_spooled") == 0
    assert "disk full" in caplog.text and "7 spans DROPPED" in caplog.text
    assert sp.pending_files == 0 and os.listdir(tmp_path) == ["spool.lock"]  # no temp file left behind
    assert sp.write_error == f"disk full at {tmp_path}"  # /readyz says it (gateway/app.py) until a write succeeds
    monkeypatch.undo()
    assert sp.write(_batch(1, rows=2)) is not None and sp.write_error == ""
    sp.close()


def test_one_process_per_spool_directory(tmp_path) -> None:
    sp = Spool(str(tmp_path))
    with pytest.raises(SpoolLockedError, match="in use by another process"):
        Spool(str(tmp_path))
    sp.close()
    Spool(str(tmp_path)).close()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_the_spool_cap_drops_by_policy_counts_every_span_and_says_full(tmp_path, policy, caplog) -> None:
    m = ExportMetrics()
    one = len(_batch(0, rows=10).body) + 256
    sp = Spool(str(tmp_path), metrics=m, max_bytes=3 * one + 100, on_full=policy)
    names = [sp.write(_batch(i, rows=10)) for i in range(5)]
    assert sp.full and m.get("spool_full") == 1 and "is full" in caplog.text
    assert m.get("spans_dropped") == 20 and m.get("spans_spooled") == 50 - (20 if policy == "drop_newest" else 0)
    kept = [sp.read(f).body for f in sp.pending()]
    if policy == "drop_oldest":  # the newest three stayed
        assert names[3:] == [f.name for f in sp.pending()][1:] and kept == [_batch(i, rows=10).body for i in (2, 3, 4)]
    else:  # the first three stayed, the last two were refused
        assert names[3:] == [None, None] and kept == [_batch(i, rows=10).body for i in (0, 1, 2)]
    assert sp.pending_bytes <= sp.max_bytes
    for f in sp.pending():  # drained: no longer full
        sp.remove(f)
    assert not sp.full and m.get("spool_full") == 0
    sp.close()


def test_a_batch_larger_than_the_cap_is_dropped_and_counted(tmp_path) -> None:
    m = ExportMetrics()
    sp = Spool(str(tmp_path), metrics=m, max_bytes=100)
    assert sp.write(_batch(0, rows=50)) is None
    assert m.get("spans_dropped") == 50 and sp.pending_files == 0
    sp.close()


def test_split_keeps_order_and_rows(tmp_path) -> None:
    sp = Spool(str(tmp_path))
    first = sp.write(_batch(0, rows=5))
    second = sp.write(_batch(1, rows=2))
    f = sp.pending()[0]
    halves = sp.split(f, sp.read(f))
    assert [h.name for h in sp.pending()] == [h.name for h in halves] + [second]
    assert b"".join(sp.read(h).body for h in halves) == _batch(0, rows=5).body
    assert [sp.read(h).rows for h in halves] == [2, 3] and not (tmp_path / first).exists()
    sp.close()


def test_wal_recovery_skips_a_batch_already_in_the_spool(tmp_path) -> None:
    """Killed between spooling a batch and noting it done: the restart must not spool it twice."""
    from exporters.recording import recover_wal  # noqa: PLC0415
    from exporters.wal import WriteAheadLog  # noqa: PLC0415

    wal_dir = str(tmp_path / "spool" / "wal")
    sp = Spool(str(tmp_path / "spool"))
    wal = WriteAheadLog(wal_dir)
    a, b = _batch(0, rows=2), _batch(1, rows=3)
    wal.chunk(0, 2, a.body)
    wal.chunk(2, 3, b.body)
    wal.batch(7, [0, 2])
    sp.write(EncodedBatch.of("otel_traces", a.body + b.body, 5))  # spooled; the kill came before wal.done
    wal.chunk(5, 3, _batch(2, rows=3).body)  # encoded, not batched yet
    assert recover_wal(wal_dir, sp, "otel_traces", 1 << 20) == 3
    bodies = [sp.read(f).body for f in sp.pending()]
    assert bodies == [a.body + b.body, _batch(2, rows=3).body]
    assert not [n for n in os.listdir(wal_dir) if n.endswith(".log")]
    sp.close()


def test_the_wal_gives_its_space_back_once_its_chunks_are_stored(tmp_path) -> None:
    """A batch stored (or spooled, or dropped on a full disk) is done: its chunks' segment goes, the current one too
    when nothing in it waits any more, so a full disk gets the write-ahead log's space back at once (it kept a
    7.7 MB segment until a restart). Segments roll at their (small) cap while chunks still wait in older ones."""
    from exporters.wal import WriteAheadLog  # noqa: PLC0415

    wal_dir = tmp_path / "wal"
    wal = WriteAheadLog(str(wal_dir), segment_bytes=1000)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in wal_dir.glob("wal-*.log"))

    body = _batch(0, rows=40).body  # ~900 bytes: a new segment about every chunk
    for start in range(0, 200, 40):
        wal.chunk(start, 40, body)
    assert len(list(wal_dir.glob("wal-*.log"))) >= 3 and on_disk() >= 5 * len(body)
    wal.batch(1, [0, 40])
    wal.done([0, 40])  # the first two chunks stored: their segments go, the rest wait
    assert len(body) * 3 <= on_disk() < len(body) * 5
    wal.batch(2, [80, 120, 160])
    wal.done([80, 120, 160])  # nothing waits: nothing is kept
    assert on_disk() == 0
    wal.chunk(200, 40, body)  # and the log goes on in a fresh segment
    assert on_disk() > len(body)
    wal.close()


def test_the_wal_keeps_a_batch_record_while_its_chunks_wait_elsewhere(tmp_path) -> None:
    """Two batches in flight (the sender's insert, and a spill): the one that ends first must not take with it the
    segment holding the other's batch record, or a restart cannot rebuild that batch byte for byte (its
    deduplication token) and spools the ended one a second time."""
    from exporters.recording import recover_wal  # noqa: PLC0415
    from exporters.wal import WriteAheadLog  # noqa: PLC0415

    wal_dir = str(tmp_path / "spool" / "wal")
    wal = WriteAheadLog(wal_dir, segment_bytes=100)
    x, y = _batch(0, rows=2), _batch(1, rows=2)
    wal.chunk(0, 2, x.body)  # segment 0, full: the next chunk opens segment 1
    wal.chunk(2, 2, y.body)
    wal.batch(1, [0])  # being inserted: its batch record is in segment 1
    wal.batch(2, [2])  # spilled, done
    wal.done([2])
    # killed here: recovery rebuilds batch 1 alone, as it was formed, and nothing of batch 2
    sp = Spool(str(tmp_path / "spool"))
    assert recover_wal(wal_dir, sp, "otel_traces", 1 << 20) == 2
    assert [sp.read(f).digest for f in sp.pending()] == [x.digest]
    sp.close()


def test_the_wal_deletes_segments_oldest_first_only(tmp_path) -> None:
    """Batches end out of order (a spill while an insert runs): a later segment whose own chunks are all stored may
    hold the batch record of a chunk still waiting in an older one, and the done record of another. Deleting it lost
    both: a restart spooled the stored chunk again and rebuilt the running batch with other chunks (a new token)."""
    from exporters.wal import WriteAheadLog, read_pending  # noqa: PLC0415

    d = str(tmp_path / "wal")
    w = WriteAheadLog(d, segment_bytes=100)
    w.chunk(0, 1, b"a" * 60)
    w.chunk(1, 1, b"b" * 60)  # segment 0 full: segment 1
    w.batch(1, [0])  # being inserted (its chunk in segment 0)
    w.batch(2, [1])
    w.done([1])  # spilled: batch and done records in segment 1
    w.chunk(2, 1, b"c" * 90)  # segment 1 full: segment 2
    w.batch(3, [2])
    w.done([2])
    batches, _ = read_pending(d, 1 << 20)  # killed here
    assert batches == [([b"a" * 60], 1)]  # batch 1 alone, as formed; chunk 1 not again
    w.done([0])
    w.close()
    assert not [n for n in os.listdir(d) if n.endswith(".log")]  # all stored: nothing kept


def test_a_wal_segment_that_cannot_be_opened_is_tried_again(tmp_path, monkeypatch, caplog) -> None:
    from exporters import wal as wal_mod  # noqa: PLC0415

    wal = wal_mod.WriteAheadLog(str(tmp_path / "wal"), segment_bytes=10)
    real_open = os.open

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wal_mod.os, "open", full)
    with caplog.at_level(logging.ERROR, logger="exporters.wal"):
        for start in range(0, 50, 10):
            wal.chunk(start, 10, _batch(start).body)  # the first fills its segment; the next ones find none
        for _ in range(200):  # a long full disk: every chunk tries a segment again
            wal.chunk(60, 10, _batch(60).body)
    assert caplog.text.count("cannot open a new segment") == 1  # said once
    assert len(wal._pending) <= 2  # segments never opened are not tracked (it grew by one a chunk)
    monkeypatch.setattr(wal_mod.os, "open", real_open)
    wal.chunk(50, 10, _batch(50).body)  # the disk has room again: a new segment, written
    assert any(p.stat().st_size for p in (tmp_path / "wal").glob("wal-*.log"))
    wal.close()


def test_spooled_and_logged_spans_are_the_owners_only(tmp_path) -> None:
    """Spool files and the write-ahead log hold every tenant's captured prompts: on a host with other users they
    were 0644 in a 0755 directory, readable by anyone (security trial). Now 0600 in 0700 directories."""
    from exporters.wal import WriteAheadLog

    sp = Spool(str(tmp_path / "spool"), metrics=ExportMetrics())
    assert sp.write(_batch(1), sp.reserve())
    (f,) = sp.pending()
    wal = WriteAheadLog(str(tmp_path / "spool" / "wal"))
    wal.chunk(0, 3, _batch(2).body)
    logs = [p for p in (tmp_path / "spool" / "wal").iterdir() if p.is_file() and p.stat().st_size]
    assert logs
    for path in [tmp_path / "spool" / f.name, *logs]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for d in (tmp_path / "spool", tmp_path / "spool" / "wal"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    wal.close()
    sp.close()
