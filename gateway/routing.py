"""Routing: the deployment chain for a requested model (the deployment and its fallbacks), and the body each
deployment gets. Pure."""
from __future__ import annotations

import re

import orjson

from exporters.vocabulary import normalise_tag_key

from .config import GatewayConfig, ModelConfig
from .tags import RESERVED

__all__ = ["fallback_chain", "body_for", "upstream_metadata", "refuses_stream_options"]

_STORED_BY_DEFAULT = frozenset({"responses"})  # the Responses API stores unless told `store: false`


def fallback_chain(config: GatewayConfig, first: ModelConfig) -> list[ModelConfig]:
    """The deployment and its fallbacks, followed transitively (a fallback's own fallbacks come after it), each
    deployment once, so cycles end."""
    chain: list[ModelConfig] = []
    seen: set[str] = set()

    def visit(m: ModelConfig) -> None:
        if m.name in seen:
            return
        seen.add(m.name)
        chain.append(m)
        for name in m.fallbacks:
            nxt = config.model(name)
            if nxt is not None:
                visit(nxt)

    visit(first)
    # breadth matters more than depth: direct fallbacks first, then theirs
    direct = [first] + [m for m in (config.model(n) for n in first.fallbacks) if m is not None]
    return direct + [m for m in chain if m not in direct]


def upstream_metadata(payload: dict, operation: str) -> dict | None:
    """The `metadata` the upstream gets. It feeds tagway's tags, so it goes upstream only where the upstream keeps
    it: a stored call (`store: true`; Responses store unless `store: false`), minus tagway's own keys (customer,
    intent, prompt_version). Anthropic's Messages API knows one key, `user_id`, and refuses others."""
    meta = payload.get("metadata")
    if not isinstance(meta, dict) or not meta:
        return None
    if operation == "messages":
        return {"user_id": meta["user_id"]} if "user_id" in meta else None
    store = payload.get("store")
    if not (store is True or (store is None and operation in _STORED_BY_DEFAULT)):
        return None
    kept = {k: v for k, v in meta.items() if normalise_tag_key(str(k)) not in RESERVED}
    return kept or None


def body_for(payload: dict, body: bytes, d: ModelConfig, ask_usage: bool, operation: str = "chat") -> tuple[dict, bytes]:
    """The body for this deployment: the client's bytes untouched when possible; otherwise a shallow copy with the
    upstream model name, `metadata` as the upstream should see it and usage requested for streams (`ask_usage`)."""
    needs_model = "model" in payload and payload["model"] != d.upstream_model  # a model-less call stays so
    meta = upstream_metadata(payload, operation) if "metadata" in payload else None
    same_meta = "metadata" not in payload or meta == payload["metadata"]
    if not (needs_model or not same_meta or ask_usage):
        return payload, body
    p = dict(payload)
    if "model" in payload:
        p["model"] = d.upstream_model
    if meta is None:
        p.pop("metadata", None)
    else:
        p["metadata"] = meta
    if ask_usage:
        opts = p.get("stream_options")
        p["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return p, orjson.dumps(p)


# what an upstream says when it refuses a field it does not know, about stream_options (an error that only echoes
# the request, which holds the field tagway added, is about something else: a pydantic 422 for another field)
_UNKNOWN_FIELD = re.compile(r"(?i)(unrecognized|unknown|unsupported|not supported|not allowed|not permitted|extra|"
                            r"unexpected|invalid)\b[^.\n]{0,60}stream_options|stream_options\b[^.\n]{0,60}"
                            r"(unrecognized|unknown|unsupported|not supported|not allowed|not permitted|unexpected)")


def refuses_stream_options(status: int | None, body: bytes | None, payload: dict) -> bool:
    """The upstream refused the `stream_options` tagway added to ask for a stream's usage, not one the client sent
    itself: older Azure api-versions' 400 `Unrecognized request argument supplied: stream_options` (or an OpenAI
    error whose `param` is stream_options), a FastAPI/pydantic 422 whose error is at the field (`loc` ending in
    stream_options). An error that merely echoes the request (which holds the field) is not a refusal of it: a
    tenant's bad request must not switch usage off for every tenant of the deployment."""
    if status not in (400, 422) or not body or b"stream_options" not in body or "stream_options" in payload:
        return False
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return bool(_UNKNOWN_FIELD.search(body.decode("utf-8", "replace")[:2000]))
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return err.get("param") == "stream_options" or bool(_UNKNOWN_FIELD.search(str(err.get("message") or "")))
    if isinstance(err, str):  # {"error": "json: unknown field \"stream_options\""} (TGI-style, Go servers)
        return bool(_UNKNOWN_FIELD.search(err))
    detail = obj.get("detail") if isinstance(obj, dict) else None
    if isinstance(detail, list):  # FastAPI: the refused field is the last of an error's `loc`
        return any(isinstance(d, dict) and isinstance(d.get("loc"), list) and d["loc"][-1:] == ["stream_options"]
                   for d in detail)
    if isinstance(obj, dict) and isinstance(obj.get("message"), str):
        return bool(_UNKNOWN_FIELD.search(obj["message"]))
    return False
