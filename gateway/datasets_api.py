"""The admin API over versioned datasets and the coverage map (the storage and queries live in exporters; this
module only answers HTTP, admin key only):

    GET  /admin/datasets                    the latest version of every dataset
    GET  /admin/datasets/{ref}              one version (NAME or NAME@N) and its cases (without content)
    GET  /admin/datasets/{name}/log         every version, newest first
    POST /admin/datasets/{name}/labels      {"trace_ids": [...], "label": "pass"|"fail", "critique": "...",
                                             "labeller": "...", "adjudicated": false, "message": "..."}: a new version
    GET  /admin/coverage                    ?by=customer&by=intent&dataset=NAME&since=30d&where=k=v: the coverage map

Errors are OpenAI-shaped: 400 bad input (a label other than pass/fail, unknown cases), 404 unknown dataset or
version (the message names the nearest), 409 a change that changes nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from exporters import datasets as ds
from exporters import queries as q
from exporters.coverage import coverage_map
from exporters.store import StoreError

from .auth import KeyRing
from .errors import GatewayError, bad_request, forbidden
from .http_query import read_body

__all__ = ["build_datasets_router"]

log = logging.getLogger("tagway.datasets")
LABEL_FIELDS = {"trace_ids", "label", "critique", "labeller", "adjudicated", "message", "author"}
COVERAGE_PARAMS = {"by", "dataset", "since", "from", "to", "where", "customer", "status"}


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def build_datasets_router(keyring: KeyRing, get_store: Callable[[], Any], *, database: str = "") -> APIRouter:
    router = APIRouter()

    def admin(request: Request) -> None:
        if not keyring.authenticate_headers(request.headers).is_admin:
            raise forbidden("This route needs the admin key.", code="admin_key_required")

    def store() -> Any:
        s = get_store()
        if s is None:
            raise GatewayError(503, "The store is not available (recording is off or still starting).",
                               type_="server_error", code="store_unavailable")
        return s

    def handle(request: Request, fn: Callable[[], Any], status: int = 200) -> Response:
        try:
            admin(request)
            return _json(fn(), status)
        except GatewayError as e:
            return Response(e.body(), status_code=e.status, media_type="application/json")
        except ds.DatasetNotFound as e:
            return _error(404, str(e), "dataset_not_found")
        except ds.NoChange as e:
            return _error(409, str(e), "no_change")
        except ds.DatasetStoreError as e:
            return _error(400, str(e), "invalid_dataset_request")
        except q.QueryInputError as e:
            return _error(400, e.message, "invalid_query", e.param)
        except StoreError as e:
            log.warning("datasets API: %s", e)
            return _error(503, "The dataset query failed; see the gateway log.", "query_failed")

    @router.get("/admin/datasets", tags=["datasets"])
    def list_datasets(request: Request) -> Response:
        return handle(request, lambda: {"object": "list",
                                        "data": [v.to_json() for v in ds.latest_versions(store())]})

    @router.get("/admin/datasets/{ref}", tags=["datasets"])
    def get_dataset(ref: str, request: Request) -> Response:
        def run() -> Any:
            v = ds.get_version(store(), ref)
            return {**v.to_json(), "cases": [c.to_json() for c in ds.read_cases(store(), v)]}
        return handle(request, run)

    @router.get("/admin/datasets/{name}/log", tags=["datasets"])
    def dataset_log(name: str, request: Request) -> Response:
        return handle(request, lambda: {"object": "list", "data": [v.to_json() for v in ds.history(store(), name)]})

    @router.post("/admin/datasets/{name}/labels", tags=["datasets"])
    async def label(name: str, request: Request) -> Response:
        # the key first: a caller without the admin key had its body read and parsed, whatever its size
        try:
            admin(request)
            raw = await read_body(request, keyring.config.server.max_body_bytes)
        except GatewayError as e:
            return Response(e.body(), status_code=e.status, media_type="application/json")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "The body is not valid JSON.", "invalid_json")
        return await _run_sync(lambda: handle(request, lambda: _label(store(), name, body), 201))

    @router.get("/admin/coverage", tags=["datasets"])
    def coverage(request: Request) -> Response:
        """The coverage map (exporters/coverage.py): per slice, the calls that reached an upstream, their failures
        and complaints, beside the dataset cases covering it; calls the gateway refused itself are not counted."""
        def run() -> Any:
            qp = request.query_params
            unknown = sorted(set(qp.keys()) - COVERAGE_PARAMS)
            if unknown:
                raise q.QueryInputError(f"unknown query parameter {unknown[0][:40]!r}: use one of "
                                        f"{', '.join(sorted(COVERAGE_PARAMS))}", param=unknown[0][:40])
            where = qp.getlist("where") + [f"customer={c}" for c in qp.getlist("customer")]
            sel = q.make_selection(where, qp.get("status"), qp.get("since"), qp.get("from"), qp.get("to"),
                                   default_since="30d")
            names = qp.getlist("dataset") or None
            return coverage_map(store(), sel, q.parse_by(qp.getlist("by")), datasets=names,
                                database=database).to_dict()
        return handle(request, run)

    return router


async def _run_sync(fn: Callable[[], Response]) -> Response:
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415
    return await run_in_threadpool(fn)


def _error(status: int, message: str, code: str, param: str | None = None) -> Response:
    e = bad_request(message, code=code, param=param)
    e.status = status
    return Response(e.body(), status_code=status, media_type="application/json")


def _label(store: Any, name: str, body: Any) -> dict:
    if not isinstance(body, dict):
        raise ds.DatasetStoreError("the body must be a JSON object")
    unknown = sorted(set(body) - LABEL_FIELDS)
    if unknown:
        raise ds.DatasetStoreError(f"unknown field {unknown[0][:40]!r}: use {', '.join(sorted(LABEL_FIELDS))}")
    ids = body.get("trace_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, str) for t in ids):
        raise ds.DatasetStoreError("trace_ids must be a non-empty list of the cases' trace ids")
    label = body.get("label")
    critique, labeller = body.get("critique") or "", body.get("labeller") or "admin-api"
    adjudicated = body.get("adjudicated", False)
    if not isinstance(critique, str) or not isinstance(labeller, str) or not isinstance(adjudicated, bool):
        raise ds.DatasetStoreError("critique and labeller are strings, adjudicated is true or false")

    def change(latest: ds.Version | None, cases: list[ds.CaseRecord]) -> tuple[list[ds.CaseRecord], dict]:
        return (ds.relabel(cases, ids, label=str(label), critique=critique, labeller=labeller,
                           adjudicated=adjudicated), latest.targets if latest else {})

    message = body.get("message") or f"label {len(ids)} case(s) {label}"
    v = ds.commit(store, ds.validate_name(name), change, author=str(body.get("author") or labeller),
                  message=str(message), op="label", create=False)
    return v.to_json()
