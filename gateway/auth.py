"""Virtual keys: created once, stored as hashes, resolved to a principal (tenant, key id, admin) per request.

Keys are 256-bit random tokens, so one SHA-256 is enough (as for GitHub tokens): lookup is a dict hit on the hash.
Keys created with `tagway keys create` live in the keys file, which is re-read when it changes so a revocation
takes effect within a second without a restart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from pydantic import ValidationError
from starlette.datastructures import Headers

from exporters.yamlfile import YamlFileError, item_lines, load_yaml

from .config import (KEY_HASH_FORM, GatewayConfig, KeyConfig, LimitsConfig, TenantConfig, key_hash_ok,
                     normal_key_hash)
from .errors import GatewayError, bad_request, unauthorized

__all__ = ["Principal", "KeyRing", "KeysFileError", "hash_key", "new_key", "add_key_to_file", "revoke_key_in_file",
           "read_keys_file", "read_keys", "keys_without_tenant", "key_id_problem", "ADMIN_KEY_ID",
           "CREDENTIAL_HEADERS"]

KEY_PREFIX = "tw-"
ADMIN_KEY_ID = "admin"  # the admin key's id: what its calls are recorded as (llm_calls.key_id)
log = logging.getLogger("tagway.auth")
# headers that say who is calling: each may come once (two `Authorization` headers must not be read as the first
# by one route and the last by another)
CREDENTIAL_HEADERS = ("authorization", "api-key", "x-api-key")  # x-api-key: Anthropic-SDK clients


class KeysFileError(ValueError):
    """The keys file cannot be used. `problems`: one line each, naming the file (and the line and the entry, where
    there are some); `str(e)` is all of them on one line."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


def key_id_problem(key_id: str) -> str:
    """Why no key may have this id, or "". Calls are recorded with their key's id, a platform key reads the calls
    recorded with its own and any key rates them: a key with the admin key's id read (and rated) every call the admin
    key made, for every customer; a blank one, the calls refused for having no valid key."""
    if not key_id.strip():
        return "a key's id must not be blank"
    if any(c < " " or c == "\x7f" for c in key_id):  # they would also split a limit's scope (gateway/limits.py)
        return "a key's id must not hold control characters"
    if key_id == ADMIN_KEY_ID:
        return f"{ADMIN_KEY_ID!r} is the admin key's id (its calls are recorded under it); give this key another id"
    return ""


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    tenant: TenantConfig | None  # None for the admin key
    key_tags: dict[str, str]
    is_admin: bool = False
    limits: LimitsConfig | None = None  # the key's own rate limits / budget

    @property
    def customer(self) -> str:
        return self.tenant.customer if self.tenant else ""

    @property
    def may_set_customer(self) -> bool:
        return self.is_admin or bool(self.tenant and self.tenant.may_set_customer)

    @property
    def capture_content(self) -> bool:
        return self.tenant.capture_content if self.tenant else True

    def allows(self, model: str) -> bool:
        return self.is_admin or self.tenant is None or self.tenant.allows(model)


