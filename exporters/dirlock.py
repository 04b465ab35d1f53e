"""One process per directory: an exclusive, non-blocking flock on a file inside it. The kernel drops the lock when
the process dies (even by SIGKILL), so a crashed gateway never leaves a stale lock behind."""
from __future__ import annotations

import fcntl
import os

__all__ = ["lock_dir", "holder_pid", "is_locked"]


def lock_dir(path: str, filename: str, error: Exception) -> int:
    """Lock `path/filename` and return its fd (closing it releases the lock); raise `error` if another process
    holds it. The file records the holder's pid for whoever investigates."""
    fd = os.open(os.path.join(path, filename), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise error from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def holder_pid(path: str, filename: str) -> int | None:
    """The pid recorded in `path/filename` by the process that locked it last, if it reads as one."""
    try:
        with open(os.path.join(path, filename), "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_locked(path: str, filename: str) -> bool:
    """Does some process hold the lock on `path/filename` now? (Takes and drops it when free; writes nothing.)"""
    try:
        fd = os.open(os.path.join(path, filename), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we took
    return False
