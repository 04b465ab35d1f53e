"""What the read-only HTTP APIs (stats, calls, cases, replays, charts) share: query-parameter parsing with one-line
errors, who is asking (admin, or a tenant forced to its own customer), OpenAI-shaped error responses and the
mapping of query-layer errors to statuses.

Handlers are sync functions, so FastAPI runs them on its thread pool and the event loop never waits on ClickHouse.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from fastapi import Request
from fastapi.responses import Response

from exporters import queries as q
from exporters.calls import QueryTooHeavyError
from exporters.store import StoreError
from exporters.vocabulary import parse_duration

from .auth import KeyRing, Principal
from .errors import GatewayError, bad_request, forbidden

__all__ = ["QueryParams", "Reader", "json_response", "error_response", "run_handler", "reader", "read_body",
           "COMMON_PARAMS"]

log = logging.getLogger("tagway.stats")

COMMON_PARAMS = frozenset({"where", "customer", "status", "since", "from", "to"})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_HEADERS = {"Cache-Control": "no-store"}


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=_HEADERS)


def error_response(e: GatewayError) -> Response:
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=_HEADERS)


def _unavailable(message: str, code: str) -> GatewayError:
    return GatewayError(503, message, type_="server_error", code=code)


def run_handler(fn: Callable[[], Any]) -> Response:
    """Run a handler body; every expected failure becomes an OpenAI-shaped error with the right status."""
    try:
        return json_response(fn())
    except GatewayError as e:
        return error_response(e)
    except q.QueryInputError as e:
        return error_response(bad_request(e.message, code="invalid_query", param=e.param))
    except QueryTooHeavyError as e:
        return error_response(GatewayError(504, str(e), type_="server_error", code="query_timeout"))
    except StoreError as e:
        log.warning("stats query failed: %s", e)
        return error_response(_unavailable("The stats query failed; see the gateway log.", "query_failed"))


class QueryParams:
    """The query string of one request, checked against the names a route accepts."""

    def __init__(self, request: Request, allowed: frozenset[str] | set[str]) -> None:
        self.qp = request.query_params
        for name in self.qp.keys():
            if name not in allowed:
                raise q.QueryInputError(f"unknown query parameter {name[:40]!r}: use one of "
                                        f"{', '.join(sorted(allowed)) or 'none'}", param=name[:40])

    def one(self, name: str) -> str | None:
        values = self.qp.getlist(name)
        if len(values) > 1:
            raise q.QueryInputError(f"query parameter {name!r} is given more than once", param=name)
        return values[0] if values else None

    def many(self, name: str) -> list[str]:
        return self.qp.getlist(name)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self.one(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise q.QueryInputError(f"{name} must be a whole number", param=name) from None
        if not low <= value <= high:
            raise q.QueryInputError(f"{name} must be between {low} and {high}", param=name)
        return value

    def seconds(self, name: str, high: int) -> int | None:
        """A whole number of seconds, or a duration as the windows take ('90s', '5m', '1h'); None when absent or 0."""
        raw = self.one(name)
        if raw is None or raw == "":
            return None
        if raw.isascii() and raw.isdigit():  # '²' is a digit to str.isdigit, not to int()
            value = int(raw)
            if value == 0:  # the default: a step chosen for the window
                return None
        else:
            try:
                value = parse_duration(raw, name).total_seconds()
            except q.QueryInputError:
                raise q.QueryInputError(f"{name} must be seconds (300) or a duration (5m, 1h)", param=name) from None
            if value != int(value):
                raise q.QueryInputError(f"{name} must be a whole number of seconds", param=name)
            value = int(value)
        if not 1 <= value <= high:
            raise q.QueryInputError(f"{name} must be between 1 s and {high} s", param=name)
        return value

    def boolean(self, name: str) -> bool:
        raw = (self.one(name) or "").lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise q.QueryInputError(f"{name} must be true or false", param=name)

    def selection(self, who: "Reader | None" = None) -> q.Selection:
        """The request's window and filters, limited to what `who` may read: a tenant key its customer's calls, a
        platform key (may_set_customer) the calls it made, for whichever customers it named."""
        customers = self.many("customer")
        if len(customers) > 1:  # filters are ANDed: two customers would select no call at all, without a word
            raise q.QueryInputError("query parameter 'customer' is given more than once: filters are ANDed, so ask "
                                    "one customer at a time (or group by customer)", param="customer")
        where = self.many("where") + [f"customer={c}" for c in customers]
        sel = q.make_selection(where, self.one("status"), self.one("since"), self.one("from"), self.one("to"))
        if who is not None and who.key_id is not None:
            return sel.with_filter(q.Filter("key_id", who.key_id))
        force_customer = who.customer if who is not None else None
        if force_customer is not None:
            for f in sel.filters:
                if f.key == "customer" and f.op == "=" and f.value != force_customer:
                    raise forbidden("This key can only read its own customer's calls.", code="customer_not_allowed",
                                    param="where")
            sel = sel.with_filter(q.Filter("customer", force_customer))
        return sel


class Reader:
    """Who is asking: `customer` is None for the admin key (everything), else the tenant key's customer, which
    every query is limited to server-side. A platform key (may_set_customer) records its calls under the customers
    it names, so its reads of calls are limited by `key_id` instead (the calls it made); what is not a call
    (replay and evaluation runs, tags) stays limited to its own customer."""

    def __init__(self, principal: Principal, customer: str | None, key_id: str | None = None) -> None:
        self.principal = principal
        self.customer = customer
        self.key_id = key_id

    @property
    def is_admin(self) -> bool:
        return self.customer is None

    def may_read(self, call: dict) -> bool:
        """Whether a call (a row of llm_calls, as read for the admin) is this reader's to see."""
        if self.key_id is not None:
            return call.get("key_id") == self.key_id
        return self.customer is None or call.get("customer") == self.customer


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 as soon as it is past `limit` bytes (by its Content-Length, or while it
    arrives): `request.body()` and FastAPI's body parameters hold the whole of it in memory first, whatever its size.
    Authenticate before calling this, so that no body is read for a caller without a key."""
    length = request.headers.get("content-length", "")
    if not (length.isdigit() and int(length) > limit):
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        else:
            return b"".join(chunks)
    raise GatewayError(413, f"The body is too large (at most {limit} bytes).", code="body_too_large")


def reader(keyring: KeyRing, request: Request, *, admin_route: bool) -> Reader:
    """Authenticate. Admin routes need the admin key (403 otherwise); tenant routes take any key and limit a tenant
    key to its customer (the admin key on a tenant route still reads everything)."""
    p = keyring.authenticate_headers(request.headers)
    if admin_route and not p.is_admin:
        raise forbidden("This route needs the admin key.", code="admin_key_required")
    if p.is_admin:
        return Reader(p, None)
    return Reader(p, p.customer, key_id=p.key_id if p.may_set_customer else None)