class KeyRing:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._by_hash: dict[str, tuple[KeyConfig, TenantConfig]] = {}
        self._revoked: set[str] = set()
        self._from_file = 0  # active keys loaded from the keys file
        self._admin_hash = config.admin_key_hash
        if not self._admin_hash and os.environ.get(config.admin_key_env):
            self._admin_hash = hash_key(os.environ[config.admin_key_env])
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._failures_lock = threading.Lock()
        self.failures: dict[str, int] = {}  # refused credentials by reason (code), for /metrics
        # the keys file as last seen (_file_state), and whether that one could not be loaded: each change of the
        # file is acted on (and logged) once, not on every tick of the watcher
        self._seen, _ = _file_state(config.keys_file)
        self._broken = False
        self._gone = False  # the file went away and that was said (until it is back)
        self._load()

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Build the lookup tables and swap them in whole (readers on the event loop never see half a load)."""
        path = self.config.keys_file
        from_file = read_keys(self.config) if path and os.path.exists(path) else []
        by_hash: dict[str, tuple[KeyConfig, TenantConfig]] = {}
        revoked: set[str] = set()
        tenants = {t.customer: t for t in self.config.tenants}
        for i, t in enumerate(self.config.tenants):
            for j, k in enumerate(t.keys):
                if why := key_id_problem(k.id):  # it authenticates nobody, as a key of no tenant does
                    log.error("tenants[%d].keys[%d]: key %r is not used: %s", i, j, k.id, why)
                    continue
                (revoked.add(k.hash) if k.revoked else by_hash.__setitem__(k.hash, (k, t)))
        n = 0
        for k in from_file:
            t = tenants.get(k.customer or "")
            if t is None:
                continue  # a key for a tenant no longer configured authenticates nobody
            if k.revoked:
                revoked.add(k.hash)
            else:
                by_hash[k.hash] = (k, t)
                n += 1
        self._by_hash, self._revoked, self._from_file = by_hash, revoked, n

    def keys(self) -> list[tuple[KeyConfig, TenantConfig]]:
        """Every active key with its tenant (config and keys file)."""
        return list(self._by_hash.values())

    def reload_if_changed(self) -> bool:
        """Re-read the keys file if it changed since it was last seen; True when new keys were swapped in.

        A file that cannot be loaded keeps the previous keys (but its revocations apply) and is logged as an ERROR
        once per change of the file, not on every call; a file that loads again after that, a file that is gone
        (its keys stop authenticating: a WARNING, once until it is back) and one that is back are logged once too."""
        path = self.config.keys_file
        state, why = _file_state(path)
        if state == self._seen:
            return False
        was, was_broken, self._seen = self._seen, self._broken, state
        if state is None:  # moved away or deleted: only the config's keys are left
            before = self._from_file
            self._load()
            self._broken = False
            if was is not None and not self._gone:
                self._gone = True
                log.warning("the keys file %s is gone (%s): its %d active key(s) no longer authenticate until it is "
                            "back", path, why, before)
            return True
        try:
            self._load()
        except Exception as e:  # a half-written or broken file: keep the previous keys, retry when it changes
            self._broken = True
            log.error("cannot load the keys file %s (keeping the previous keys; said again only when the file "
                      "changes): %s", path, e)
            self._revoke_from(path)
            return False
        self._broken = False
        if was_broken or self._gone:
            log.warning("the keys file %s %s: %d active key(s) from it", path,
                        "loads again" if was_broken else "is back", self._from_file)
        self._gone = False
        return True

    def _revoke_from(self, path: str | None) -> None:
        """A file the gateway cannot load (an entry hand-edited wrong) still revokes what it marks revoked: a
        revocation must not wait until unrelated entries are fixed."""
        try:
            items = read_keys_file(path or "")
        except Exception:  # not even a list of mappings: nothing can be read from it
            return
        gone = {normal_key_hash(i["hash"]) for i in items
                if i.get("revoked") is True and isinstance(i.get("hash"), str)}
        if gone & set(self._by_hash):
            self._by_hash = {h: v for h, v in self._by_hash.items() if h not in gone}
            self._revoked = self._revoked | gone

    def start_watching(self, interval: float = 1.0) -> None:
        """Re-read the keys file when it changes, on a thread: parsing thousands of keys must not stall calls,
        and a revocation takes effect within `interval` seconds without a restart."""
        if self._watcher is not None or not self.config.keys_file:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reload_if_changed()
                except Exception:  # never let one bad tick end the watching (and with it every later revocation)
                    log.exception("re-reading the keys file %s failed", self.config.keys_file)

        self._watcher = threading.Thread(target=run, name="tagway-keys-watch", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()

    # -- per request ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, api_key_header: str | None = None,
                     other_api_key: str | None = None) -> Principal:
        """`Authorization: Bearer <key>` (or Azure-style `api-key`) -> Principal, or a 401 GatewayError (counted
        by reason in `failures`)."""
        try:
            return self._principal(authorization, api_key_header, other_api_key)
        except GatewayError as e:
            self.refused(e.code or "invalid_api_key")
            raise

    def authenticate_headers(self, headers: Any) -> Principal:
        """The same from a request's headers (anything with `getlist`, e.g. Starlette's): a credential header sent
        twice is a 400, whichever of the two a route would have read."""
        for name in CREDENTIAL_HEADERS:
            if len(headers.getlist(name)) > 1:
                self.refused("duplicate_header")
                raise duplicate_header(name)
        return self.authenticate(*_credentials(headers))

    def may_mark_replay(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether a request's key (ASGI headers) may mark its call as a replay's: the admin key or a platform key.
        Nothing is counted: the call itself is authenticated, and refused, later."""
        try:
            return self._principal(*_credentials(Headers(raw=headers))).may_set_customer
        except GatewayError:
            return False

    def refused(self, reason: str) -> None:
        with self._failures_lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def _principal(self, authorization: str | None, api_key_header: str | None,
                   other_api_key: str | None = None) -> Principal:
        key = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        other = api_key_header.strip() if api_key_header else ""
        if key is not None and other and other != key:  # whose call is it? never a guess
            raise conflicting_keys()
        if other_api_key is not None and other_api_key.strip() != other:  # api-key and x-api-key disagree
            raise conflicting_keys()
        if key is None and other:
            key = other
        if not key:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <tagway key>'.", code="missing_api_key")
        h = hash_key(key)
        if self._admin_hash and hmac.compare_digest(h, self._admin_hash):
            return Principal(key_id=ADMIN_KEY_ID, tenant=None, key_tags={}, is_admin=True)
        hit = self._by_hash.get(h)
        if hit is None:
            if h in self._revoked:
                raise unauthorized("This API key has been revoked.", code="revoked_api_key")
            raise unauthorized("Incorrect API key provided.", code="invalid_api_key")
        k, tenant = hit
        return Principal(key_id=k.id, tenant=tenant, key_tags={**tenant.tags, **k.tags}, limits=k.limits)


