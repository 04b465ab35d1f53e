"""Virtual keys: created once, stored as hashes, resolved to a principal (tenant, key id, admin) per request.

Keys are 256-bit random tokens, so one SHA-256 is enough (as for GitHub tokens): lookup is a dict hit on the hash.
Keys created with `tagway keys create` live in the keys file, which is re-read when it changes so a revocation
takes effect within a second without a restart.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import os
import secrets
import threading
import time

import yaml

from .config import GatewayConfig, KeyConfig, TenantConfig
from .errors import GatewayError, unauthorized

__all__ = ["Principal", "KeyRing", "hash_key", "new_key", "add_key_to_file", "revoke_key_in_file"]

KEY_PREFIX = "tw-"


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


ADMIN_TENANT_NONE = None


class KeyRing:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._checked_at = 0.0
        self._by_hash: dict[str, tuple[KeyConfig, TenantConfig]] = {}
        self._revoked: set[str] = set()
        self._admin_hash = config.admin_key_hash
        if not self._admin_hash and os.environ.get(config.admin_key_env):
            self._admin_hash = hash_key(os.environ[config.admin_key_env])
        self._load()

    # -- loading ----------------------------------------------------------------------------------------------
    def _load(self) -> None:
        by_hash: dict[str, tuple[KeyConfig, TenantConfig]] = {}
        revoked: set[str] = set()
        tenants = {t.customer: t for t in self.config.tenants}
        for t in self.config.tenants:
            for k in t.keys:
                (revoked.add(k.hash) if k.revoked else by_hash.__setitem__(k.hash, (k, t)))
        for k in self._read_file():
            t = tenants.get(k.customer or "")
            if t is None:
                continue  # a key for a tenant no longer configured authenticates nobody
            (revoked.add(k.hash) if k.revoked else by_hash.__setitem__(k.hash, (k, t)))
        self._by_hash, self._revoked = by_hash, revoked

    def _read_file(self) -> list[KeyConfig]:
        path = self.config.keys_file
        if not path or not os.path.exists(path):
            self._file_mtime = None
            return []
        self._file_mtime = os.path.getmtime(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or []
        return [KeyConfig(**item) for item in data if isinstance(item, dict)]

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        self._checked_at = now
        path = self.config.keys_file
        mtime = os.path.getmtime(path) if path and os.path.exists(path) else None
        if mtime != self._file_mtime:
            with self._lock:
                try:
                    self._load()
                except Exception:  # a half-written file: keep the previous keys, retry next second
                    self._checked_at = 0.0

    # -- per request ------------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, api_key_header: str | None = None) -> Principal:
        """`Authorization: Bearer <key>` (or Azure-style `api-key`) -> Principal, or a 401 GatewayError."""
        key = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        if key is None and api_key_header:
            key = api_key_header.strip()
        if not key:
            raise unauthorized("Missing API key: send 'Authorization: Bearer <tagway key>'.", code="missing_api_key")
        self._maybe_reload()
        h = hash_key(key)
        if self._admin_hash and hmac.compare_digest(h, self._admin_hash):
            return Principal(key_id="admin", tenant=None, key_tags={}, is_admin=True)
        hit = self._by_hash.get(h)
        if hit is None:
            if h in self._revoked:
                raise unauthorized("This API key has been revoked.", code="revoked_api_key")
            raise unauthorized("Incorrect API key provided.", code="invalid_api_key")
        k, tenant = hit
        return Principal(key_id=k.id, tenant=tenant, key_tags={**tenant.tags, **k.tags})

    def is_admin(self, authorization: str | None) -> bool:
        try:
            return self.authenticate(authorization).is_admin
        except GatewayError:
            return False


# -- the keys file (written by the CLI) ------------------------------------------------------------------------
def _read_list(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of keys")
    return data


def _write_list(path: str, items: list[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# tagway virtual keys: hashes only; managed by `tagway keys create/revoke`\n")
        yaml.safe_dump(items, f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def add_key_to_file(path: str, customer: str, key_id: str | None = None,
                    tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Create a key for `customer`, store its hash in the keys file, return (key_id, key). The key is not kept."""
    items = _read_list(path)
    key = new_key()
    key_id = key_id or f"{customer}-{secrets.token_hex(3)}"
    if any(i.get("id") == key_id for i in items):
        raise ValueError(f"a key with id {key_id!r} already exists")
    items.append({"id": key_id, "customer": customer, "hash": hash_key(key),
                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "revoked": False, "tags": tags or {}})
    _write_list(path, items)
    return key_id, key


def revoke_key_in_file(path: str, key_id: str) -> None:
    items = _read_list(path)
    for i in items:
        if i.get("id") == key_id:
            i["revoked"] = True
            _write_list(path, items)
            return
    raise ValueError(f"no key with id {key_id!r} in {path}")
