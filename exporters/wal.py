"""A write-ahead log of encoded spans, so a process killed without warning (SIGKILL, the OOM killer) loses at most
the spans that ended in the last flush interval (~100 ms), not the batch it was filling (up to 2 s).

The encoder appends each encoded chunk here before it joins the in-memory backlog; the sender notes each batch it
forms (which chunks, in which order) before inserting it, and notes the chunks done once the batch is in ClickHouse
or in the spool. Writes are plain `write()`s with no fsync: the page cache outlives the process, which is the
failure this covers (a machine that loses power loses the page cache too; the spool's fsync covers spooled data).

On start-up, `recover()` turns what a dead process left into spool files: every batch it had formed but not
finished is rebuilt byte for byte (so if its insert did land before the kill, ClickHouse's deduplication token,
the payload's sha256, drops the second copy), then the chunks it had not batched yet. Then the log starts afresh.

Records (little-endian), one `write()` each:
    b"D" start:u64 rows:u32 len:u32 crc32:u32 <len bytes>    a chunk of JSONEachRow rows (`start`: its first span)
    b"B" seq:u64 n:u32 <n x u64 start>                          a batch formed from these chunks, in this order
    b"F" n:u32 <n x u64 start>                                   these chunks are stored (ClickHouse or spool)
A torn record at the end of a segment (the kill came mid-write) ends that segment's reading.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import Iterable, Iterator

__all__ = ["WriteAheadLog", "read_pending", "WAL_DIR", "HELD_PREFIX", "is_log_dir"]

log = logging.getLogger(__name__)

_D = struct.Struct("<cQIII")
_B = struct.Struct("<cQI")
_F = struct.Struct("<cI")
_U64 = struct.Struct("<Q")
_PREFIX, _SUFFIX = "wal-", ".log"
WAL_DIR = "wal"  # under the spool directory
HELD_PREFIX = "wal-held-"  # beside it: a dead process's log that could not be spooled yet (a full disk)


def is_log_dir(path: str) -> bool:
    """A write-ahead log directory under a spool: the live one, or one set aside."""
    name = os.path.basename(path)
    return name == WAL_DIR or name.startswith(HELD_PREFIX)


class WriteAheadLog:
    # Segments are dropped whole once every chunk in them is stored: small ones give the disk back soon after
    # their batch is in (an 8 MiB segment is ~1 s of writing at 2,500 calls/s), where a 64 MiB one held a small or
    # full disk's last megabytes for minutes.
    def __init__(self, directory: str, *, segment_bytes: int = 8 << 20) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)  # the log holds captured prompts: the owner's only
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._seg = max((_segment_no(n) for n in os.listdir(directory) if _segment_no(n) is not None), default=-1)
        self._fd = -1
        self._size = 0
        self._pending: dict[int, set[int]] = {}  # segment -> chunk starts written there and not yet done
        self._where: dict[int, int] = {}  # chunk start -> segment
        self._closed = False
        self._open_failed = False
        self._open_next()

    # -- the three records ------------------------------------------------------------------------------------
    def chunk(self, start: int, rows: int, body: bytes) -> None:
        head = _D.pack(b"D", start, rows, len(body), zlib.crc32(body))  # written with the body, not joined to it
        with self._lock:
            if self._closed:
                return  # shutdown's last sweep goes straight to the spool
            self._ensure_open()
            if self._fd < 0:
                return  # still no segment (a full disk): tried again on the next chunk
            if not self._write(head, body):
                return  # not in the log (a full disk): `holds` says so
            self._pending[self._seg].add(start)
            self._where[start] = self._seg
            if self._size >= self._segment_bytes:
                self._open_next()

    def holds(self, starts: Iterable[int]) -> bool:
        """Whether every one of these chunks is written here and not yet done: what a restart would rebuild."""
        with self._lock:
            return all(s in self._where for s in starts)

    def batch(self, seq: int, starts: Iterable[int]) -> None:
        starts = list(starts)
        with self._lock:
            self._ensure_open()
            self._write(_B.pack(b"B", seq, len(starts)) + b"".join(_U64.pack(s) for s in starts))

    def done(self, starts: Iterable[int]) -> None:
        starts = list(starts)
        with self._lock:
            self._ensure_open()
            self._write(_F.pack(b"F", len(starts)) + b"".join(_U64.pack(s) for s in starts))
            for s in starts:
                seg = self._where.pop(s, None)
                if seg is not None:
                    self._pending[seg].discard(s)
            self._drop_done_prefix()
            if self._fd >= 0 and self._size and not any(self._pending.values()):
                # nothing waits anywhere (a quiet moment): the current segment too, its space back now rather than
                # at its cap. Only then: a batch record (B) or a done record (F) in it may still describe chunks
                # that wait in an older segment, and recovery needs it to rebuild that batch byte for byte.
                self._open_next()

    def close(self) -> None:
        """At a clean stop: the log goes when everything in it is done (else it stays, for the next start)."""
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self._drop_done_prefix(current_too=True)

    # -- internals --------------------------------------------------------------------------------------------
    def _write(self, *pieces: bytes) -> bool:
        """One record, from its pieces in order (a chunk's header and body: one system call, no joined copy).
        False when it could not be written."""
        if self._fd < 0:
            return False  # closed: shutdown's last sweep goes straight to the spool
        total = sum(len(p) for p in pieces)
        try:
            n = os.writev(self._fd, pieces)
            if n < total:  # a short write (rare on a regular file): finish it
                rest = b"".join(pieces)[n:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
            self._size += total
            return True
        except OSError as e:  # the log is a safety net: a full disk must not stop recording
            try:  # no torn record mid-segment: reading stops at one, and would lose every record after it
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            log.error("write-ahead log %s: write failed (%s); spans of the next moments are protected only once"
                      " they are batched", self.directory, e.strerror or e)
            return False

    def _ensure_open(self) -> None:
        """A segment to write to, after one could not be opened (a full disk): batch and done records matter as
        much as chunks for recovery."""
        if self._fd < 0 and not self._closed:
            self._open_next()

    def _drop_done_prefix(self, current_too: bool = False) -> None:
        """Delete the oldest segments while nothing in them or before them waits. Oldest first, and only those: a
        segment's batch (B) and done (F) records may describe chunks of any older segment, so one is safe to delete
        only when every older one is stored too (deleting a later segment first lost a batch record recovery
        needed, and a done record, so stored chunks were spooled again)."""
        for seg in sorted(self._pending):
            if self._pending[seg] or (seg == self._seg and not current_too):
                return
            self._drop(seg)

    def _open_next(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1  # never written to again, even if the next open fails
            os.close(fd)
        self._seg += 1
        self._size = 0
        self._pending[self._seg] = set()
        self._drop_done_prefix()  # the segment just closed too, when it and all before it are stored
        try:
            self._fd = os.open(os.path.join(self.directory, f"{_PREFIX}{self._seg:08d}{_SUFFIX}"),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._open_failed = False
        except OSError as e:  # a full or read-only disk: the log is a safety net, recording goes on without it
            # no file, so nothing to track (each chunk tries again: ~36,000 empty entries an hour of a full disk)
            self._pending.pop(self._seg, None)
            if not self._open_failed:  # said once, not on every chunk that tries again
                log.error("write-ahead log %s: cannot open a new segment (%s); spans are protected only once they "
                          "are batched until one can be opened", self.directory, e.strerror or e)
            self._open_failed = True

    def _drop(self, seg: int) -> None:
        self._pending.pop(seg, None)
        try:
            os.unlink(os.path.join(self.directory, f"{_PREFIX}{seg:08d}{_SUFFIX}"))
        except OSError:
            pass


def _segment_no(name: str) -> int | None:
    if name.startswith(_PREFIX) and name.endswith(_SUFFIX) and name[len(_PREFIX):-len(_SUFFIX)].isdigit():
        return int(name[len(_PREFIX):-len(_SUFFIX)])
    return None


def _records(data: bytes) -> Iterator[tuple]:
    pos = 0
    while pos < len(data):
        kind = data[pos:pos + 1]
        try:
            if kind == b"D":
                _, start, rows, size, crc = _D.unpack_from(data, pos)
                body = data[pos + _D.size:pos + _D.size + size]
                if len(body) < size or zlib.crc32(body) != crc:
                    return
                yield ("D", start, rows, body)
                pos += _D.size + size
            elif kind == b"B":
                _, seq, n = _B.unpack_from(data, pos)
                end = pos + _B.size + 8 * n
                if end > len(data):
                    return
                yield ("B", seq, [_U64.unpack_from(data, pos + _B.size + 8 * i)[0] for i in range(n)])
                pos = end
            elif kind == b"F":
                _, n = _F.unpack_from(data, pos)
                end = pos + _F.size + 8 * n
                if end > len(data):
                    return
                yield ("F", [_U64.unpack_from(data, pos + _F.size + 8 * i)[0] for i in range(n)])
                pos = end
            else:
                return
        except struct.error:  # a header cut short
            return


def read_pending(directory: str, max_bytes: int = 16 << 20) -> tuple[list[tuple[list[bytes], int]], list[str]]:
    """What a dead process left: the batches to spool, in order, each as (chunk bodies, rows), chunks it had not
    batched yet grouped up to `max_bytes`; and the segment files read (to delete once those are spooled)."""
    if not os.path.isdir(directory):
        return [], []
    files = sorted((n for n in os.listdir(directory) if _segment_no(n) is not None), key=_segment_no)
    chunks: dict[int, tuple[int, bytes]] = {}
    batches: list[tuple[int, list[int]]] = []
    done: set[int] = set()
    for name in files:
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        for rec in _records(data):
            if rec[0] == "D":
                chunks[rec[1]] = (rec[2], rec[3])
            elif rec[0] == "B":
                batches.append((rec[1], rec[2]))
            else:
                done.update(rec[1])
    out: list[tuple[list[bytes], int]] = []
    for _seq, starts in sorted(batches):
        if starts and all(s in chunks and s not in done for s in starts):
            out.append(([chunks[s][1] for s in starts], sum(chunks[s][0] for s in starts)))
            done.update(starts)
    group: list[int] = []
    size = 0
    for s in sorted(chunks):
        if s in done:
            continue
        if group and size + len(chunks[s][1]) > max_bytes:
            out.append(([chunks[g][1] for g in group], sum(chunks[g][0] for g in group)))
            group, size = [], 0
        group.append(s)
        size += len(chunks[s][1])
    if group:
        out.append(([chunks[g][1] for g in group], sum(chunks[g][0] for g in group)))
    return out, [os.path.join(directory, n) for n in files]