def _file_state(path: str | None) -> tuple[tuple[int, ...] | None, str]:
    """What tells one version of the keys file from another without reading it (device, inode, size, mtime and
    ctime, so a rewrite within the same mtime tick, a `mv` over it or a chmod count as changes), or None when there
    is no file to read, with why."""
    if not path:
        return None, "no keys file"
    try:
        st = os.stat(path)
    except OSError as e:
        return None, e.strerror or str(e)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), ""


def conflicting_keys() -> GatewayError:
    return bad_request("Two different API keys are sent (in Authorization and api-key or x-api-key); send one.",
                       code="conflicting_api_keys", param="authorization")


def duplicate_header(name: str) -> GatewayError:
    return bad_request(f"The {name} header is sent more than once; send it once.", code="duplicate_header",
                       param=name)


# -- the keys file (written by the CLI) ------------------------------------------------------------------------
def read_keys_file(path: str) -> list[dict]:
    """The keys file's entries as written ([] when there is no file yet), for the CLI to list or rewrite them; a
    KeysFileError of one line per problem when it is not YAML, not a list, or holds something other than mappings.
    What makes an entry unusable is `read_keys`'s to say: a file with a bad entry can still be listed and revoked in."""
    if not path or not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise KeysFileError(f"{path}: is a directory; keys_file names the file `tagway keys create` writes")
    try:
        data = load_yaml(path, "keys file")
    except YamlFileError as e:
        raise KeysFileError(str(e)) from None
    if data is None:
        return []
    if not isinstance(data, list):
        raise KeysFileError(f"{path}: expected a list of keys (as `tagway keys create` writes)")
    bad = [i for i, item in enumerate(data) if not isinstance(item, dict)]
    if bad:
        lines = item_lines(path)
        raise KeysFileError([f"{_entry(path, lines, i)}: each key must be a mapping" for i in bad])
    return data


