"""Routing: the deployment chain for a requested model (the deployment and its fallbacks), and the body each
deployment gets. Pure."""
from __future__ import annotations

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


def refuses_stream_options(status: int | None, body: bytes | None, payload: dict) -> bool:
    """The upstream refused the `stream_options` tagway added to ask for a stream's usage (older Azure api-versions:
    400 `Unrecognized request argument supplied: stream_options`; strict servers: 400 or 422 naming the field),
    not one the client sent itself."""
    return status in (400, 422) and body is not None and b"stream_options" in body and "stream_options" not in payload
