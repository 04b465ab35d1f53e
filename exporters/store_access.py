"""`open_store(dsn)`: the one factory command-line tools use to reach a store, whoever holds it.

- A server DSN (or `:memory:`): `exporters.store.connect`, as always.
- An embedded store that a running gateway announced (`exporters.discovery`): a `RemoteStore` that sends every
  statement to that gateway over loopback. Same methods, same rows, same errors, so every command works unchanged.
- An embedded store nobody serves: `connect` opens it directly. A discovery file left by a gateway that died
  (SIGKILL: the process is gone or its port refuses connections) is reported in one line, the store is opened
  directly once the kernel has released the dead gateway's lock, and the stale file is removed. Calls it answered
  but had not stored (its write-ahead log and spool) are counted and named in one more line, on every direct
  open until a gateway starts on the store again and stores them.
- A serving gateway whose discovery file was deleted or damaged writes it again within 2 s: a command that finds
  the store locked without a usable announcement waits up to REANNOUNCE_WAIT_SECONDS for the new one.

`TAGWAY_VERBOSE=1` (set by `tagway --verbose`) prints one line saying which path was taken.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from . import discovery
from .dirlock import is_locked
from .dsn import default_dsn
from .remote_store import GatewayStuckError, RemoteStore, StoreAccessDenied, StoreGoneError
from .spool import unsent_spans
from .store import LOCK_FILE, Store, StoreError, StoreLockedError, connect

__all__ = ["open_store", "verbose_enabled", "reannounced", "REANNOUNCE_WAIT_SECONDS", "missing_store", "spool_beside",
           "MissingStoreError"]

LOCK_WAIT_SECONDS = 10.0
REANNOUNCE_WAIT_SECONDS = 3.0  # a serving gateway checks its discovery file every 2 s


class MissingStoreError(StoreError):
    """An embedded store that is not there, for a command that may not create one: bad input, said in one line."""


def missing_store(dsn: str) -> str | None:
    """The one-line problem when an embedded DSN names a directory with no store yet (a command that only reads must
    not create one), else None."""
    directory = discovery.store_dir(dsn)
    if directory is not None and not os.path.isdir(directory):
        if directory == discovery.store_dir(default_dsn()) and os.path.isfile("tagway.yaml"):  # none named, one there
            return (f"no tagway store at {directory}: ./tagway.yaml is read only when named: pass --config "
                    "tagway.yaml (or set TAGWAY_CONFIG=tagway.yaml) for the store it names")
        return (f"no tagway store at {directory}: start the gateway once (or run `tagway db migrate`), or pass "
                "--dsn / --config")
    return None


def spool_beside(store_dir: str) -> str:
    """The spool a gateway keeps beside its embedded store when storage.spool_dir is not set: <data_dir>/spool for
    the store <data_dir>/clickhouse (gateway/config.py)."""
    return os.path.join(os.path.dirname(store_dir), "spool")


def verbose_enabled() -> bool:
    return os.environ.get("TAGWAY_VERBOSE", "").lower() in ("1", "true", "yes", "on")


def _say(line: str) -> None:
    sys.stderr.write(f"tagway: {line}\n")
    sys.stderr.flush()


def open_store(dsn: str, *, verbose: bool | None = None, say: Callable[[str], None] = _say,
               lock_wait: float = LOCK_WAIT_SECONDS, create: bool = False) -> Store | RemoteStore:
    """The store for `dsn`: through the gateway that serves it, else opened directly. An embedded store that does
    not exist yet is created only with `create` (`tagway db migrate`, and commands that bring their own cases): a
    command that reads would answer from an empty store made in the wrong place (./tagway-data when the config was
    not named). Raises
    discovery.DiscoveryError (bad or unreadable discovery file), MissingStoreError, StoreLockedError, StoreError."""
    verbose = verbose_enabled() if verbose is None else verbose
    if not create:
        missing = missing_store(dsn)
        if missing:
            raise MissingStoreError(missing)
    directory = discovery.store_dir(dsn)
    if directory is None:
        store = connect(dsn)
        if verbose:
            say(f"store: opened directly ({_label(dsn)})")
        return store
    try:
        ann = discovery.read(directory) if os.path.isdir(directory) else None
    except discovery.DiscoveryPermissionError:
        raise
    except discovery.DiscoveryError:
        # a damaged file; if a gateway holds the store it writes the file again within seconds: use that one
        remote = None
        if is_locked(directory, LOCK_FILE):
            remote = _through_reannouncement(dsn, directory, None, verbose, say)
        if remote is None:
            raise
        return remote
    stale = ""  # why the announcement could not be used
    stopping = False  # its process is there but refuses: said before the wait
    wait = 0.0  # how long the lock may take to be freed: only when the announced gateway is going or gone
    if ann is not None:
        if not discovery.pid_alive(ann.pid):
            say(f"the gateway that served {directory} ({ann.describe()}) is gone (process not running); "
                "opening the store directly")
            wait = lock_wait
        else:
            remote, stale, gone = _reach(dsn, ann)
            if remote is not None:
                if verbose:
                    say(f"store: through the running gateway ({ann.describe()}), announced in {ann.path}")
                return remote
            if gone:  # its process is there but no longer serves: stopping (a drain can take a while), said now
                wait = lock_wait
                say(f"{stale}: it is stopping; waiting up to {lock_wait:g} s for it to release the store")
                stale = ""
                stopping = True
    try:
        store = _connect_when_free(dsn, wait)
    except StoreLockedError:
        # Held, and by a gateway that lost its discovery file (or whose file could not be used): it writes the
        # file again within seconds (gateway/store_api.py), so wait for a new announcement before giving up.
        remote = _through_reannouncement(dsn, directory, ann, verbose, say)
        if remote is None:
            if stale:
                say(stale)
            raise
        return remote
    if stale:
        say(f"{stale}; its discovery file was stale: opened the store directly")
    elif stopping:
        say("the gateway has stopped: opened the store directly")
    if ann is not None:
        # we hold the store lock now, so no gateway serves it: the file is certainly stale
        discovery.withdraw(ann)
    _say_unsent(ann.spool if ann is not None and ann.spool else spool_beside(directory), say)
    if verbose:
        say(f"store: opened directly ({directory})")
    return store


def _say_unsent(spool: str, say: Callable[[str], None]) -> None:
    """Calls a gateway answered but had not stored when it died (SIGKILL, OOM) wait in its spool directory until a
    gateway starts on the store again: a command that reads the store before then must not undercount in silence."""
    try:
        n = unsent_spans(spool) if os.path.isdir(spool) else 0
    except OSError:
        return
    if n:
        say(f"up to {n} call(s) the gateway answered are not in the store yet: they wait in {spool} (its write-ahead "
            "log and spool) and are stored when a gateway starts on this store again; until then these figures leave "
            "them out")


def _reach(dsn: str, ann: discovery.Announcement) -> tuple[RemoteStore | None, str, bool]:
    """(a RemoteStore to the announced gateway, "", False), or (None, why it cannot be used, whether it is going or
    gone rather than refusing our credential). Raises GatewayStuckError for a gateway that is there but silent."""
    remote = RemoteStore(dsn, ann)
    try:
        remote.identify()
    except GatewayStuckError:  # its process is there and keeps the lock: waiting for it would be in vain
        remote.close()
        raise
    except StoreGoneError as e:
        remote.close()
        return None, str(e), True
    except StoreAccessDenied as e:
        remote.close()
        return None, str(e), False
    return remote, "", False


def _through_reannouncement(dsn: str, directory: str, old: discovery.Announcement | None, verbose: bool,
                            say: Callable[[str], None]) -> RemoteStore | None:
    """The gateway holding the store, once it has announced itself again (gateway/store_api.py rewrites a lost,
    damaged or altered discovery file within seconds); None when no usable announcement comes in time."""
    new = reannounced(directory, old, REANNOUNCE_WAIT_SECONDS)
    remote = _reach(dsn, new)[0] if new is not None else None
    if remote is not None and verbose:
        say(f"store: through the running gateway ({new.describe()}), announced again in {new.path}")
    return remote


def reannounced(directory: str, old: discovery.Announcement | None, wait: float) -> discovery.Announcement | None:
    """An announcement other than `old` (another gateway, or the same one writing its file again over one altered,
    say a credential that no longer matches) appearing in `directory` within `wait` s, else None."""
    deadline = time.monotonic() + wait
    while True:
        try:
            ann = discovery.read(directory)
        except discovery.DiscoveryError:
            ann = None
        if ann is not None and ann != old and discovery.pid_alive(ann.pid):
            return ann
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


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
