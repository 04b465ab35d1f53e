"""Routing: the deployment chain for a requested model (the deployment and its fallbacks), and the body each
deployment gets. Pure."""
from __future__ import annotations

import orjson

from .config import GatewayConfig, ModelConfig

__all__ = ["fallback_chain", "body_for"]


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


def body_for(payload: dict, body: bytes, d: ModelConfig, ask_usage: bool) -> tuple[dict, bytes]:
    """The body for this deployment: the client's bytes untouched when possible; otherwise a shallow copy with the
    upstream model name, tagway's `metadata` removed and usage requested for streams (`ask_usage`)."""
    needs_model = payload.get("model") != d.upstream_model
    if not (needs_model or "metadata" in payload or ask_usage):
        return payload, body
    p = dict(payload)
    p["model"] = d.upstream_model
    p.pop("metadata", None)
    if ask_usage:
        opts = p.get("stream_options")
        p["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return p, orjson.dumps(p)
