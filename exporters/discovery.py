"""The discovery file: how a command-line tool finds the gateway that holds an embedded store.

chDB allows one process per data directory, so while `tagway serve` runs, a CLI cannot open the store itself. The
gateway therefore writes `tagway-gateway.json` into the store's directory (beside the `tagway.lock` it holds):
its pid, its loopback URL, when it started, and a random credential made for this start only. The file is mode
0600, so only a user who could open the store directly (the gateway's own user, or root) can read the credential;
it is written atomically and removed at shutdown. A gateway killed by SIGKILL leaves it behind: readers check that
the process and its port are still alive (`exporters.store_access`).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import socket
import time
import urllib.parse
from typing import Any

import orjson

from .store import chdb_path, is_embedded

__all__ = ["Announcement", "DiscoveryError", "DiscoveryPermissionError", "FILENAME", "store_dir", "discovery_path",
           "announce", "write", "withdraw", "read", "serving", "pid_alive"]

FILENAME = "tagway-gateway.json"
KIND = "tagway-gateway"
VERSION = 1


class DiscoveryError(ValueError):
    """The discovery file exists but is not one tagway wrote for this store (one line, names the file)."""


class DiscoveryPermissionError(DiscoveryError):
    """The discovery file (and so the gateway's local credential) cannot be read by this user."""


@dataclasses.dataclass(frozen=True)
class Announcement:
    pid: int
    url: str  # loopback base URL, e.g. http://127.0.0.1:4000
    started_at: float
    credential: str
    instance: str  # random id of this start; the gateway's ping answers it, so a reused port is not mistaken
    store: str  # the store directory the gateway holds
    spool: str = ""  # the gateway's spool directory (what it has not stored yet waits there if it dies)
    path: str = ""  # where this announcement was read from (not written)

    def describe(self) -> str:
        return f"pid {self.pid} at {self.url}"


def store_dir(dsn: str) -> str | None:
    """The directory an embedded (`chdb://`) DSN names, resolved as exporters.store resolves it; None for a server
    DSN or an in-memory store (nothing to share)."""
    if not is_embedded(dsn):
        return None
    path = chdb_path(dsn)
    return None if path == ":memory:" else path


def discovery_path(directory: str) -> str:
    return os.path.join(directory, FILENAME)


def announce(directory: str, url: str, *, pid: int | None = None, spool: str = "") -> Announcement:
    """Write this process's announcement for `directory` (replacing a stale one: the caller holds the store lock,
    so no other gateway can be serving it)."""
    return write(Announcement(pid=os.getpid() if pid is None else pid, url=url.rstrip("/"), started_at=time.time(),
                              credential=secrets.token_urlsafe(32), instance=secrets.token_hex(8), store=directory,
                              spool=spool))


def write(ann: Announcement) -> Announcement:
    """Write `ann` as the store directory's discovery file, atomically, 0600."""
    directory = ann.store
    body = orjson.dumps({"kind": KIND, "version": VERSION, "pid": ann.pid, "url": ann.url,
                         "started_at": ann.started_at, "credential": ann.credential, "instance": ann.instance,
                         "store": ann.store, "spool": ann.spool}, option=orjson.OPT_INDENT_2)
    final = discovery_path(directory)
    tmp = f"{final}.{ann.pid}.tmp"
    # created 0600 from the start (not chmod-ed after): the credential is never readable by others, even briefly
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old tmp file of the same name may have had other bits
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    return dataclasses.replace(ann, path=final)


def withdraw(ann: Announcement) -> None:
    """Remove the file if it is still ours (a newer gateway on the same store may have replaced it)."""
    path = ann.path or discovery_path(ann.store)
    try:
        current = read(ann.store)
    except DiscoveryError:
        return
    if current is not None and current.instance == ann.instance:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def read(directory: str) -> Announcement | None:
    """The announcement in `directory`, None when there is none. Raises DiscoveryError (one line, naming the file)
    when it cannot be read or is not a tagway gateway's announcement for this store, or names an address that is not
    this host's while its process runs. A dead gateway's announcement is returned as it is: check `pid_alive`
    before sending anything to its address."""
    path = discovery_path(directory)
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise DiscoveryPermissionError(
            f"cannot read {path}: permission denied. A gateway serves (or served) this store, and only the user who "
            "started it (or root) may read its local credential: run the command as that user") from None
    except OSError as e:
        raise DiscoveryError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise DiscoveryError(f"{path} is not a tagway gateway discovery file (not JSON); if no gateway serves this "
                             "store, remove it") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise DiscoveryError(f"{path} is not a tagway gateway discovery file; if no gateway serves this store, "
                             "remove it")
    if data.get("version") != VERSION:
        raise DiscoveryError(f"{path} was written by another tagway version (format {data.get('version')!r}, "
                             f"expected {VERSION}); use the same tagway version as the gateway")
    try:
        ann = Announcement(pid=_int(data["pid"]), url=_str(data["url"]), started_at=float(data["started_at"]),
                           credential=_str(data["credential"]), instance=_str(data["instance"]),
                           store=_str(data["store"]), path=path,
                           spool=data["spool"] if isinstance(data.get("spool"), str) else "")  # "" from older gateways
    except (KeyError, TypeError, ValueError) as e:
        raise DiscoveryError(f"{path} is a damaged tagway gateway discovery file ({e}); if no gateway serves this "
                             "store, remove it") from None
    if os.path.realpath(ann.store) != os.path.realpath(directory):
        raise DiscoveryError(f"{path} announces a gateway for another store ({ann.store}); it was copied or moved "
                             "here: remove it")
    if not ann.url.startswith("http://"):
        raise DiscoveryError(f"{path} names {ann.url!r}, not a gateway address; if no gateway serves this store, "
                             "remove it")
    # The local credential goes to that address: never off this machine. A dead gateway's file is stale whatever it
    # names (its address may be gone since, after a DHCP or VPN change) and nothing is sent to it: the caller opens
    # the store directly once the lock is free.
    if not _this_host(ann.url) and pid_alive(ann.pid):
        raise DiscoveryError(f"{path} names {ann.url!r}, not an address of this host (a gateway announces the "
                             "loopback or a local address it is bound to); if no gateway serves this store, remove it")
    return ann


def _this_host(url: str) -> bool:
    """The URL's host is an IP address of this machine (loopback, or one of its own interfaces): binding a socket
    to it succeeds only then. A gateway announces the address it is bound to, as an IP (store_api.local_url)."""
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False  # a name, not an address: never written by a gateway
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def this_host(url: str) -> bool:
    """The URL names this machine: `localhost`, or one of its own addresses."""
    return (urllib.parse.urlsplit(url).hostname or "") == "localhost" or _this_host(url)


def serving(directory: str) -> Announcement | None:
    """The gateway announced in `directory` while its process runs; None when none is announced, it is gone, or its
    file cannot be read (a caller that must say which uses `read` and `pid_alive`)."""
    try:
        ann = read(directory)
    except DiscoveryError:
        return None
    return ann if ann is not None and pid_alive(ann.pid) else None


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"bad pid {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"bad value {v!r}")
    return v


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
