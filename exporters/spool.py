"""A durable on-disk spool: one file per batch of rows that could not (yet) be inserted into ClickHouse.

File layout: one header line of JSON, then the payload exactly as it would have been inserted:

    {"format":"tagway-spool","v":1,"table":"otel_traces","rows":2000,"bytes":4123456,"sha256":"..."}\\n<payload>

Names are `<seq:016d>-<unix ns>.spool`, so lexical order is sequence order. The sequence number is reserved when a
batch is taken from the in-memory queue (`reserve()`), not when the file is written, so a batch that failed after
a slow insert still sorts before the batches spilled while it was in flight.

Writes are atomic (write `.<name>.tmp`, fsync, rename, fsync the directory): a crash leaves either a complete file
or a `.tmp`. On start-up a `.tmp` whose checksum holds is promoted (the process died between fsync and rename),
any other is quarantined. A file that fails its checksum when read is renamed to `*.corrupt`, logged at ERROR
and counted: never silently skipped, never deleted. A failed write (disk full, I/O error) is the one way a batch
is lost: counted as dropped and logged at ERROR with the reason.

One process per spool directory (an flock on `spool.lock`), as with chDB's data directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time

import orjson

from .dirlock import lock_dir
from .metrics import ExportMetrics
from .rows import EncodedBatch
from .store import StoreLockedError
from .wal import is_log_dir, read_pending

__all__ = ["Spool", "SpoolFile", "SpoolLockedError", "SpoolWriteError", "FORMAT", "VERSION", "Quarantined",
           "quarantined", "requeue", "purge", "unsent_spans"]

log = logging.getLogger(__name__)

FORMAT = "tagway-spool"
VERSION = 1
_SUFFIX = ".spool"
_CORRUPT = ".corrupt"
_POISON = ".poison"  # refused by ClickHouse for its own rows (see exporters/insert_errors.py)
_REASON = ".reason"  # beside a quarantined file: why, one line
_TMP = ".tmp"
WRITE_ERROR_SECONDS = 60.0  # a failed spool write is news this long (/readyz)
_LOCK = "spool.lock"


class SpoolLockedError(StoreLockedError):
    """Another process uses the spool directory. (A StoreLockedError so the CLI reports both the same way.)"""


class SpoolWriteError(OSError):
    """A batch the spool could not write (a full or failing disk), for a caller that keeps the batch and tries
    again (`Spool.write(..., keep_on_error=True)`): nothing was dropped."""


class _Corrupt(Exception):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class SpoolFile:
    name: str
    size: int

    @property
    def seq(self) -> int:
        return int(self.name.split("-", 1)[0])


class Spool:
    def __init__(self, directory: str, *, metrics: ExportMetrics | None = None, fsync: bool = True,
                 max_bytes: int = 0, on_full: str = "drop_oldest") -> None:
        """`max_bytes` caps the pending files (0: no cap). When a batch would pass it, `on_full` says what goes:
        `drop_oldest` (older files make room) or `drop_newest` (the new batch); every dropped span is counted, and
        `full` says so until the spool is back under 90% of the cap."""
        assert on_full in ("drop_oldest", "drop_newest"), on_full
        self.directory = os.path.realpath(directory)
        self.metrics = metrics if metrics is not None else ExportMetrics()
        self._fsync = fsync
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.full = False
        self.write_error = ""  # why the last spool write failed (disk full, ...); "" once one succeeds again
        self._write_error_at = 0.0
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}  # name -> size in bytes
        self._pending_bytes = 0
        self._rows: dict[str, int] = {}  # name -> spans in it, as its header says (read once, for the gauge)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # spooled spans hold captured prompts: the owner's
        self._lock_fd: int | None = lock_dir(self.directory, _LOCK, SpoolLockedError(
            f"the spool directory {self.directory} is in use by another process; give each gateway process its own"
            " spool directory"))
        self._next_seq = 0
        self._recover()
        self.metrics.set_gauge("spool_files_pending", lambda: len(self._pending))
        self.metrics.set_gauge("spool_bytes_pending", lambda: self._pending_bytes)
        self.metrics.set_gauge("spool_full", lambda: 1 if self.full else 0)
        self.metrics.set_gauge("spool_spans_pending", self.pending_spans)

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def pending_files(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def pending(self) -> list[SpoolFile]:
        """Files waiting to be re-sent, oldest first."""
        with self._lock:
            return [SpoolFile(n, self._pending[n]) for n in sorted(self._pending)]

    def pending_spans(self) -> int:
        """Spans in the files waiting to be re-sent. A file's count comes from its header, read once (files written
        here are known already; recovered or re-queued ones are read at the first scrape)."""
        with self._lock:
            names = list(self._pending)
        total = 0
        for name in names:
            rows = self._rows.get(name)
            if rows is None:
                rows = self._rows[name] = _header_rows(os.path.join(self.directory, name)) or 0
            total += rows
        if len(self._rows) > len(names):  # forget the files that were sent or quarantined
            live = set(names)
            for gone in [n for n in list(self._rows) if n not in live]:
                self._rows.pop(gone, None)
        return total

    def digests(self) -> set[str]:
        """The payload checksums of the pending files (from their headers)."""
        out = set()
        for f in self.pending():
            try:
                with open(os.path.join(self.directory, f.name), "rb") as fh:
                    digest = orjson.loads(fh.readline(4096)).get("sha256")
            except (OSError, orjson.JSONDecodeError, AttributeError):
                continue
            if isinstance(digest, str):
                out.add(digest)
        return out

    def oldest_seq(self) -> int | None:
        """Sequence number of the oldest pending file, or None when the spool is empty."""
        with self._lock:
            return _seq_of(min(self._pending)) if self._pending else None

    def reserve(self) -> int:
        """The next sequence number; the file written with it sorts after every earlier reservation."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    # -- write ------------------------------------------------------------------------------------------------
    def write(self, batch: EncodedBatch, seq: int | None = None, *, keep_on_error: bool = False) -> str | None:
        """Persist one batch. Returns the file name, or None when it could not be written (the batch is then
        counted as dropped and logged at ERROR: the only way the pipeline loses data). `keep_on_error`: a write
        that fails (a full disk) raises SpoolWriteError instead, dropping nothing, for a caller that keeps the batch
        and tries again; the cap's policy (`on_full`) still drops, counted, as configured."""
        if batch.rows == 0:
            return None
        if seq is None:
            seq = self.reserve()
        if self.max_bytes and not self._make_room(batch):
            return None
        name = self._write_file(f"{seq:016d}-{time.time_ns()}{_SUFFIX}", batch, keep_on_error)
        if name is not None:
            self.metrics.inc("spans_spooled", batch.rows)
        return name

    def _make_room(self, batch: EncodedBatch) -> bool:
        """Under the cap: True. Else drop what the policy says (counted, logged) and say whether `batch` may go."""
        need = batch.size + 256  # + the header line
        if self._pending_bytes + need <= self.max_bytes:
            return True
        if not self.full:
            log.error("spool %s is full (cap %d bytes): dropping the %s spans until it drains; they are counted in"
                      " tagway_spans_dropped_total", self.directory, self.max_bytes,
                      "oldest" if self.on_full == "drop_oldest" else "newest")
        self.full = True
        if self.on_full == "drop_oldest" and need <= self.max_bytes:
            for f in self.pending():
                if self._pending_bytes + need <= self.max_bytes:
                    break
                path = os.path.join(self.directory, f.name)
                self.metrics.inc("spans_dropped", _rows_in(path))
                _unlink_quietly(path)
                with self._lock:  # not _forget: dropping to make room does not end "full"
                    self._pending_bytes -= self._pending.pop(f.name, 0)
            return self._pending_bytes + need <= self.max_bytes
        self.metrics.inc("spans_dropped", batch.rows)
        return False

    def _write_file(self, name: str, batch: EncodedBatch, keep_on_error: bool = False) -> str | None:
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}{_TMP}")
        header = orjson.dumps({"format": FORMAT, "v": VERSION, "table": batch.table, "rows": batch.rows,
                               "bytes": batch.size, "sha256": batch.digest}) + b"\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, header)
                for part in batch.parts:
                    _write_all(fd, part)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
            if self._fsync:
                _fsync_dir(self.directory)
        except OSError as e:
            _unlink_quietly(tmp)
            reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or type(e).__name__)
            first = not self.write_error  # a disk that stays full: said when it starts, not on every retry
            self.write_error, self._write_error_at = f"{reason} at {self.directory}", time.monotonic()
            self.metrics.inc("spool_write_errors")
            if keep_on_error:
                if first:
                    log.error("spool write failed: %s (%s); the batches are kept in memory and written once there "
                              "is room, or sent once ClickHouse answers", reason, e)
                raise SpoolWriteError(e.errno, reason) from None
            log.error("spool write failed, %d spans DROPPED: %s (%s)", batch.rows, reason, e)
            self.metrics.inc("spans_dropped", batch.rows)
            return None
        self.write_error = ""
        size = len(header) + batch.size
        with self._lock:
            self._pending[name] = size
            self._pending_bytes += size
            self._rows[name] = batch.rows
        return name

    def write_failing(self) -> str:
        """Why spool writes are failing, when the last one failed within WRITE_ERROR_SECONDS ("" otherwise): spans
        are being held in memory, or dropped, now. Once nothing needs the spool (ClickHouse answers) it clears."""
        if self.write_error and time.monotonic() - self._write_error_at <= WRITE_ERROR_SECONDS:
            return self.write_error
        return ""

    # -- read -------------------------------------------------------------------------------------------------
    def read(self, f: SpoolFile) -> EncodedBatch | None:
        """The batch stored in `f`, verified. A torn or corrupt file is quarantined (renamed *.corrupt), logged
        at ERROR, counted, and None is returned. A file that vanished returns None."""
        path = os.path.join(self.directory, f.name)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            self._forget(f.name)
            return None
        except OSError as e:
            # Unreadable now (EIO, permissions) is not proof of corruption: keep the file, let the caller retry.
            raise OSError(f"cannot read spool file {path}: {e}") from e
        try:
            return _parse(data)
        except _Corrupt as e:
            self.quarantine(f.name, str(e))
            return None

    def remove(self, f: SpoolFile) -> None:
        """Delete a file whose rows are now in ClickHouse."""
        _unlink_quietly(os.path.join(self.directory, f.name))
        self._forget(f.name)

    def quarantine(self, name: str, reason: str, *, poison: bool = False, rows: int = 0) -> None:
        """Move a file aside (`*.corrupt`: unreadable; `*.poison`: ClickHouse refuses its rows) with its reason
        beside it, log one line, count it. Never deleted: `tagway db spool` lists, re-queues or purges it."""
        src = os.path.join(self.directory, name)
        dst_name = name.lstrip(".").removesuffix(_TMP) + (_POISON if poison else _CORRUPT)
        what = "refused by ClickHouse" if poison else "corrupt"
        try:
            os.rename(src, os.path.join(self.directory, dst_name))
            with open(os.path.join(self.directory, dst_name + _REASON), "w", encoding="utf-8") as f:
                f.write(reason.replace("\n", " ")[:2000] + "\n")
        except OSError as e:
            log.error("spool file %s is %s (%s) and could not be quarantined: %s", src, what, reason, e)
        else:
            log.error("spool file %s is %s (%s): quarantined as %s; its rows were NOT sent (`tagway db spool list`"
                      " shows it, `tagway db spool retry` re-queues it)", src, what, reason, dst_name)
        if poison:
            self.metrics.inc("spool_poison_files")
            self.metrics.inc("spans_quarantined", rows)
        else:
            self.metrics.inc("spool_corrupt_files")
        self._forget(name)

    def split(self, f: SpoolFile, batch: EncodedBatch) -> list[SpoolFile]:
        """Replace `f` by two files holding its first and second half of rows, in its place in the order (to find
        the rows ClickHouse refuses without holding back the others). The halves are written before `f` goes, so
        a crash in between re-sends rows, never loses them."""
        lines = batch.body.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        mid = len(lines) // 2
        out = []
        base = f.name.removesuffix(_SUFFIX)
        for i, part in enumerate((lines[:mid], lines[mid:]), 1):
            body = b"\n".join(part) + b"\n"
            name = self._write_file(f"{base}-{i}{_SUFFIX}", EncodedBatch.of(batch.table, body, len(part)))
            if name is None:
                raise OSError(f"cannot split spool file {f.name}")
            out.append(SpoolFile(name, self._pending[name]))
        self.remove(f)
        return out

    def rescan(self) -> int:
        """Pick up `.spool` files put in the directory by someone else (`tagway db spool retry`). Returns how many."""
        found = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        for name in names:
            if name.endswith(_SUFFIX) and not name.startswith(".") and name not in self._pending:
                try:
                    size = os.path.getsize(os.path.join(self.directory, name))
                except OSError:
                    continue
                with self._lock:
                    self._pending[name] = size
                    self._pending_bytes += size
                    with contextlib.suppress(ValueError):  # later batches sort after it, as after our own files
                        self._next_seq = max(self._next_seq, int(name.split("-", 1)[0]) + 1)
                found += 1
        return found

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- internals --------------------------------------------------------------------------------------------
    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._pending.pop(name, None)
            if size is not None:
                self._pending_bytes -= size
            if self.full and self._pending_bytes <= 0.9 * self.max_bytes:
                self.full = False
                log.warning("spool %s has room again (%d bytes pending): no more drops", self.directory,
                            self._pending_bytes)

    def _recover(self) -> None:
        """Pick up what a previous process left: pending files, and `.tmp` files from a write cut short."""
        max_seq = -1
        names = sorted(os.listdir(self.directory))
        for name in names:
            seq = _seq_of(name)
            if seq is not None:
                max_seq = max(max_seq, seq)
        self._next_seq = max_seq + 1
        for name in names:
            path = os.path.join(self.directory, name)
            if name.startswith(".") and name.endswith(_TMP):
                try:
                    with open(path, "rb") as fh:
                        _parse(fh.read())
                except (_Corrupt, OSError) as e:
                    self.quarantine(name, f"incomplete write from an earlier process ({e}); it never counted as "
                                          "stored, so the write-ahead log (recording.write_ahead, on by "
                                          "default) spools its spans again")
                    continue
                final = name[1:].removesuffix(_TMP)
                os.rename(path, os.path.join(self.directory, final))
                log.warning("spool: completed the interrupted write of %s", final)
                name, path = final, os.path.join(self.directory, final)
            if name.endswith(_SUFFIX) and not name.startswith("."):
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
                self._pending[name] = size
                self._pending_bytes += size
        if self._pending:
            log.warning("spool %s holds %d file(s) (%d bytes) from an earlier run; they will be re-sent",
                        self.directory, len(self._pending), self._pending_bytes)


