"""Applied tags and evaluation runs over HTTP: a person adds or removes a tag on a message (a call, by trace id) or a session, reads a
target's tags and its audit log. Tag rules apply and remove the same tags (replay.evals); every change is audited
(exporters.tagstate).

    GET    /admin/tags?target=T              the target's tags now (admin key)
    POST   /admin/tags    {"target", "tag"}  add a tag, as human:<key id>; a tag already there changes nothing
    DELETE /admin/tags?target=T&tag=N        remove it (404 tag_not_present when it is not there)
    GET    /admin/tags/audit?target=T        every change, oldest first: time, tag, action, actor, run, mode, value
    GET    /admin/evals                      evaluation runs, newest first (?limit=)
    GET    /admin/evals/{run_id}             a run: its rows with field values and the Applied Tags column, its changes
    /v1/tagway/tags, /v1/tagway/tags/audit   the same for a tenant key, on its own customer's calls and sessions
    /v1/tagway/evals[/{run_id}]              (a session is `session:<session id>`; another tenant's target is a
                                             404; a run shows the tenant's own rows, counted for them alone)

A target is `message:<trace id>` (or the bare trace id) or `session:<customer>/<session id>`; it must exist in
llm_calls. Errors are OpenAI-shaped: 400 bad target or tag, 401/403 keys, 404 unknown target or missing tag, 409 a
rule run is reconciling that tag right now, 503 store unavailable. Handlers are sync: FastAPI runs them on its
thread pool, never on the event loop.
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from exporters import evals
from exporters import tagstate as ts

from .auth import KeyRing
from .board_api import store_getter
from .errors import GatewayError, bad_request
from .http_query import QueryParams, Reader, error_response, read_body, reader, run_handler

__all__ = ["build_tags_router"]

_TARGET = frozenset({"target"})
_CHANGE = frozenset({"target", "tag"})
_RUNS = frozenset({"limit"})


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str
    tag: str


MAX_BODY = 64 * 1024  # {"target", "tag"}: a few hundred bytes
_TAG_BODY_DOC = {"requestBody": {"required": True,
                                 "content": {"application/json": {"schema": TagBody.model_json_schema()}}}}


def _tag_body(raw: bytes) -> TagBody:
    try:
        return TagBody.model_validate_json(raw)
    except ValidationError as e:  # said as the app says a body parameter's errors
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise bad_request(f"{where}: {first['msg']}" if where else first["msg"]) from None


def _event(e: ts.TagEvent) -> dict:
    return {"time": e.event_time, "target": f"{e.target_kind}:{e.target_id}", "tag": e.tag, "action": e.action,
            "actor": e.actor}


def _handle(fn: Callable[[], Any]) -> Response:
    """run_handler, with the tag errors as their statuses: 400 bad target or tag, 404 a tag that is not there,
    409 a rule run reconciling that tag right now."""
    def body() -> Any:
        try:
            return fn()
        except ts.TagNotPresent as e:
            raise GatewayError(404, e.message, code="tag_not_present", param=e.param) from None
        except ts.TagInputError as e:
            raise bad_request(e.message, code=f"invalid_{e.param}", param=e.param) from None
        except ts.TagLockBusy as e:
            raise GatewayError(409, str(e), code="tag_busy", param="tag") from None
    return run_handler(body)


def build_tags_router(keyring: KeyRing, get_store: Callable[[], Any], *, database: str | None = None) -> APIRouter:
    router = APIRouter()
    db = database if database is not None else (getattr(getattr(keyring.config, "storage", None), "database", "")
                                                or "")
    store = store_getter(get_store)

    def target_of(who: Reader, raw: str | None) -> tuple[ts.Target, str]:
        """The target and the customer it belongs to; a target that does not exist (or is another tenant's, for a
        tenant key) is a 404."""
        if not raw:
            raise bad_request("target is required: message:<trace id> or session:<customer>/<session id>.",
                              code="invalid_target", param="target")
        target = ts.parse_target(raw, tenant=who.customer)
        customer = ts.target_customer(store(), target, database=db)
        if customer is None or (who.customer is not None and customer != who.customer):
            what = "call with this trace id" if target.kind == ts.MESSAGE else "session with this id"
            raise GatewayError(404, f"No {what}.", code="target_not_found", param="target")
        return target, customer

    def current(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        target, customer = target_of(who, QueryParams(request, _TARGET).one("target"))
        tags = ts.tags_of(store(), target, database=db)
        return {"target": str(target), "customer": customer,
                "tags": [{"tag": k, "actor": v["actor"], "run_id": v["run_id"]} for k, v in sorted(tags.items())]}

    def change(request: Request, admin_route: bool, target_raw: str | None, tag: str | None, action: str) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        target, customer = target_of(who, target_raw)
        ts.validate_tag_name(tag or "")
        event = ts.human_change(store(), target, tag or "", action, f"human:{who.principal.key_id}", customer,
                                database=db)
        return {"target": str(target), "tag": tag, "action": action, "changed": event is not None,
                "event": _event(event) if event else None}

    def audit(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        target, customer = target_of(who, QueryParams(request, _TARGET).one("target"))
        return {"target": str(target), "customer": customer, "events": ts.audit(store(), target, database=db)}

    def runs(request: Request, admin_route: bool) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        limit = QueryParams(request, _RUNS).integer("limit", 50, 1, 1000)
        return {"runs": [{"run_id": r.run_id, "mode": r.mode, "status": r.status, "dataset": r.dataset,
                          "dataset_version": r.dataset_version, "evaluators": r.evaluators, "created_at": r.created_at,
                          "summary": r.summary if who.is_admin else {}}
                         for r in evals.list_runs(store(), limit, customer=who.customer)],
                "limited_to_customer": who.customer}

    def run_one(request: Request, admin_route: bool, run_id: str) -> Any:
        who = reader(keyring, request, admin_route=admin_route)
        QueryParams(request, frozenset())
        run = evals.get_run(store(), run_id, customer=who.customer)
        if run is None:
            raise GatewayError(404, "No evaluation run with this id.", code="run_not_found", param="run_id")
        results = evals.read_results(store(), run_id, customer=who.customer)
        if not who.is_admin:  # the tenant's own rows, counted for them alone
            run.summary = {k: sum(1 for r in results if r.status == k) for k in ("scored", "errored", "skipped")}
        doc = evals.run_document(run, results, ts.run_events(store(), run_id, customer=who.customer, database=db))
        return {**doc, "limited_to_customer": who.customer}

    def mount(prefix: str, admin_route: bool) -> None:
        @router.get(f"{prefix}/tags", tags=["tags"])
        def get_tags(request: Request) -> Response:
            """The tags a message or session carries now."""
            return _handle(lambda: current(request, admin_route))

        @router.post(f"{prefix}/tags", tags=["tags"], openapi_extra=_TAG_BODY_DOC)
        async def add_tag(request: Request) -> Response:
            """Add a tag as a person (audited as human:<key id>)."""
            # the key before the body (a FastAPI body parameter read and parsed it for anyone, whatever its size)
            try:
                reader(keyring, request, admin_route=admin_route)
                body = _tag_body(await read_body(request, MAX_BODY))
            except GatewayError as e:
                return error_response(e)
            return await run_in_threadpool(_handle, lambda: change(request, admin_route, body.target, body.tag,
                                                                   "apply"))

        @router.delete(f"{prefix}/tags", tags=["tags"])
        def remove_tag(request: Request) -> Response:
            """Remove a tag as a person (audited)."""
            def remove() -> Any:
                qp = QueryParams(request, _CHANGE)
                return change(request, admin_route, qp.one("target"), qp.one("tag"), "remove")
            return _handle(remove)

        @router.get(f"{prefix}/tags/audit", tags=["tags"])
        def get_audit(request: Request) -> Response:
            """Every change of a target's tags, oldest first."""
            return _handle(lambda: audit(request, admin_route))

        @router.get(f"{prefix}/evals", tags=["tags"])
        def get_runs(request: Request) -> Response:
            """Evaluation runs, newest first."""
            return _handle(lambda: runs(request, admin_route))

        @router.get(f"{prefix}/evals/{{run_id}}", tags=["tags"])
        def get_run(run_id: str, request: Request) -> Response:
            """One evaluation run: its rows (field values, Applied Tags) and the tag changes it made."""
            return _handle(lambda: run_one(request, admin_route, run_id))

    mount("/admin", True)
    mount("/v1/tagway", False)
    return router

