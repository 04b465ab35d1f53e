"""Which headers cross the gateway: the client's OpenAI/Anthropic headers that go upstream (`OpenAI-Beta`,
`Idempotency-Key`, ...), and the upstream's headers that go back to the client (`x-request-id`, `x-ratelimit-*`,
`retry-after`, `x-should-retry`, ...). Allow-lists from `api:` in the config; names compare lower-case, a trailing
`*` matches a family. Credentials, framing headers and tagway's own `x-tagway-*` never cross, whatever the list says.
Pure; runs on the hot path, so a miss costs a set lookup and one `startswith`.

What crosses is then fitted to the key that sent it (`KeyScope`): tenants share the provider account, so a tenant
key's `OpenAI-Organization`/`OpenAI-Project` (which would point the operator's provider key at another organisation
or project of the account, with its own files and responses that no tenant here owns) stay behind, and every key's
`Idempotency-Key` goes up in a namespace of its own tenant (the provider's idempotency is per account: one
tenant's key, reused by another, would answer that tenant with the first one's cached response).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

__all__ = ["HeaderFilter", "KeyScope"]

ACCOUNT_HEADERS = frozenset({b"openai-organization", b"openai-project"})
IDEMPOTENCY_KEY = b"idempotency-key"

_NEVER = frozenset({b"authorization", b"api-key", b"x-api-key", b"host", b"content-length", b"content-type",
                    b"content-encoding", b"transfer-encoding", b"connection", b"keep-alive", b"set-cookie", b"cookie",
                    b"proxy-authorization", b"upgrade", b"te", b"trailer"})


class HeaderFilter:
    __slots__ = ("_exact", "_prefixes")

    def __init__(self, names: Iterable[str]) -> None:
        exact, prefixes = set(), []
        for n in names:
            n = n.strip().lower()
            if n.endswith("*"):
                prefixes.append(n[:-1].encode("latin-1"))
            elif n:
                exact.add(n.encode("latin-1"))
        self._exact = frozenset(exact - _NEVER)
        self._prefixes = tuple(prefixes)

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def allows(self, name: bytes) -> bool:
        """`name` lower-case."""
        if name in self._exact:
            return True
        return bool(self._prefixes) and name.startswith(self._prefixes) and name not in _NEVER \
            and not name.startswith(b"x-tagway-")

    def pick(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The allowed (name, value) pairs, names lower-cased (ASGI's and HTTP/2's form)."""
        out = []
        for k, v in headers:
            k = k.lower()
            if self.allows(k):
                out.append((k, v))
        return out


class KeyScope:
    """The forwarded headers of one key's call, fitted to its tenant. `secret` keeps the namespaces from naming the
    tenants to the provider (a keyed hash of the customer, stable across restarts and workers, so a retry after
    either is still recognised)."""

    __slots__ = ("_secret", "_ns")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret or b"tagway"
        self._ns: dict[str, bytes] = {}

    def namespace(self, customer: str) -> bytes:
        ns = self._ns.get(customer)
        if ns is None:
            ns = b"tw" + hmac.new(self._secret, b"idempotency\0" + customer.encode(), hashlib.sha256) \
                .hexdigest()[:20].encode() + b"-"
            if len(self._ns) < 100_000:
                self._ns[customer] = ns
        return ns

    def fit(self, headers: list[tuple[bytes, bytes]], customer: str, tenant_key: bool) -> list[tuple[bytes, bytes]]:
        """`headers` (picked, names lower-case) as they go upstream for a key of `customer` ("" the admin key);
        `tenant_key`: a key that may reach only its own tenant's resources."""
        out = []
        for k, v in headers:
            if k == IDEMPOTENCY_KEY:
                v = self.namespace(customer) + v
            elif tenant_key and k in ACCOUNT_HEADERS:
                continue
            out.append((k, v))
        return out