def _header_rows(path: str) -> int | None:
    """The span count a spool file's header line claims, or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            header = orjson.loads(fh.readline(4096))
    except (OSError, orjson.JSONDecodeError):
        return None
    rows = header.get("rows") if isinstance(header, dict) else None
    return rows if isinstance(rows, int) and rows >= 0 else None


def unsent_spans(directory: str) -> int:
    """Spans a gateway left under its spool `directory` (and its worker-N slots) that are not stored yet: the
    batches waiting in spool files and what its write-ahead log holds. It counts up to that many: a batch whose
    insert landed just before a SIGKILL is still in the log (sent again, ClickHouse drops the copy). Read-only, and
    works whether or not a gateway uses the directory."""
    n = 0
    for root, _dirs, files in os.walk(directory):
        if is_log_dir(root):
            n += sum(rows for _chunks, rows in read_pending(root)[0])
            continue
        n += sum(_rows_in(os.path.join(root, name)) for name in files if name.endswith(_SUFFIX))
    return n


# -- quarantined files, for `tagway db spool` (works on a directory whether or not a gateway uses it) ----------
@dataclasses.dataclass(frozen=True, slots=True)
class Quarantined:
    path: str
    kind: str  # poison | corrupt
    rows: int | None  # from the header, when readable
    bytes: int
    reason: str
    mtime: float


def quarantined(directory: str) -> list[Quarantined]:
    """Every quarantined file under `directory` (and its worker-N slots), oldest first."""
    out = []
    for root, _dirs, files in os.walk(directory):
        for name in files:
            kind = "poison" if name.endswith(_POISON) else "corrupt" if name.endswith(_CORRUPT) else ""
            if not kind:
                continue
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
                with open(path, "rb") as fh:
                    head = fh.readline(4096)
            except OSError:
                continue
            try:
                rows = orjson.loads(head).get("rows")
            except (orjson.JSONDecodeError, AttributeError):
                rows = None
            try:
                with open(path + _REASON, encoding="utf-8") as fh:
                    reason = fh.read().strip()
            except OSError:
                reason = ""
            out.append(Quarantined(path, kind, rows if isinstance(rows, int) else None, st.st_size, reason,
                                   st.st_mtime))
    return sorted(out, key=lambda q: (q.mtime, q.path))


def requeue(q: Quarantined) -> str:
    """Put a quarantined file back in line to be sent (after its cause was fixed); a running gateway picks it up
    within seconds. Returns the new path."""
    directory, name = os.path.split(q.path)
    stem = name.removesuffix(_POISON).removesuffix(_CORRUPT).removesuffix(_SUFFIX)
    new = os.path.join(directory, f"{stem}-retry{time.time_ns()}{_SUFFIX}")
    os.rename(q.path, new)
    _unlink_quietly(q.path + _REASON)
    return new


def purge(q: Quarantined) -> None:
    """Delete a quarantined file for good (its rows are gone: only on a user's explicit request)."""
    os.unlink(q.path)
    _unlink_quietly(q.path + _REASON)


def _parse(data: bytes) -> EncodedBatch:
    nl = data.find(b"\n")
    if nl < 0:
        raise _Corrupt("no header line")
    try:
        header = orjson.loads(data[:nl])
    except orjson.JSONDecodeError as e:
        raise _Corrupt(f"unreadable header: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _Corrupt("not a tagway spool file")
    if header.get("v") != VERSION:
        raise _Corrupt(f"unknown spool format version {header.get('v')!r}")
    body = data[nl + 1:]
    if len(body) != header.get("bytes"):
        raise _Corrupt(f"payload is {len(body)} bytes, header says {header.get('bytes')} (torn write)")
    table, rows = header.get("table"), header.get("rows")
    if not isinstance(table, str) or not table or not isinstance(rows, int):
        raise _Corrupt("header lacks table or rows")
    batch = EncodedBatch.of(table, body, rows)
    if batch.digest != header.get("sha256"):
        raise _Corrupt("payload checksum mismatch")
    return batch


def _rows_in(path: str) -> int:
    """The row count a spool file's header gives (0 when unreadable)."""
    try:
        with open(path, "rb") as fh:
            rows = orjson.loads(fh.readline(4096)).get("rows")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return 0
    return rows if isinstance(rows, int) else 0


def _seq_of(name: str) -> int | None:
    head = name.lstrip(".").split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
