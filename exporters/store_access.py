"""`open_store(dsn)`: the one factory command-line tools use to reach a store, whoever holds it.

- A server DSN (or `:memory:`): `exporters.store.connect`, as always.
- An embedded store that a running gateway announced (`exporters.discovery`): a `RemoteStore` that sends every
  statement to that gateway over loopback. Same methods, same rows, same errors, so every command works unchanged.
- An embedded store nobody serves: `connect` opens it directly. A discovery file left by a gateway that died
  (SIGKILL: the process is gone or its port refuses connections) is reported in one line, the store is opened
  directly once the kernel has released the dead gateway's lock, and the stale file is removed.

`TAGWAY_VERBOSE=1` (set by `tagway --verbose`) prints one line saying which path was taken.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from . import discovery
from .remote_store import RemoteStore, StoreAccessDenied, StoreGoneError
from .store import Store, StoreLockedError, connect

__all__ = ["open_store", "verbose_enabled"]

LOCK_WAIT_SECONDS = 10.0


def verbose_enabled() -> bool:
    return os.environ.get("TAGWAY_VERBOSE", "").lower() in ("1", "true", "yes", "on")


def _say(line: str) -> None:
    sys.stderr.write(f"tagway: {line}\n")
    sys.stderr.flush()


def open_store(dsn: str, *, verbose: bool | None = None, say: Callable[[str], None] = _say,
               lock_wait: float = LOCK_WAIT_SECONDS) -> Store | RemoteStore:
    """The store for `dsn`: through the gateway that serves it, else opened directly. Raises
    discovery.DiscoveryError (bad or unreadable discovery file), StoreLockedError, StoreError."""
    verbose = verbose_enabled() if verbose is None else verbose
    directory = discovery.store_dir(dsn)
    if directory is None:
        store = connect(dsn)
        if verbose:
            say(f"store: opened directly ({_label(dsn)})")
        return store
    ann = discovery.read(directory) if os.path.isdir(directory) else None
    stale = False
    if ann is not None:
        if not discovery.pid_alive(ann.pid):
            say(f"the gateway that served {directory} ({ann.describe()}) is gone (process not running); "
                "opening the store directly")
            stale = True
        else:
            remote = RemoteStore(dsn, ann)
            try:
                remote.identify()
            except (StoreGoneError, StoreAccessDenied) as e:
                remote.close()
                say(f"{e}; treating its discovery file as stale and opening the store directly")
                stale = True
            else:
                if verbose:
                    say(f"store: through the running gateway ({ann.describe()}), announced in {ann.path}")
                return remote
    store = _connect_when_free(dsn, lock_wait if stale else 0.0)
    if stale and ann is not None:
        # we hold the store lock now, so no gateway serves it: the file is certainly stale
        discovery.withdraw(ann)
    if verbose:
        say(f"store: opened directly ({directory})")
    return store


def _connect_when_free(dsn: str, wait: float) -> Store:
    """connect(), retrying while the lock is held for up to `wait` s (a killed process releases it as it exits)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return connect(dsn)
        except StoreLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _label(dsn: str) -> str:
    from .store import redact_dsn  # noqa: PLC0415
    return redact_dsn(dsn)


def describe(store: Any) -> str:
    """'gateway pid N at URL' or 'direct' (for messages)."""
    return f"gateway {store.announcement.describe()}" if isinstance(store, RemoteStore) else "direct"
