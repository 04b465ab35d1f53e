"""The case board's API and pages: calls, one call, one case across replays, replay runs and trends, charts.

Every data route exists twice: under /admin (the admin key; every customer) and under /v1/tagway (any key; a
tenant key is limited to its own customer server-side, the admin key still reads everything):

    GET {prefix}/calls                ?where=&customer=&status=&since=|from=&to=&q=&dataset=&segment=&limit=&cursor=
                                      newest first; `next` is the keyset cursor of the following page (or null)
    GET {prefix}/calls/{trace_id}     one call: every column, the provider's error message, per-attempt timings,
                                      its session; ?max_chars=N cuts long captured content (`truncated` says how much)
    GET {prefix}/cases/{trace_id}     the case view: the call, every replay result for it across runs (outputs,
                                      evaluator verdicts and reasons, judge version, baseline/candidate diff), sections
    GET {prefix}/replays              ?spec=&dataset=&limit=   runs, newest first
    GET {prefix}/replays/trend        ?spec=NAME|dataset=ID    per-segment pass rate across the runs
    GET {prefix}/replays/{run_id}     a run: per-segment table, marks, flipped cases
    GET {prefix}/charts               ?by=&top=&step= + the selection: calls, error rate, p50/p95, cost over time
    GET /v1/tagway/whoami             which key this is (admin, or the tenant's customer): the pages ask it first

A trace or run of another customer answers 404 exactly like one that does not exist. The pages are served under
/ui (static shells; the data comes from the routes above with the key the page holds, see README "Dashboard").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from exporters import calls as c
from exporters import cases, charts, replays

from .auth import KeyRing
from .errors import GatewayError
from .http_query import COMMON_PARAMS, QueryParams, Reader, error_response, reader, run_handler

__all__ = ["build_board_router", "store_getter", "Limits", "PAGES"]

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ASSETS = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8",
          "common.js": "text/javascript; charset=utf-8", "board.js": "text/javascript; charset=utf-8"}
# page name -> may it take an id (/ui/<page>/<id>)
PAGES = {"calls": True, "cases": True, "replays": True, "charts": False, "trend": False, "coverage": False,
         "evals": True}
# The pages load nothing from elsewhere: no CDN, no inline script.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Query parameters that look like a key: a key in a URL ends up in access logs and browser history.
KEY_PARAMS = ("key", "api_key", "apikey", "token", "authorization")

PARAMS = {
    "calls": COMMON_PARAMS | {"q", "dataset", "segment", "limit", "cursor"},
    "call": frozenset({"max_chars"}),
    "runs": frozenset({"spec", "dataset", "limit"}),
    "run": frozenset(),
    "charts": COMMON_PARAMS | {"by", "top", "step"},
}


@dataclasses.dataclass(frozen=True)
class Limits:
    query: c.Budget = c.Budget()
    search: c.Budget = c.Budget(20.0)

    @classmethod
    def from_config(cls, config: Any) -> "Limits":
        d = getattr(config, "dashboard", None)
        if d is None:
            return cls()
        return cls(c.Budget(d.query_seconds), c.Budget(d.search_seconds, d.search_max_rows))


def store_getter(get_store: Callable[[], Any]) -> Callable[[], Any]:
    def store() -> Any:
        s = get_store()
        if s is None:
            raise GatewayError(503, "The call store is not available (recording is off or still starting).",
                               type_="server_error", code="store_unavailable")
        return s
    return store


def _store_location(config: Any) -> dict[str, str]:
    """The gateway's store as the admin may learn it: an embedded store's directory (on the gateway's host), or a
    server's DSN without its password."""
    from exporters.store import chdb_path, is_embedded, redact_dsn  # noqa: PLC0415

    dsn = config.storage.resolved_dsn()
    if is_embedded(dsn):
        return {"embedded": os.path.abspath(chdb_path(dsn))}
    # without its query string either: clickhouse-connect reads a password or token there too
    return {"server": redact_dsn(dsn).split("?", 1)[0], "database": config.storage.database or ""}


def _not_found(what: str, code: str, param: str) -> GatewayError:
    return GatewayError(404, what, code=code, param=param)


def build_board_router(keyring: KeyRing, store: Callable[[], Any], *, database: str = "",
                       limits: Limits | None = None) -> APIRouter:
    router = APIRouter()
    db = database
    lim = limits or Limits.from_config(keyring.config)

    def add(path: str, name: str, body: Callable[[Request, Reader, dict], Any], doc: str) -> None:
        """Register `path` under /admin (admin key) and /v1/tagway (a tenant key, limited to its customer)."""
        def make(admin_route: bool) -> Callable[[Request], Response]:
            def endpoint(request: Request) -> Response:
                return run_handler(lambda: body(request, reader(keyring, request, admin_route=admin_route),
                                                request.path_params))
            endpoint.__doc__ = doc
            return endpoint

        for prefix, admin_route in (("/admin", True), ("/v1/tagway", False)):
            router.add_api_route(prefix + path, make(admin_route), methods=["GET"], tags=["board"],
                                 name=f"{name}_{'admin' if admin_route else 'tenant'}")

    def calls_list(request: Request, who: Reader, _: dict) -> Any:
        params = QueryParams(request, PARAMS["calls"])
        sel = params.selection(who)
        raw_cursor = params.one("cursor")
        search = params.one("q")
        page = c.list_calls(store(), sel, search=search, dataset=params.one("dataset") or None,
                            segment=params.one("segment"), limit=params.integer("limit", c.PAGE_DEFAULT, 1, c.PAGE_MAX),
                            cursor=c.Cursor.parse(raw_cursor) if raw_cursor else None, database=db,
                            budget=lim.search if (search or "").strip() else lim.query)
        return page.to_dict()

    def max_chars(params: QueryParams) -> int | None:
        raw = params.one("max_chars")
        return None if raw in (None, "") else params.integer("max_chars", 0, 100, 100_000_000)

    def call_one(request: Request, who: Reader, path: dict) -> Any:
        params = QueryParams(request, PARAMS["call"])
        call = c.call_detail(store(), path["trace_id"], customer=None if who.key_id else who.customer,
                             max_chars=max_chars(params), database=db, budget=lim.query)
        if call is None or not who.may_read(call):
            raise _not_found("No call with this trace id.", "call_not_found", "trace_id")
        return call

    def case_one(request: Request, who: Reader, path: dict) -> Any:
        params = QueryParams(request, PARAMS["call"])
        customer = who.customer
        if who.key_id is not None:  # a platform key: the call it made, seen as its customer's key would see it
            call = c.call_detail(store(), path["trace_id"], customer=None, max_chars=100, database=db,
                                 budget=lim.query)
            if call is None or not who.may_read(call):
                raise _not_found("No call with this trace id.", "call_not_found", "trace_id")
            customer = call["customer"]
        view = cases.case_view(store(), path["trace_id"], customer=customer, max_chars=max_chars(params),
                               database=db)
        if view is None:
            raise _not_found("No call with this trace id.", "call_not_found", "trace_id")
        return view

    def runs_list(request: Request, who: Reader, _: dict) -> Any:
        params = QueryParams(request, PARAMS["runs"])
        # a dataset's name without @version takes every version's runs, as the CLI does
        runs = replays.list_runs(store(), spec=params.one("spec") or None, dataset=params.one("dataset") or None,
                                 customer=who.customer, limit=params.integer("limit", 50, 1, 1000), database=db,
                                 versions=True)
        return {"runs": runs, "limited_to_customer": who.customer}

    def runs_trend(request: Request, who: Reader, _: dict) -> Any:
        params = QueryParams(request, PARAMS["runs"])
        return replays.trend(store(), spec=params.one("spec") or None, dataset=params.one("dataset") or None,
                             customer=who.customer, limit=params.integer("limit", 30, 1, 200), database=db,
                             versions=True)

    def run_one(request: Request, who: Reader, path: dict) -> Any:
        QueryParams(request, PARAMS["run"])
        run = replays.run_detail(store(), path["run_id"], customer=who.customer, database=db)
        if run is None:
            raise _not_found("No replay run with this id.", "run_not_found", "run_id")
        run["limited_to_customer"] = who.customer
        return run

    def chart(request: Request, who: Reader, _: dict) -> Any:
        params = QueryParams(request, PARAMS["charts"])
        sel = params.selection(who)
        return charts.metrics_timeseries(store(), sel, by=params.one("by") or "customer",
                                         step=params.integer("step", 0, 0, 30 * 86400) or None,
                                         top=params.integer("top", 5, 1, charts.TOP_MAX), database=db,
                                         budget=lim.query)

    add("/calls", "calls", calls_list, "Calls, newest first, with a keyset cursor.")
    add("/calls/{trace_id}", "call", call_one, "One call with its attempts, error message and session.")
    add("/cases/{trace_id}", "case", case_one, "One case: the call and its replay results across runs.")
    add("/replays", "replays", runs_list, "Replay runs, newest first.")
    add("/replays/trend", "trend", runs_trend, "Per-segment pass rate across the runs of one spec or dataset.")
    add("/replays/{run_id}", "run", run_one, "A replay run: per-segment table, marks and flipped cases.")
    add("/charts", "charts", chart, "Calls, error rate, p50/p95 latency and cost over time, top N + other.")

    @router.get("/v1/tagway/whoami", tags=["board"])
    def whoami(request: Request) -> Response:
        """Which key this is: the admin key, or a tenant key and its customer; and whether it may mark calls as
        replay (what a replay run checks before it stores anything)."""
        def run() -> Any:
            who = reader(keyring, request, admin_route=False)
            out = {"admin": who.is_admin, "customer": who.customer, "key_id": who.principal.key_id,
                   "may_mark_replay": who.principal.may_set_customer}
            if who.is_admin:  # where the calls are recorded: a replay CLI given only --gateway stores its run there
                out["store"] = _store_location(keyring.config)
            return out
        return run_handler(run)

    # -- the pages ---------------------------------------------------------------------------------------------
    def static(name: str, media_type: str, replace: dict[str, str] | None = None, status: int = 200) -> Response:
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            body = f.read()
        for k, v in (replace or {}).items():
            body = body.replace(k.encode(), v.encode())
        return Response(body, status_code=status, media_type=media_type,
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    def key_in_url(request: Request) -> Response | None:
        if any(k in request.query_params for k in KEY_PARAMS):
            return static("key_in_url.html", "text/html; charset=utf-8", status=400)
        return None

    def shell(request: Request, page: str, root: str) -> Response:
        return key_in_url(request) or static("board.html", "text/html; charset=utf-8",
                                             {"{{root}}": root, "{{page}}": page})

    @router.get("/ui", include_in_schema=False)
    def ui_page(request: Request) -> Response:
        return key_in_url(request) or static("ui.html", "text/html; charset=utf-8")

    @router.get("/ui/", include_in_schema=False)
    def ui_slash() -> Response:
        return Response(status_code=308, headers={"Location": "../ui"})

    @router.get("/ui/{name}", include_in_schema=False)
    def ui_asset(name: str, request: Request) -> Response:
        if name in ASSETS:
            return static(name, ASSETS[name])
        if name in PAGES:
            return shell(request, name, "")
        return error_response(GatewayError(404, "Not found.", code="not_found"))

    @router.get("/ui/{name}/{ident}", include_in_schema=False)
    def ui_item(name: str, ident: str, request: Request) -> Response:
        if PAGES.get(name):
            return shell(request, name, "../")
        return error_response(GatewayError(404, "Not found.", code="not_found"))

    return router