def _credentials(headers: Any) -> tuple[str | None, str | None, str | None]:
    """(Authorization, the api-key or x-api-key value, x-api-key when both came) from a request's headers."""
    azure, anthropic = headers.get("api-key"), headers.get("x-api-key")
    return headers.get("authorization"), azure or anthropic, anthropic if azure else None


def read_keys(config: GatewayConfig) -> list[KeyConfig]:
    """The keys of the config's keys file ([] when there is none), one per entry in file order; or a KeysFileError
    with one line per problem (`<file>:<line>: key #<n>: <what>`) when any entry cannot work: a field missing or of
    the wrong type, a hash that is not `sha256:` and 64 hex digits (it would never match), no customer (it would
    authenticate nobody), an id used twice in the file or also by a key in the config (`tagway keys revoke` would
    revoke the wrong one, or refuse). `tagway serve` refuses to start with such a file and `tagway config check`
    reports it the same way; a running gateway keeps its previous keys when the file changes into one.

    A key whose customer is not a tenant of the config is no problem here: removing a tenant is how its keys are
    shut out (see `keys_without_tenant`)."""
    path = config.keys_file
    if not path:
        return []
    items = read_keys_file(path)
    problems: list[tuple[int, str]] = []
    keys: list[KeyConfig] = []
    inline: dict[str, str] = {}  # a config key's id -> where it is written
    inline_hashes: dict[str, str] = {}  # its hash -> the same
    for i, t in enumerate(config.tenants):
        for j, k in enumerate(t.keys):
            inline[k.id] = inline_hashes[k.hash] = f"tenants[{i}].keys[{j}]"
    first: dict[str, int] = {}  # id -> the entry that has it first
    first_hash: dict[str, int] = {}  # hash -> the entry that has it first
    for i, item in enumerate(items):
        try:
            k = KeyConfig.model_validate(item)
        except ValidationError as e:
            problems += [(i, f"{'.'.join(map(str, err['loc'])) or 'key'}: {err['msg']}") for err in e.errors()]
            continue
        keys.append(k)
        if not key_hash_ok(k.hash):  # the value is not quoted: it might be a key pasted by mistake, or cut short
            problems.append((i, f"hash: must be {KEY_HASH_FORM}; this key can never match"))
        if not k.customer:
            problems.append((i, ("customer: missing: a key in the keys file names its tenant (customer: <name>); "
                                 "this key authenticates nobody")))
        if why := key_id_problem(k.id):
            problems.append((i, f"id: {why}"))
        if k.id in inline:
            problems.append((i, (f"id: {k.id!r} is also the id of a key in the config ({inline[k.id]}); give each "
                                 "key its own id")))
        if k.id in first:
            problems.append((i, f"id: {k.id!r} is already the id of key #{first[k.id] + 1}; give each key its own id"))
        else:
            first[k.id] = i
        # the same key twice: whose tenant it is, and whether revoking one entry revokes it, would be a guess
        if k.hash in first_hash:
            problems.append((i, f"hash: the same key as key #{first_hash[k.hash] + 1}; keep one entry per key"))
        elif k.hash in inline_hashes:
            problems.append((i, f"hash: the same key as {inline_hashes[k.hash]} in the config; keep one entry per "
                                "key"))
        else:
            first_hash[k.hash] = i
    if problems:
        lines = item_lines(path)
        raise KeysFileError([f"{_entry(path, lines, i)}: {what}" for i, what in problems])
    return keys


def keys_without_tenant(config: GatewayConfig, keys: list[KeyConfig]) -> list[tuple[str, KeyConfig]]:
    """The active keys of the keys file (`keys` as `read_keys` returns them) whose customer is no tenant of the
    config, each with where it is (`<file>:<line>: key #<n>`). They get 401 "Incorrect API key provided." until
    the tenant is added; not an error, since removing a tenant from the config is how its keys are shut out (the
    keys file keeps revoked and orphaned entries), and `tagway keys create` may run before any tenant exists."""
    tenants = {t.customer for t in config.tenants}
    orphans = [(i, k) for i, k in enumerate(keys) if not k.revoked and k.customer and k.customer not in tenants]
    if not orphans:
        return []
    lines = item_lines(config.keys_file or "")
    return [(_entry(config.keys_file or "", lines, i), k) for i, k in orphans]


