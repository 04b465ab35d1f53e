"""One process at a time per replay run on this host. `replay run` and `replay resume` hold an exclusive `flock` on a
file named by the run id (under the user's cache directory) for as long as they call the gateway, so a second
`resume` of the same run (started twice, or while the first still runs) is refused in one line instead of paying for
every case a second time and checking `max_cost` on its own. A process that dies (SIGKILL) releases its lock at once,
so a resume right after a kill is never refused. Processes on other hosts are not seen."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .runner import FatalRunError

__all__ = ["run_lock", "lock_dir"]


def lock_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tagway" / "replay-runs"


@contextlib.contextmanager
def run_lock(run_id: str) -> Iterator[None]:
    directory = lock_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"{run_id}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError:  # no cache directory to write (a read-only home): run unguarded, as before
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise FatalRunError(f"replay run {run_id} is being run by another process on this host (pid {holder}): "
                                "wait for it to finish, or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
