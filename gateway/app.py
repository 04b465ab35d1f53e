"""The gateway as one ASGI app: the `/v1/*` LLM routes go straight to the raw-ASGI proxy (the hot path), everything
else (models, health, metrics, admin, stats, UI) to FastAPI. Start-up and shutdown run on the ASGI lifespan, or
explicitly through `startup()`/`shutdown()` for hosts that do not send lifespan events (e.g. httpx.ASGITransport).
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from exporters.vocabulary import NON_PRODUCTION_SOURCES

from .auth import KeyRing
from .config import GatewayConfig, load_config
from .errors import GatewayError, error_body
from .pricing import Pricing, unpriced_warning
from .providers import ProviderRegistry
from .providers.litellm_provider import preload as preload_litellm
from .lanes import ReplayLane, is_replay_call
from .resources import ResourceOwners
from .limits import CallLimits, model_scope, split_scope
from .metrics import MetricsEndpoint
from .openapi import install_openapi
from .model_list import ModelList
from .model_routes import ModelRoutes
from .passthrough import Passthrough
from .routes_table import allowed_methods, match as match_route
from .proxy import HOT_ROUTES, Proxy
from .redact import Redactor
from .datasets_api import build_datasets_router
from .feedback_api import build_feedback_router
from .store_api import LocalAccess, build_store_router
from .tags_api import build_tags_router

__all__ = ["TagwayApp", "create_app"]

BUDGET_REFRESH = 30.0  # seconds between reads of recorded spend (calls are counted in-process meanwhile)
FLUSH_SECONDS = 4.0  # the most a local CLI command waits for the calls answered before it to be stored
CLOSE_WAIT_SECONDS = 10.0  # at shutdown, the most a store client's running statement is waited for

log = logging.getLogger("tagway")


class TagwayApp:
    def __init__(self, config: GatewayConfig, *, recorder: Any = None, owns_recorder: bool | None = None,
                 recorder_factory: Callable[[GatewayConfig], Any] | None = None,
                 providers: ProviderRegistry | None = None, workers: int = 1) -> None:
        self.config = config
        self.keyring = KeyRing(config)
        self.providers = providers or ProviderRegistry()
        self.routes = ModelRoutes(config)
        self.model_list = ModelList(config, self.routes, self.providers)
        self.pricing = Pricing()
        r = config.recording
        self.redactor = Redactor(list(r.redact_builtin), r.redact_patterns, max_chars=r.capture_max_chars,
                                 max_string_chars=r.capture_max_message_chars)
        self.recorder = recorder
        self._recorder_factory = recorder_factory or default_recorder
        # whoever owns the recorder flushes it at shutdown; by default the app owns what it creates
        self._owns_recorder = recorder is None if owns_recorder is None else owns_recorder
        self.proxy: Proxy | None = None
        self.passthrough: Passthrough | None = None
        self._start_lock: asyncio.Lock | None = None
        limit = config.server.replay_concurrency
        self.replay_lane = ReplayLane(limit) if limit else None
        self.local = LocalAccess()  # the discovery file and credential that let local CLIs use our store
        # rate limits and budgets; with --workers N each worker holds 1/N of every rate limit (gateway/limits.py)
        self.limits = CallLimits(share=1 / max(1, workers), read_spend=self._read_spend)
        self._worker_of_many = workers > 1
        self._budget_task: asyncio.Future | None = None
        self._query_store: Any = None
        self._local_store: Any = None
        db = config.storage.database
        self._calls_table = f"{db}.llm_calls" if db else "llm_calls"
        self.api = _build_api(self)
        self._cors = _cors(config.server.cors_allow_origins, self)

    # -- lifetime -----------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        if self.proxy is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.proxy is not None:
                return
            loop = asyncio.get_running_loop()
            if self.recorder is None:
                # connecting, migrating and replaying a spool are blocking work: keep them off the event loop
                self.recorder = await loop.run_in_executor(None, self._recorder_factory, self.config)
            await loop.run_in_executor(None, self.pricing.load)
            if not self._worker_of_many:  # `serve --workers N` says it once, before they start
                for d in self.pricing.unpriced(self.config.models):
                    log.warning(unpriced_warning(d))
            if self.providers.translates(self.config.models):
                # importing litellm takes seconds: pay it now, off the loop, not on the first call
                await loop.run_in_executor(None, preload_litellm)
            self.keyring.start_watching()
            await self._start_limits(loop)
            # a recorder that stores spans may reach its store only later (a ClickHouse server starting up): the
            # lookups wait for it (503), never settle for this process's memory alone
            recorded = bool(getattr(self.recorder, "enabled", False))
            settle = self._settle_seconds(recorded)
            owners = ResourceOwners((lambda: self.query_store) if recorded else None, self.config.storage.database,
                                    settle=settle,
                                    granted={rid: t.customer for t in self.config.tenants for rid in t.resources},
                                    announce=self._write_owners if settle > 0 else None) \
                if self.config.api.tenant_resources == "isolated" else None
            self.proxy = Proxy(config=self.config, keyring=self.keyring, providers=self.providers,
                               tracer=self.recorder.tracer, pricing=self.pricing, redactor=self.redactor,
                               limits=self.limits, routes=self.routes,
                               recording=getattr(self.recorder, "enabled", True), owners=owners)
            self.passthrough = Passthrough(config=self.config, keyring=self.keyring, providers=self.providers,
                                           routes=self.routes, tracer=self.recorder.tracer, redactor=self.redactor,
                                           owners=owners, observe=self.proxy.observe,
                                           cut_at_shutdown=self.proxy.cut_at_shutdown)
            log.info("ready (pid %d): %d model(s), %d tenant(s), recording %s", os.getpid(), len(self.config.models),
                     len(self.config.tenants), "on" if recorded else "off")

    def _write_owners(self, rows: list[tuple[str, str, float]]) -> None:
        """Owners of what this process answered, written to the record ahead of their calls' batch (a ClickHouse
        server's other workers look them up: gateway/resources.py). Through the recorder's client, whose lock
        keeps it to one statement at a time; the server gathers these small inserts (async_insert, not waited
        for: they only make owners known sooner)."""
        store = self.store
        if store is None:
            raise RuntimeError("the store is not reached yet")
        db = self.config.storage.database
        body = b"".join(orjson.dumps({"rid": rid, "customer": customer, "created": round(t, 3)}) + b"\n"
                        for rid, customer, t in rows)
        store.insert_json_rows(f"{db}.resource_owners" if db else "resource_owners", body,
                               settings={"async_insert": 1, "wait_for_async_insert": 0})

    def _settle_seconds(self, recorded: bool) -> float:
        """How long a tenant key's id nobody owns is looked for again before it is refused: with a ClickHouse
        server, other workers or gateways may have made it a moment ago, and their call is stored within a batch
        window (recording.batch_max_seconds); the embedded store has one process, which knows its own at once."""
        from exporters.store import is_embedded  # noqa: PLC0415

        if not recorded or is_embedded(self.config.storage.resolved_dsn()):
            return 0.0
        return self.config.recording.batch_max_seconds + 1.0

    async def _start_limits(self, loop: asyncio.AbstractEventLoop) -> None:
        """Budgets read their spend from the store before the first call, then every BUDGET_REFRESH seconds, and at
        once when a budget first seen since the start (a key given one in the keys file) is checked: it would
        otherwise count from $0 for up to BUDGET_REFRESH."""
        budgets = self.limits.budgets
        scopes = [s for t in self.config.tenants for s in self.limits.all_scopes("", None, t)]
        scopes += [s for k, _t in self.keyring.keys() for s in self.limits.all_scopes(k.id, k.limits, None)]
        self.limits.register(scopes)
        if budgets._periods:
            await loop.run_in_executor(None, budgets.refresh)
        budgets.wake = asyncio.Event()

        async def refresh_forever() -> None:
            while True:
                try:
                    await asyncio.wait_for(budgets.wake.wait(), BUDGET_REFRESH)
                except asyncio.TimeoutError:
                    pass
                budgets.wake.clear()
                if budgets._periods:
                    await loop.run_in_executor(None, budgets.refresh)

        self._budget_task = asyncio.ensure_future(refresh_forever())

    def _read_spend(self, scope: str, who: str, since: float) -> tuple[float, int]:
        """Recorded spend of a tenant or key (or of its calls to one model: gateway/limits.split_scope) since a Unix
        time, and how many priced calls made it (blocking; on a worker thread): every call but the gateway's own
        replay, judge and shadow calls, which only privileged keys can mark. A tenant names its own calls' source
        freely (`x-tagway-source: batch`): counting `production` alone let it spend past its budget. A tenant's
        spend is its calls' and its keys' (a platform key's calls are recorded as the customers it names)."""
        store = self.query_store
        if store is None:
            raise RuntimeError("the store is not reachable")
        scope, who, model = split_scope((scope, who))
        params: dict[str, Any] = {"who": who, "since": int(since * 1e9), "gateway_own": list(NON_PRODUCTION_SOURCES),
                                  "model": model or ""}
        wheres = ["customer = {who:String}" if scope == "tenant" else "key_id = {who:String}"]
        if scope == "tenant" and any(t.customer == who and t.may_set_customer for t in self.config.tenants):
            # a platform tenant's keys record calls as other customers: those count too (a second scan, by key,
            # for these tenants only; the first reads the table's (customer, ...) key range)
            params["keys"] = sorted({k.id for k, t in self.keyring.keys() if t.customer == who})
            wheres.append("key_id IN {keys:Array(String)} AND customer != {who:String}")
        usd, priced = 0.0, 0
        for whose in wheres:
            rows = store.query(f"SELECT sum(cost_usd) AS usd, countIf(cost_usd > 0) AS priced FROM "
                               f"{self._calls_table} WHERE {whose} AND Timestamp >= "
                               "fromUnixTimestamp64Nano({since:Int64}) AND source NOT IN {gateway_own:Array(String)}"
                               + (" AND model_requested = {model:String}" if model is not None else ""),
                               parameters=params)
            if rows:
                usd, priced = usd + float(rows[0]["usd"] or 0.0), priced + int(rows[0]["priced"] or 0)
        return usd, priced

    def flush_recording(self) -> bool:
        """Insert the calls answered so far (blocking: a worker thread). The batch window (recording.batch_max_seconds)
        keeps inserts big and few; a local CLI command asks for this first, so it sees every call answered before it
        started. False when they could not all be stored within FLUSH_SECONDS (they are not lost: still queued)."""
        if self.recorder is None or not self.recorder.enabled:
            return True
        return self.recorder.force_flush(int(FLUSH_SECONDS * 1000))

    def announce(self, url: str) -> None:
        """Tell local CLIs (through the store directory) that this gateway serves its embedded store at `url`."""
        store = self.store
        if store is not None and getattr(store, "embedded", False):
            self.local.announce(store.dsn, url, spool=self.config.storage.resolved_spool())

    async def shutdown(self) -> None:
        if self._budget_task is not None:
            self._budget_task.cancel()
        if self.proxy is not None:
            if self.proxy.shadow is not None:  # before the providers close: shadow calls in flight record themselves
                await self.proxy.shadow.aclose()
            self.proxy.observe.flush()  # the access lines still queued
        self.local.close()
        if self._local_store is not None:  # local commands' statements still running end now, not in an hour
            await asyncio.get_running_loop().run_in_executor(None, self.kill_local, "")
        for pool in (self._local_store, self._query_store):
            if pool is not None:  # off the loop, and not for ever: a statement that ignores the kill is left to exit
                try:
                    await asyncio.wait_for(asyncio.to_thread(pool.close), CLOSE_WAIT_SECONDS)
                except asyncio.TimeoutError:
                    log.warning("a statement is still running on a store client; not waiting for it")
        self._query_store = self._local_store = None
        self.keyring.stop_watching()
        await self.providers.aclose()
        if self.recorder is not None and self._owns_recorder:
            await asyncio.get_running_loop().run_in_executor(None, self.recorder.shutdown)

    @property
    def store(self) -> Any:
        """The recorder's store (span inserts); None until it is reached, or when recording is off."""
        return getattr(self.recorder, "store", None)

    @property
    def query_store(self) -> Any:
        """Where reads go (exporters/query_pool.py): clients of their own, with limits; None until the store is
        reached."""
        if self._query_store is None and self.store is not None:
            try:
                self._query_store = self._pool("query", self.config.storage.query_max_seconds)
            except Exception as e:  # the store answers the recorder but not a new client: read through it
                log.warning("cannot open clients for reads (%s); reads share the recorder's client", e)
                return self.store
        return self._query_store

    def _pool(self, role: str, max_seconds: float | None) -> Any:
        """`storage.query_concurrency` clients of the recorder's store with the reads' limits (`max_seconds` None:
        no time limit)."""
        from exporters.query_pool import QueryPool, query_settings  # noqa: PLC0415

        s = self.config.storage
        return QueryPool(self.store.dsn, size=s.query_concurrency, role=role,
                         defaults=query_settings(max_seconds, s.query_max_memory_bytes, s.query_max_threads))

    def kill_local(self, mark: str) -> None:
        """Stop the local command's statement marked `mark` (gateway/store_api.marked), or every one for "": its
        command left, or the gateway stops. Through the reads' clients: the local ones may all be busy."""
        from .store_api import LOCAL_MARK  # noqa: PLC0415

        store = self.query_store
        if store is None:
            return
        try:
            store.command(f"KILL QUERY WHERE query LIKE '%{LOCAL_MARK}{mark}%' AND query NOT LIKE '%KILL QUERY%' ASYNC")
        except Exception as e:  # the statement ends on its own, later
            log.warning("could not stop a local command's statement: %s", e)

    @property
    def local_store(self) -> Any:
        """Where local commands' statements go (the CLI through gateway/store_api.py): clients of their own, niced,
        with the reads' thread and memory limits but no time limit, so a command runs as long as it would on the
        store opened directly (a backfill, a question over months); None until the store is reached."""
        if self._local_store is None and self.store is not None:
            try:
                self._local_store = self._pool("local", None)
            except Exception as e:
                log.warning("cannot open clients for local commands (%s); they share the reads' clients", e)
                return self.query_store
        return self._local_store

    # -- ASGI ---------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # CORS (when configured) wraps this very method; the mark in the scope says it has been through
        if self._cors is not None and scope["type"] == "http" and _CORS_MARK not in scope and _cors_path(scope["path"]):
            scope[_CORS_MARK] = True
            await self._cors(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] in HOT_ROUTES and scope["method"] == "POST":
            if self.proxy is None:
                await self.startup()
            # the lane's few slots are the replay runner's: a key that may not mark replays (its call is refused
            # later) would hold them with slow bodies and stall every run (security trial)
            lane = self.replay_lane
            if lane is not None and is_replay_call(scope) and self.keyring.may_mark_replay(scope["headers"]):
                await lane(self.proxy, scope, receive, send)
            else:
                await self.proxy(scope, receive, send)  # type: ignore[misc]
            return
        if scope["type"] == "http":
            carried = match_route(scope["method"], scope["path"])
            if carried is not None:
                if self.passthrough is None:
                    await self.startup()
                await self.passthrough(scope, receive, send, *carried)  # type: ignore[misc]
                return
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.api(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as e:
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


_CORS_MARK = "tagway.cors"


def _cors_path(path: str) -> bool:
    """The OpenAI API's routes, not tagway's own under /v1/tagway (a tenant's recorded calls: a key shipped in a
    browser app must not let the app's visitors read them)."""
    return path.startswith("/v1/") and not path.startswith("/v1/tagway")


def _cors(origins: list[str], app: Any) -> Any:
    """Starlette's CORS middleware around the /v1 routes when origins are configured: it answers a browser's
    preflight and adds the allow and expose headers (the SDKs read x-request-id, retry-after and the rate-limit
    state; the trace id links the call). Keys travel in Authorization, never cookies: no credentials mode."""
    if not origins:
        return None
    from starlette.middleware.cors import CORSMiddleware  # noqa: PLC0415

    return CORSMiddleware(app, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                          expose_headers=["*"], max_age=600)


def default_recorder(config: GatewayConfig) -> Any:
    """Recording as configured. Worker processes share one spool directory: each takes the first free `worker-N`
    slot under it (an flock), so a restarted worker adopts, and re-sends, whatever a dead one left behind. The
    embedded store allows one process, which takes `worker-0`."""
    from exporters.recording import RecordingLimits, start_recording  # noqa: PLC0415 - chDB import is heavy
    from exporters.spool import SpoolLockedError  # noqa: PLC0415
    from exporters.store import is_embedded  # noqa: PLC0415

    s, r = config.storage, config.recording
    dsn = s.resolved_dsn()

    # the other slots' leftovers too, where no process holds them: a restart with fewer workers strands them
    parent = s.resolved_spool()
    others = [os.path.join(parent, n) for n in sorted(os.listdir(parent)) if n.startswith("worker-")] \
        if os.path.isdir(parent) else []

    def start(spool_dir: str) -> Any:
        return start_recording(
            adopt=others,
            dsn=dsn, spool_dir=spool_dir,
            schema=config.schema_settings(),
            batch_max_rows=r.batch_max_rows, batch_max_seconds=r.batch_max_seconds, queue_max=r.queue_max,
            service_name=r.service_name, enabled=r.enabled,
            limits=RecordingLimits(queue_max_bytes=r.queue_max_bytes, batch_max_bytes=r.batch_max_bytes,
                                   spool_max_bytes=r.spool_max_bytes, spool_full=r.spool_full,
                                   poison_attempts=r.poison_attempts, write_ahead=r.write_ahead,
                                   flush_interval_seconds=r.flush_interval_ms / 1000))

    if not r.enabled:
        return start(s.resolved_spool())
    if is_embedded(dsn):  # one process: a second one gets the lock error as it is
        return start(os.path.join(s.resolved_spool(), "worker-0"))
    for slot in range(256):
        try:
            return start(os.path.join(s.resolved_spool(), f"worker-{slot}"))
        except SpoolLockedError:
            continue
    raise SpoolLockedError(f"all 256 spool slots under {s.resolved_spool()} are in use by other processes")


def _openai_error(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error") -> Response:
    return Response(error_body(message, type_, code), status_code=status, media_type="application/json")


def _build_api(app: TagwayApp) -> FastAPI:
    api = FastAPI(title="tagway", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    install_openapi(api, _version())  # adds the /v1 routes the proxy serves, and the key schemes

    @api.exception_handler(GatewayError)
    async def _gateway_error(_: Request, e: GatewayError) -> Response:
        return Response(e.body(), status_code=e.status, media_type="application/json",
                        headers={k.decode(): v.decode() for k, v in e.headers})

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        route = f"{request.method} {request.url.path}"
        if e.status_code in (404, 405) and e.detail in ("Not Found", "Method Not Allowed"):
            methods = allowed_methods(request.url.path) + (["POST"] if request.url.path in HOT_ROUTES else [])
            if e.status_code == 405:  # one of the app's own routes (/admin/*, /ui...): starlette says which methods
                methods += [m.strip() for m in (e.headers or {}).get("Allow", "").split(",") if m.strip()]
            if methods:  # a route tagway carries, with another method
                return _openai_error(405, f"{route} is not carried; {request.url.path} takes "
                                     f"{', '.join(sorted(set(methods)))}.", "method_not_allowed")
            return _openai_error(e.status_code, f"Invalid URL ({route}): tagway does not carry this route.", code)
        return _openai_error(e.status_code, str(e.detail), code)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body", "path"))
        return _openai_error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), "invalid_request")

    def principal(request: Request) -> Any:
        return app.keyring.authenticate_headers(request.headers)

    @api.get("/v1/models")
    @api.get("/models", include_in_schema=False)
    async def list_models(request: Request) -> dict:
        return {"object": "list", "data": await app.model_list.list(principal(request).allows)}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict:
        card = app.model_list.card(model_id, principal(request).allows)
        if card is None:
            raise GatewayError(404, f"The model `{model_id}` does not exist or you do not have access to it.",
                               code="model_not_found", param="model")
        return card

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        if app.proxy is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        rec = app.recorder
        processor = getattr(rec, "processor", None)
        body: dict[str, Any] = {"status": "ready"}
        if not getattr(rec, "enabled", True):
            body["recording"] = "off"
        elif failing := getattr(getattr(rec, "spool", None), "write_failing", lambda: "")():
            body["recording"] = "degraded"  # where spans may be lost: said before anything else
            body["reason"] = (f"spool writes failing ({failing}): spans that cannot be inserted are kept in memory "
                              "(up to recording.queue_max_bytes, then dropped, counted in /metrics) until it has room")
        elif getattr(getattr(rec, "spool", None), "full", False):
            body["recording"] = "degraded"
            body["reason"] = (f"spool full (recording.spool_max_bytes): dropping the "
                              f"{rec.spool.on_full.removeprefix('drop_')} spans, counted in /metrics")
        elif getattr(processor, "degraded", False):
            body["recording"] = "degraded"
            body["reason"] = getattr(processor, "last_error", "") or "ClickHouse is not answering"
        elif getattr(rec, "exporter", None) is not None and rec.store is None:
            body["recording"] = "degraded"  # still reaching a ClickHouse server: calls are spooled meanwhile
            body["reason"] = "not connected to ClickHouse yet"
        else:
            body["recording"] = "ok"
        # a degraded recorder still spools to disk, so the gateway stays in rotation
        return JSONResponse(body)

    @api.get("/admin/budgets")
    async def budgets(request: Request) -> dict:
        """Spend against budget, per tenant and key that has one, in the current period."""
        if not principal(request).is_admin:
            raise GatewayError(403, "This route needs the admin key.", type_="permission_error",
                               code="admin_key_required")
        limits = dict(s for t in app.config.tenants for s in CallLimits.all_scopes("", None, t))
        limits.update(s for k, _ in app.keyring.keys() for s in CallLimits.all_scopes(k.id, k.limits, None))
        out = []
        for row in app.limits.budgets.report():
            who = model_scope(row["scope"], row["id"], row["model"]) if "model" in row else (row["scope"], row["id"])
            lim = limits.get(who)
            if lim is not None and lim.budget is not None:
                out.append({**row, "budget_usd": lim.budget.usd, "soft": lim.budget.soft,
                            "used": round(row["spent_usd"] / lim.budget.usd, 6)})
        return {"object": "list", "data": out}

    endpoint = MetricsEndpoint(app)

    @api.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text format 0.0.4, or OpenMetrics when the scraper asks for it)."""
        if app.config.metrics.auth and not principal(request).is_admin:
            raise GatewayError(403, "/metrics needs the admin key (metrics.auth is on).", type_="permission_error",
                               code="admin_key_required")
        body, content_type = endpoint.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    try:
        from .stats_api import build_stats_router  # noqa: PLC0415
    except ImportError:  # pragma: no cover - during development of the stats module
        build_stats_router = None
    if build_stats_router is not None:
        api.include_router(build_stats_router(app.keyring, lambda: app.query_store))
    api.include_router(build_tags_router(app.keyring, lambda: app.query_store))
    api.include_router(build_store_router(app.keyring, lambda: app.query_store, app.local, app.flush_recording,
                                         app.kill_local, lambda: app.local_store))
    db = app.config.storage.database
    api.include_router(build_feedback_router(app.keyring, lambda: app.query_store,
                                             lambda: app.proxy.recent if app.proxy is not None else None,
                                             app.config.feedback, app.limits.limiter, database=db))
    api.include_router(build_datasets_router(app.keyring, lambda: app.query_store, database=db))
    return api


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("tagway")
    except PackageNotFoundError:
        return "0"


def create_app(config: GatewayConfig | str | os.PathLike | None = None, **kwargs: Any) -> TagwayApp:
    """Build the app from a config object or a config path (default: $TAGWAY_CONFIG or built-in defaults)."""
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    return TagwayApp(config, **kwargs)
