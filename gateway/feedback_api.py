"""Feedback and complaints on a call, by the trace id its response carried (`x-tagway-trace-id`):

    POST /v1/tagway/feedback   {"trace_id": "...", "score": 0.2 | "thumbs": "up"|"down", "complaint": true,
                                "comment": "...", "source": "app"}

Authorised like the call itself: a tenant key rates its own customer's calls (and the calls it made itself, for a
key that may record other customers); another tenant's call answers as an unknown trace id does, a 404 that names
no tenant; the admin key rates any call. Stored in `llm_feedback` with the time, the key that rated and the call's
customer (exporters.feedback), joinable to `llm_calls` on trace_id.

A call is looked up in the calls this process served lately first (gateway.recent: a rating may come before the
recorder's batch reaches ClickHouse), then in the store. Ratings are rate limited per key by the gateway's limiter
(gateway.limits) in buckets of their own (`feedback.per_minute`, a worker's share with several workers), so a flood
of ratings gets 429 with retry-after and never eats the key's budget for calls. Store work runs on the thread pool,
never on the event loop.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from exporters.feedback import call_owner, feedback_row, insert_feedback, parse_feedback
from exporters.store import StoreError
from exporters.vocabulary import QueryInputError

from .auth import KeyRing, Principal
from .config import FeedbackConfig
from .errors import GatewayError, bad_request
from .http_query import read_body
from .limits import Limiter
from .recent import RecentCalls

__all__ = ["build_feedback_router", "FEEDBACK_SCOPE"]

log = logging.getLogger("tagway.feedback")
MAX_BODY = 64 * 1024
FEEDBACK_SCOPE = "feedback"  # the limiter's buckets for ratings, per key


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(e: GatewayError) -> Response:
    headers = {"Cache-Control": "no-store", **{k.decode(): v.decode() for k, v in e.headers}}
    return Response(e.body(), status_code=e.status, media_type="application/json", headers=headers)


def build_feedback_router(keyring: KeyRing, get_store: Callable[[], Any], recent: Callable[[], RecentCalls | None],
                          config: FeedbackConfig, limiter: Limiter, *, database: str = "") -> APIRouter:
    """`limiter`: the gateway's (gateway.limits), in which ratings have buckets of their own per key."""
    router = APIRouter()

    def owner_of(trace_id: str) -> tuple[str, str] | None:
        r = recent()
        found = r.get(trace_id) if r is not None else None
        if found is not None:
            return found
        store = get_store()
        if store is None:
            raise GatewayError(503, "The call store is not available (recording is off or still starting).",
                               type_="server_error", code="store_unavailable")
        return call_owner(store, trace_id, database)

    def allowed(p: Principal, owner: tuple[str, str]) -> bool:
        customer, key_id = owner
        return p.is_admin or (bool(p.customer) and customer == p.customer) or (bool(key_id) and key_id == p.key_id)

    def store_row(row: dict) -> None:
        store = get_store()
        if store is None:
            raise GatewayError(503, "The call store is not available; the rating was not stored.",
                               type_="server_error", code="store_unavailable")
        insert_feedback(store, [row], database)

    @router.post("/v1/tagway/feedback", tags=["feedback"], status_code=201)
    async def post_feedback(request: Request) -> Response:
        """Rate a call (score or thumbs) and/or flag a complaint, by its trace id."""
        try:
            p = keyring.authenticate_headers(request.headers)
            refusal = limiter.admit([((FEEDBACK_SCOPE, p.key_id or "admin"), config.per_minute, None)])
            if refusal is not None:
                raise refusal.error()
            raw = await read_body(request, MAX_BODY)  # refused as it arrives, not once all of it is in memory
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise bad_request("The body is not valid JSON.", code="invalid_json") from None
            f = parse_feedback(body, max_comment=config.max_comment_chars)
            owner = await run_in_threadpool(owner_of, f.trace_id)
            # another tenant's call answers as one that does not exist: a 403 would tell that it does
            if owner is None or not allowed(p, owner):
                raise GatewayError(404, "No call with this trace id. (A call is stored within seconds of its end: "
                                        "retry if it only just finished.)", code="call_not_found", param="trace_id")
            row = feedback_row(f, customer=owner[0], key_id=p.key_id, by_admin=p.is_admin)
            await run_in_threadpool(store_row, row)
            return _json({"object": "tagway.feedback", "id": row["feedback_id"], "trace_id": f.trace_id,
                          "created": int(row["Timestamp"]), "score": f.score, "thumbs": f.thumbs or None,
                          "complaint": f.complaint}, 201)
        except GatewayError as e:
            return _error(e)
        except QueryInputError as e:
            return _error(bad_request(e.message, code="invalid_feedback", param=e.param))
        except StoreError as e:
            log.warning("feedback store failed: %s", e)
            return _error(GatewayError(503, "The rating could not be stored; see the gateway log.",
                                       type_="server_error", code="store_failed"))

    return router
