"""The stats HTTP API and the dashboard page, over the same query layer as `tagway stats` (exporters.queries).

    GET /admin/stats          admin key; any customer          (?by=&where=k=v&status=&since=|from=&to=&compare=&min_calls=)
    GET /v1/tagway/stats      a tenant key; forced to its own customer (asking for another one is a 403)
    GET /admin/errors         top error types with example trace ids
    GET /admin/timeseries     error rate over time per tenant (or ?by=another column)
    GET /v1/tagway/errors, /v1/tagway/timeseries: the same for a tenant key, limited to its customer
The calls, cases, replays and charts routes and the dashboard pages are in gateway/board_api.py.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 invalid input, 401 no or bad
key, 403 not allowed, 404 unknown call, 503 store unavailable. Handlers are sync functions, so FastAPI runs the
queries on its thread pool and the event loop never waits on ClickHouse.
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from exporters import queries as q

from .auth import KeyRing
from .http_query import COMMON_PARAMS, QueryParams, reader, run_handler

__all__ = ["build_stats_router"]

ALLOWED_PARAMS = {
    "stats": COMMON_PARAMS | {"by", "compare", "min_calls", "limit"},
    "errors": COMMON_PARAMS | {"limit", "examples"},
    "timeseries": COMMON_PARAMS | {"by", "step", "series", "min_calls"},
}


# -- the router ------------------------------------------------------------------------------------------------
def build_stats_router(keyring: KeyRing, get_store: Callable[[], Any], *,
                       database: str | None = None, limits: Any = None) -> APIRouter:
    """Routes for the stats API, and (gateway.board_api) the calls, cases, replays and charts API and the
    dashboard pages. `get_store()` returns the exporters.store.Store (or None while it is unavailable: 503).
    `database` defaults to the gateway config's storage.database; `limits` to its `dashboard` settings."""
    from .board_api import build_board_router, store_getter  # noqa: PLC0415

    router = APIRouter()
    db = database if database is not None else (getattr(getattr(keyring.config, "storage", None), "database", "")
                                                or "")
    store = store_getter(get_store)

    def stats(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        params = QueryParams(request, ALLOWED_PARAMS["stats"])
        sel = params.selection(who)
        by = q.parse_by(params.many("by"))
        report = q.segment_stats(store(), sel, by, compare=params.boolean("compare"),
                                 min_calls=params.integer("min_calls", 20, 0, 10**9),
                                 limit=params.integer("limit", 500, 1, 10_000), database=db)
        return report.to_dict()

    def errors(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        params = QueryParams(request, ALLOWED_PARAMS["errors"])
        sel = params.selection(who)
        return q.top_errors(store(), sel, limit=params.integer("limit", 10, 1, 1000),
                            examples=params.integer("examples", 3, 1, 20), database=db).to_dict()

    def timeseries(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        params = QueryParams(request, ALLOWED_PARAMS["timeseries"])
        sel = params.selection(who)
        step = params.seconds("step", 30 * 86400)
        return q.error_timeseries(store(), sel, by=params.one("by") or "customer", step=step,
                                  series_limit=params.integer("series", 10, 1, 100),
                                  min_calls=params.integer("min_calls", 20, 0, 10**9), database=db).to_dict()

    @router.get("/admin/stats", tags=["stats"])
    def admin_stats(request: Request) -> Response:
        """Error rate per segment, worst first, for any customer (admin key)."""
        return run_handler(lambda: stats(request, admin_route=True))

    @router.get("/v1/tagway/stats", tags=["stats"])
    def tenant_stats(request: Request) -> Response:
        """The same report for a tenant key, limited to that key's customer."""
        return run_handler(lambda: stats(request, admin_route=False))

    @router.get("/admin/errors", tags=["stats"])
    def admin_errors(request: Request) -> Response:
        """Top error types with example trace ids."""
        return run_handler(lambda: errors(request, admin_route=True))

    @router.get("/v1/tagway/errors", tags=["stats"])
    def tenant_errors(request: Request) -> Response:
        """Top error types of the tenant key's own customer."""
        return run_handler(lambda: errors(request, admin_route=False))

    @router.get("/admin/timeseries", tags=["stats"])
    def admin_timeseries(request: Request) -> Response:
        """Error rate over time, one series per tenant (or per value of ?by=)."""
        return run_handler(lambda: timeseries(request, admin_route=True))

    @router.get("/v1/tagway/timeseries", tags=["stats"])
    def tenant_timeseries(request: Request) -> Response:
        """Error rate over time for the tenant key's own customer."""
        return run_handler(lambda: timeseries(request, admin_route=False))

    router.include_router(build_board_router(keyring, store, database=db, limits=limits))
    return router
