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

import logging
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from exporters import evals
from exporters import tagstate as ts
from exporters.store import StoreError

from .auth import KeyRing, Principal
from .errors import GatewayError, bad_request, forbidden

__all__ = ["build_tags_router"]

log = logging.getLogger("tagway.tags")


class TagBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str
    tag: str


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _event(e: ts.TagEvent) -> dict:
    return {"time": e.event_time, "target": f"{e.target_kind}:{e.target_id}", "tag": e.tag, "action": e.action,
            "actor": e.actor}


def build_tags_router(keyring: KeyRing, get_store: Callable[[], Any], *, database: str | None = None) -> APIRouter:
    router = APIRouter()
    db = database if database is not None else (getattr(getattr(keyring.config, "storage", None), "database", "")
                                                or "")

    def principal(request: Request, tenant_route: bool) -> Principal:
        p = keyring.authenticate_headers(request.headers)
        if not tenant_route and not p.is_admin:
            raise forbidden("This route needs the admin key.", code="admin_key_required")
        return p

    def store() -> Any:
        s = get_store()
        if s is None:
            raise GatewayError(503, "The call store is not available (recording is off or still starting).",
                               type_="server_error", code="store_unavailable")
        return s

    def target_of(p: Principal, raw: str | None, tenant_route: bool) -> tuple[ts.Target, str]:
        """The target and the customer it belongs to; a target that does not exist (or is another tenant's, for a
        tenant key) is a 404."""
        if not raw:
            raise bad_request("target is required: message:<trace id> or session:<customer>/<session id>.",
                              code="invalid_target", param="target")
        tenant = p.customer if tenant_route and not p.is_admin else None
        target = ts.parse_target(raw, tenant=tenant)
        customer = ts.target_customer(store(), target, database=db)
        if customer is None or (tenant is not None and customer != tenant):
            what = "call with this trace id" if target.kind == ts.MESSAGE else "session with this id"
            raise GatewayError(404, f"No {what}.", code="target_not_found", param="target")
        return target, customer

    def handle(fn: Callable[[], Any], status: int = 200) -> Response:
        try:
            return _json(fn(), status)
        except GatewayError as e:
            return _error(e)
        except ts.TagNotPresent as e:
            return _error(GatewayError(404, e.message, code="tag_not_present", param=e.param))
        except ts.TagInputError as e:
            return _error(bad_request(e.message, code=f"invalid_{e.param}", param=e.param))
        except ts.TagLockBusy as e:
            return _error(GatewayError(409, str(e), code="tag_busy", param="tag"))
        except StoreError as e:
            log.warning("tags request failed: %s", e)
            return _error(GatewayError(503, "The tag store query failed; see the gateway log.", type_="server_error",
                                       code="query_failed"))

    def current(request: Request, tenant_route: bool) -> Any:
        p = principal(request, tenant_route)
        target, customer = target_of(p, request.query_params.get("target"), tenant_route)
        tags = ts.tags_of(store(), target, database=db)
        return {"target": str(target), "customer": customer,
                "tags": [{"tag": k, "actor": v["actor"], "run_id": v["run_id"]} for k, v in sorted(tags.items())]}

    def change(request: Request, tenant_route: bool, target_raw: str | None, tag: str | None, action: str) -> Any:
        p = principal(request, tenant_route)
        target, customer = target_of(p, target_raw, tenant_route)
        ts.validate_tag_name(tag or "")
        event = ts.human_change(store(), target, tag or "", action, f"human:{p.key_id}", customer, database=db)
        return {"target": str(target), "tag": tag, "action": action, "changed": event is not None,
                "event": _event(event) if event else None}

    def audit(request: Request, tenant_route: bool) -> Any:
        p = principal(request, tenant_route)
        target, customer = target_of(p, request.query_params.get("target"), tenant_route)
        return {"target": str(target), "customer": customer, "events": ts.audit(store(), target, database=db)}

    def runs(request: Request, tenant_route: bool) -> Any:
        p = principal(request, tenant_route)
        customer = p.customer if tenant_route and not p.is_admin else None
        try:
            limit = min(max(int(request.query_params.get("limit") or 50), 1), 1000)
        except ValueError:
            raise bad_request("limit must be a whole number", code="invalid_query", param="limit") from None
        return {"runs": [{"run_id": r.run_id, "mode": r.mode, "status": r.status, "dataset": r.dataset,
                          "dataset_version": r.dataset_version, "evaluators": r.evaluators, "created_at": r.created_at,
                          "summary": r.summary if customer is None else {}}
                         for r in evals.list_runs(store(), limit, customer=customer)],
                "limited_to_customer": customer}

    def run_one(request: Request, tenant_route: bool, run_id: str) -> Any:
        p = principal(request, tenant_route)
        customer = p.customer if tenant_route and not p.is_admin else None
        run = evals.get_run(store(), run_id, customer=customer)
        if run is None:
            raise GatewayError(404, "No evaluation run with this id.", code="run_not_found", param="run_id")
        results = evals.read_results(store(), run_id, customer=customer)
        if customer is not None:  # the tenant's own rows, counted for them alone
            run.summary = {k: sum(1 for r in results if r.status == k) for k in ("scored", "errored", "skipped")}
        doc = evals.run_document(run, results, ts.run_events(store(), run_id, customer=customer, database=db))
        return {**doc, "limited_to_customer": customer}

    def mount(prefix: str, tenant_route: bool) -> None:
        @router.get(f"{prefix}/tags", tags=["tags"])
        def get_tags(request: Request) -> Response:
            """The tags a message or session carries now."""
            return handle(lambda: current(request, tenant_route))

        @router.post(f"{prefix}/tags", tags=["tags"])
        def add_tag(body: TagBody, request: Request) -> Response:
            """Add a tag as a person (audited as human:<key id>)."""
            return handle(lambda: change(request, tenant_route, body.target, body.tag, "apply"))

        @router.delete(f"{prefix}/tags", tags=["tags"])
        def remove_tag(request: Request) -> Response:
            """Remove a tag as a person (audited)."""
            qp = request.query_params
            return handle(lambda: change(request, tenant_route, qp.get("target"), qp.get("tag"), "remove"))

        @router.get(f"{prefix}/tags/audit", tags=["tags"])
        def get_audit(request: Request) -> Response:
            """Every change of a target's tags, oldest first."""
            return handle(lambda: audit(request, tenant_route))

        @router.get(f"{prefix}/evals", tags=["tags"])
        def get_runs(request: Request) -> Response:
            """Evaluation runs, newest first."""
            return handle(lambda: runs(request, tenant_route))

        @router.get(f"{prefix}/evals/{{run_id}}", tags=["tags"])
        def get_run(run_id: str, request: Request) -> Response:
            """One evaluation run: its rows (field values, Applied Tags) and the tag changes it made."""
            return handle(lambda: run_one(request, tenant_route, run_id))

    mount("/admin", False)
    mount("/v1/tagway", True)
    return router


def _error(e: GatewayError) -> Response:
    return Response(e.body(), status_code=e.status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})

