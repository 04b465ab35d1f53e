"""What `/v1/models` lists: the configured model names a key may use and, when `api.list_upstream_models` is on, the
models the upstreams behind wildcard routes serve (`GET {base_url}/models`, cached for `api.upstream_models_ttl`
seconds, fetched concurrently; an upstream that fails is left out, logged, and asked again after a short pause).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from .config import GatewayConfig, ModelConfig
from .model_routes import ModelRoutes
from .providers import ProviderRegistry, UpstreamFailure, kind_of

__all__ = ["ModelList", "model_card"]

log = logging.getLogger("tagway.models")
_RETRY_FAILED_AFTER = 30.0  # seconds before an upstream whose list failed is asked again


def model_card(name: str, created: int = 0, owned_by: str = "tagway") -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def _served_name(entry: ModelConfig, upstream_id: str) -> str | None:
    """The public name under which wildcard `entry` serves upstream model `upstream_id` (None: it does not)."""
    head, _, tail = (entry.model or "*").partition("*")
    if not (upstream_id.startswith(head) and upstream_id.endswith(tail)) or len(upstream_id) <= len(head) + len(tail):
        return None
    return entry.name[:-1] + upstream_id[len(head):len(upstream_id) - len(tail) if tail else None]


class ModelList:
    def __init__(self, config: GatewayConfig, routes: ModelRoutes, providers: ProviderRegistry) -> None:
        self.config, self.routes, self.providers = config, routes, providers
        self._cache: dict[str, tuple[float, list[dict]]] = {}  # wildcard entry name -> (expires, upstream cards)
        self._locks: dict[str, asyncio.Lock] = {}

    def card(self, name: str, allows: Any) -> dict | None:
        """The card for one name the key may use, if some route serves it."""
        if not allows(name) or self.routes.entry_for(name) is None:
            return None
        return model_card(name)

    async def list(self, allows: Any) -> list[dict]:
        cards = [model_card(m.name) for m in self.config.models if not m.name.endswith("*") and allows(m.name)]
        if not self.config.api.list_upstream_models:
            return cards
        seen = {c["id"] for c in cards}
        entries = [m for m in self.config.models if m.name.endswith("*") and kind_of(m.provider) == "pass_through"]
        for entry, upstream in zip(entries, await asyncio.gather(*(self._upstream(m) for m in entries))):
            for card in upstream:
                name = _served_name(entry, str(card.get("id", "")))
                # a longer wildcard prefix (or an exact name) may take the name: list it only where it is routed
                if name and name not in seen and allows(name) and self.routes.entry_for(name) is entry:
                    seen.add(name)
                    cards.append(model_card(name, int(card.get("created") or 0), str(card.get("owned_by") or "")))
        return cards

    async def _upstream(self, entry: ModelConfig) -> list[dict]:
        hit = self._cache.get(entry.name)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        lock = self._locks.setdefault(entry.name, asyncio.Lock())
        async with lock:  # one fetch per upstream at a time, however many clients list at once
            hit = self._cache.get(entry.name)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            ttl = self.config.api.upstream_models_ttl
            try:
                cards = await self._fetch(entry)
            except (UpstreamFailure, ValueError) as e:
                log.warning("could not list the models of %s's upstream: %s", entry.name, e)
                cards, ttl = [], min(ttl, _RETRY_FAILED_AFTER)
            self._cache[entry.name] = (time.monotonic() + ttl, cards)
            return cards

    async def _fetch(self, entry: ModelConfig) -> list[dict]:
        provider = self.providers.for_deployment(entry)
        resp = await provider.open(entry, "GET", "/models")
        try:
            body = await asyncio.wait_for(resp.read(), entry.timeout)
        finally:
            resp.release()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        obj = orjson.loads(body)
        data = obj.get("data") if isinstance(obj, dict) else None
        if not isinstance(data, list):
            raise ValueError("the answer has no `data` list")
        return [c for c in data if isinstance(c, dict)]
