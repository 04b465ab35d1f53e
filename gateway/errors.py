"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the status the SDKs expect."""
from __future__ import annotations

import orjson

__all__ = ["GatewayError", "error_body"]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class GatewayError(Exception):
    """An error the client should see. `error_type` is what the span records as `error.type`."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, error_type: str | None = None, raw: bytes | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.raw = raw  # an upstream's own error body, relayed as it was (after scrubbing)
        # extra response headers: tagway's own (retry-after on a 429) or an upstream's (retry-after, x-request-id)
        self.headers: list[tuple[bytes, bytes]] = list(headers or [])
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.error_type = error_type or code or type_

    def body(self) -> bytes:
        return self.raw if self.raw is not None else error_body(self.message, self.type, self.code, self.param)


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def unauthorized(message: str, code: str = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, type_="invalid_request_error", code=code)


def forbidden(message: str, code: str = "permission_denied", param: str | None = None) -> GatewayError:
    return GatewayError(403, message, type_="permission_error", code=code, param=param)
