"""The upstream seam: one `send(call)` per provider, returning a whole body or a stream of SSE events.

Errors before the first byte reaches the client are `UpstreamFailure`s; the proxy decides whether to fall back.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol

from ..errors import UPSTREAM_AUTH_STATUS

if TYPE_CHECKING:  # config imports the provider registry: no import back at run time
    from ..config import ModelConfig

__all__ = ["UpstreamCall", "UpstreamResponse", "UpstreamStream", "UpstreamFailure", "Provider", "RETRYABLE_STATUS"]

# 408/409 are retried by the OpenAI SDK too; 429 and 5xx are the classic fallback triggers.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529})


@dataclasses.dataclass(slots=True)
class UpstreamCall:
    deployment: ModelConfig
    operation: str  # chat | text_completion | embeddings
    path: str  # /chat/completions | /completions | /embeddings
    body: bytes  # the JSON to send, already rewritten for this deployment
    payload: dict[str, Any]  # the same, parsed (providers that translate need it; pass-through ones do not)
    stream: bool
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)  # the client's, allow-listed


@dataclasses.dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # the upstream's raw response headers (the proxy picks some)
    parsed: Any = None  # the body as JSON, once the proxy has checked that it is


class UpstreamStream(Protocol):
    """Raw SSE events (each ending in a blank line), in upstream order. May have `headers` (the upstream's raw
    response headers)."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class UpstreamFailure(Exception):
    """The attempt failed. `status`/`body` are the upstream's answer, if there was one (relayed to the client when
    no fallback is left); `error_type` goes to the span's `error.type`."""

    def __init__(self, error_type: str, message: str, *, status: int | None = None, body: bytes | None = None,
                 retryable: bool = True, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status
        self.body = body
        self.retryable = retryable
        self.headers = headers  # the upstream's raw response headers (retry-after, x-request-id, ...)

    @classmethod
    def from_status(cls, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> "UpstreamFailure":
        return cls(f"http_{status}", f"upstream answered HTTP {status}", status=status, body=body,
                   # a refused provider key or account: another deployment (key, provider) may still serve it
                   retryable=status in RETRYABLE_STATUS or status in UPSTREAM_AUTH_STATUS, headers=headers)


class Provider(Protocol):
    async def send(self, call: UpstreamCall) -> UpstreamResponse | UpstreamStream: ...

    async def aclose(self) -> None: ...
