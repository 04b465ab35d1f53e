"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the status the SDKs expect."""
from __future__ import annotations

from typing import Sequence

import orjson

__all__ = ["GatewayError", "error_body", "shutting_down", "upstream_auth_error", "upstream_message",
           "UPSTREAM_AUTH_STATUS"]


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


def shutting_down() -> GatewayError:
    """A call still running when `server.graceful_shutdown_seconds` has passed: a 503 the SDKs retry, or, once a
    stream has started, the same error as its last event."""
    return GatewayError(503, "The gateway is shutting down (server.graceful_shutdown_seconds passed); retry the "
                        "request.", type_="server_error", code="gateway_shutting_down", error_type="cancelled")


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def unauthorized(message: str, code: str = "invalid_api_key") -> GatewayError:
    return GatewayError(401, message, type_="invalid_request_error", code=code)


def forbidden(message: str, code: str = "permission_denied", param: str | None = None) -> GatewayError:
    return GatewayError(403, message, type_="permission_error", code=code, param=param)


# the provider refused the gateway's own key or account: relayed as a 401/403, the client's SDK would blame the
# client's (valid) tagway key
UPSTREAM_AUTH_STATUS = frozenset({401, 403})


# The SDKs send these from the app's environment (OPENAI_ORG_ID, OPENAI_PROJECT_ID); forwarded with the gateway's key
# (api.forward_headers), a provider refuses a key outside them, and the operator would look for the fault in the key.
ACCOUNT_HEADERS = (b"openai-organization", b"openai-project")


def upstream_auth_error(status: int, body: bytes | None, error_type: str,
                        forwarded: Sequence[tuple[bytes, bytes]] = ()) -> GatewayError:
    """A 502 naming the provider's refusal (its scrubbed `body`'s message), not retried by the SDKs: it fails the
    same way until the operator fixes the provider key or account, or the client stops sending the organization or
    project headers that went upstream with the gateway's key (`forwarded`: the client's headers sent)."""
    said = (upstream_message(body) or body[:200].decode("utf-8", "replace").strip()) if body else ""
    message = (f"The provider refused the gateway's credentials for this model (HTTP {status}"
               f"{': ' + said if said else ''}). ")
    account = [(k.decode("latin-1"), v.decode("latin-1", "replace")) for k, v in forwarded
               if k.lower() in ACCOUNT_HEADERS]
    if account:
        sent = ", ".join(f"{k}: {v[:80]}" for k, v in account)
        message += (f"Your request's {sent} went with the gateway's provider key; if the key is not in that "
                    "organization or project, drop the header (the OpenAI SDKs send it from OPENAI_ORG_ID / "
                    "OPENAI_PROJECT_ID), or remove it from the gateway's api.forward_headers. Otherwise the "
                    "gateway's provider key or account needs fixing.")
    else:
        message += "Your key is fine: the gateway's provider key or account needs fixing."
    return GatewayError(502, message, type_="api_error", code="upstream_auth_error", error_type=error_type,
                        headers=[(b"x-should-retry", b"false")])


def with_own_headers(e: GatewayError, relayed: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An error's own headers after the upstream's relayed ones, the upstream's of the same name left out (two
    x-should-retry headers read as 'true, false', which the SDKs take for neither). An upstream_auth_error keeps
    none of the provider's retry advice: nothing changes until the operator fixes the key."""
    own = {k.lower() for k, _ in e.headers}
    drop_retry = e.code == "upstream_auth_error"
    kept = [(k, v) for k, v in relayed
            if k.lower() not in own and not (drop_retry and k.lower().startswith(b"retry-after"))]
    return [*kept, *e.headers]


def upstream_message(body: bytes) -> str:
    """The provider's own error message from an OpenAI-shaped body (`{"error": {"message": ...}}`, or a bare
    `{"error": "..."}`), at most 500 characters; "" when the body has none."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    err = obj.get("error") if isinstance(obj, dict) else None
    msg = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else None)
    return str(msg)[:500] if msg else ""
