"""The stats HTTP API and the dashboard page, over the same query layer as `tagway stats` (exporters.queries).

    GET /admin/stats          admin key; any customer          (?by=&where=k=v&status=&since=|from=&to=&compare=&min_calls=)
    GET /v1/tagway/stats      a tenant key; forced to its own customer (asking for another one is a 403)
    GET /admin/errors         top error types with example trace ids
    GET /admin/calls/{id}     one call, every column
    GET /admin/timeseries     error rate over time per tenant (or ?by=another column)
    GET /ui                   the dashboard page (static; every data call it makes needs the admin key)

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 invalid input, 401 no or bad
key, 403 not allowed, 404 unknown call, 503 store unavailable. Handlers are sync functions, so FastAPI runs the
queries on its thread pool and the event loop never waits on ClickHouse.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from exporters import queries as q
from exporters.store import StoreError

from .auth import KeyRing, Principal
from .errors import GatewayError, bad_request, forbidden

__all__ = ["build_stats_router"]

log = logging.getLogger("tagway.stats")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ASSETS = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere: no CDN, no inline script.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_COMMON = {"where", "customer", "status", "since", "from", "to"}
ALLOWED_PARAMS = {
    "stats": _COMMON | {"by", "compare", "min_calls", "limit"},
    "errors": _COMMON | {"limit", "examples"},
    "timeseries": _COMMON | {"by", "step", "series", "min_calls"},
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(e: GatewayError) -> Response:
    return Response(e.body(), status_code=e.status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _unavailable(message: str, code: str) -> GatewayError:
    return GatewayError(503, message, type_="server_error", code=code)


def _input_error(e: q.QueryInputError) -> GatewayError:
    return bad_request(e.message, code="invalid_query", param=e.param)


# -- query parameters ------------------------------------------------------------------------------------------
class _Params:
    def __init__(self, request: Request, route: str) -> None:
        self.qp = request.query_params
        allowed = ALLOWED_PARAMS[route]
        for name in self.qp.keys():
            if name not in allowed:
                raise q.QueryInputError(f"unknown query parameter {name[:40]!r}: use one of "
                                        f"{', '.join(sorted(allowed))}", param=name[:40])

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

    def boolean(self, name: str) -> bool:
        raw = (self.one(name) or "").lower()
        if raw in _TRUE:
            return True
        if raw in _FALSE:
            return False
        raise q.QueryInputError(f"{name} must be true or false", param=name)

    def selection(self, force_customer: str | None = None) -> q.Selection:
        where = self.many("where") + [f"customer={c}" for c in self.many("customer")]
        sel = q.make_selection(where, self.one("status"), self.one("since"), self.one("from"), self.one("to"))
        if force_customer is not None:
            for f in sel.filters:
                if f.key == "customer" and f.op == "=" and f.value != force_customer:
                    raise forbidden("This key can only read its own customer's calls.", code="customer_not_allowed",
                                    param="where")
            sel = sel.with_filter(q.Filter("customer", force_customer))
        return sel


# -- the router ------------------------------------------------------------------------------------------------
def build_stats_router(keyring: KeyRing, get_store: Callable[[], Any], *,
                       database: str | None = None) -> APIRouter:
    """Routes for the stats API and the dashboard page. `get_store()` returns the exporters.store.Store (or None
    while it is unavailable: 503). `database` defaults to the gateway config's storage.database."""
    router = APIRouter()
    db = database if database is not None else (getattr(getattr(keyring.config, "storage", None), "database", "")
                                                or "")

    def principal(request: Request, *, admin: bool) -> Principal:
        p = keyring.authenticate_headers(request.headers)
        if admin and not p.is_admin:
            raise forbidden("This route needs the admin key.", code="admin_key_required")
        return p

    def store() -> Any:
        s = get_store()
        if s is None:
            raise _unavailable("The call store is not available (recording is off or still starting).",
                               "store_unavailable")
        return s

    def handle(fn: Callable[[], Any]) -> Response:
        try:
            return _json(fn())
        except GatewayError as e:
            return _error(e)
        except q.QueryInputError as e:
            return _error(_input_error(e))
        except StoreError as e:
            log.warning("stats query failed: %s", e)
            return _error(_unavailable("The stats query failed; see the gateway log.", "query_failed"))

    def stats(request: Request, force_customer: bool) -> Any:
        p = principal(request, admin=not force_customer)
        params = _Params(request, "stats")
        forced = p.customer if force_customer and not p.is_admin else None
        sel = params.selection(forced)
        by = q.parse_by(params.many("by"))
        report = q.segment_stats(store(), sel, by, compare=params.boolean("compare"),
                                 min_calls=params.integer("min_calls", 20, 0, 10**9),
                                 limit=params.integer("limit", 500, 1, 10_000), database=db)
        return report.to_dict()

    @router.get("/admin/stats", tags=["stats"])
    def admin_stats(request: Request) -> Response:
        """Error rate per segment, worst first, for any customer (admin key)."""
        return handle(lambda: stats(request, force_customer=False))

    @router.get("/v1/tagway/stats", tags=["stats"])
    def tenant_stats(request: Request) -> Response:
        """The same report for a tenant key, limited to that key's customer."""
        return handle(lambda: stats(request, force_customer=True))

    @router.get("/admin/errors", tags=["stats"])
    def admin_errors(request: Request) -> Response:
        """Top error types with example trace ids."""
        def run() -> Any:
            principal(request, admin=True)
            params = _Params(request, "errors")
            sel = params.selection()
            return q.top_errors(store(), sel, limit=params.integer("limit", 10, 1, 1000),
                                examples=params.integer("examples", 3, 1, 20), database=db).to_dict()
        return handle(run)

    @router.get("/admin/calls/{trace_id}", tags=["stats"])
    def admin_call(trace_id: str, request: Request) -> Response:
        """One call by trace id: every column of llm_calls."""
        def run() -> Any:
            principal(request, admin=True)
            if request.query_params:
                raise q.QueryInputError("this route takes no query parameters")
            call = q.get_call(store(), trace_id, database=db)
            if call is None:
                raise GatewayError(404, "No call with this trace id.", code="call_not_found", param="trace_id")
            return call
        return handle(run)

    @router.get("/admin/timeseries", tags=["stats"])
    def admin_timeseries(request: Request) -> Response:
        """Error rate over time, one series per tenant (or per value of ?by=)."""
        def run() -> Any:
            principal(request, admin=True)
            params = _Params(request, "timeseries")
            sel = params.selection()
            step = params.integer("step", 0, 0, 30 * 86400) or None
            return q.error_timeseries(store(), sel, by=params.one("by") or "customer", step=step,
                                      series_limit=params.integer("series", 10, 1, 100),
                                      min_calls=params.integer("min_calls", 20, 0, 10**9), database=db).to_dict()
        return handle(run)

    # -- the page ------------------------------------------------------------------------------------------------
    def static(name: str, media_type: str) -> Response:
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            body = f.read()
        return Response(body, media_type=media_type,
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @router.get("/ui", include_in_schema=False)
    def ui_page() -> Response:
        return static("ui.html", "text/html; charset=utf-8")

    @router.get("/ui/", include_in_schema=False)
    def ui_slash() -> Response:
        return RedirectResponse("../ui", status_code=308)

    @router.get("/ui/{name}", include_in_schema=False)
    def ui_asset(name: str) -> Response:
        if name not in ASSETS:
            return _error(GatewayError(404, "Not found.", code="not_found"))
        return static(name, ASSETS[name])

    return router