def _entry(path: str, lines: list[int], index: int) -> str:
    return f"{path}:{lines[index] if index < len(lines) else '?'}: key #{index + 1}"


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the keys file's sidecar `<file>.lock` (created 0600 beside it, never removed):
    `tagway keys create/revoke` read, change and rewrite the file under it, so two of them at once cannot lose each
    other's entries. The gateway reads without it (the file is only ever replaced whole)."""
    lock = f"{path}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise KeysFileError(f"{path}: cannot write the keys file: no directory {directory}") from None
        raise KeysFileError(f"{path}: cannot lock the keys file ({lock}: {e.strerror or e})") from None
    try:
        with contextlib.suppress(OSError):  # root writing a user's file leaves the lock usable by that user
            st = os.stat(path)
            if os.fstat(fd).st_uid != st.st_uid:
                os.fchown(fd, st.st_uid, st.st_gid)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_list(path: str, items: list[dict]) -> None:
    """Replace the keys file whole (readers see the old file or the new one), through a temporary file of its own in
    the same directory; the file keeps its mode (0600 for a new one) and, where allowed, its owner. Call it under
    `_locked(path)`. A failure is a KeysFileError naming the keys file, and leaves it as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise KeysFileError(f"{path}: cannot write the keys file: {e.strerror or e}") from None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# tagway virtual keys: hashes only; managed by `tagway keys create/revoke/limits`\n")
            yaml.safe_dump(items, f, sort_keys=False)
            f.flush()
            if st is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    with contextlib.suppress(OSError):  # only root (or the owner, for a group) may: best effort
                        os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise KeysFileError(f"{path}: cannot write the keys file: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the directory is on disk
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def add_key_to_file(path: str, customer: str, key_id: str | None = None,
                    tags: dict[str, str] | None = None, limits: dict | None = None) -> tuple[str, str]:
    """Create a key for `customer`, store its hash in the keys file, return (key_id, key). The key is not kept.
    Safe to run alongside other `keys create/revoke` on the same file: each sees the others' entries."""
    with _locked(path):
        items = read_keys_file(path)
        key = new_key()
        key_id = key_id or f"{customer}-{secrets.token_hex(3)}"
        if why := key_id_problem(key_id):
            raise ValueError(why)
        if any(i.get("id") == key_id for i in items):
            raise ValueError(f"a key with id {key_id!r} already exists")
        items.append({"id": key_id, "customer": customer, "hash": hash_key(key),
                      "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "revoked": False, "tags": tags or {}, **({"limits": limits} if limits else {})})
        _write_list(path, items)
    return key_id, key


def set_key_limits_in_file(path: str, key_id: str, change: Callable[[Any], dict | None]) -> dict | None:
    """Replace a key's `limits` with `change(its current limits)` (None removes them), under the file's lock so a
    concurrent `keys create/revoke` is not lost; returns what was written. A running gateway applies it within a
    second, as it does a revocation."""
    with _locked(path):
        items = read_keys_file(path)
        for i in items:
            if i.get("id") == key_id:
                limits = change(i.get("limits"))
                if limits:
                    i["limits"] = limits
                else:
                    i.pop("limits", None)
                _write_list(path, items)
                return limits
    raise ValueError(f"no key with id {key_id!r} in {path}")


def revoke_key_in_file(path: str, key_id: str) -> None:
    with _locked(path):
        items = read_keys_file(path)
        for i in items:
            if i.get("id") == key_id:
                i["revoked"] = True
                _write_list(path, items)
                return
    raise ValueError(f"no key with id {key_id!r} in {path}")
