"""Which headers cross the gateway: the client's OpenAI/Anthropic headers that go upstream (`OpenAI-Beta`,
`Idempotency-Key`, ...), and the upstream's headers that go back to the client (`x-request-id`, `x-ratelimit-*`,
`retry-after`, `x-should-retry`, ...). Allow-lists from `api:` in the config; names compare lower-case, a trailing
`*` matches a family. Credentials, framing headers and tagway's own `x-tagway-*` never cross, whatever the list says.
Pure; runs on the hot path, so a miss costs a set lookup and one `startswith`.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["HeaderFilter"]

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
