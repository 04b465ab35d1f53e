"""Cost in USD from token counts: the deployment's own prices if configured, else litellm's local price map.

The map is the JSON file litellm ships (`model_prices_and_context_window_backup.json`), read directly: importing
litellm costs seconds, and with LITELLM_LOCAL_MODEL_COST_MAP=True litellm reads this same file anyway. Never
fetched from the network.
"""
from __future__ import annotations

import importlib.util
import os
import threading

import orjson

from .config import ModelConfig

__all__ = ["Pricing"]


def _price_map_path() -> str | None:
    spec = importlib.util.find_spec("litellm")  # finds the package without executing it
    if not spec or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "model_prices_and_context_window_backup.json")
    return path if os.path.exists(path) else None


def unpriced_warning(d: ModelConfig) -> str:
    return (f"model {d.name!r} ({d.provider}/{d.upstream_model}) has no price in litellm's map or the config: its "
            "calls are recorded without a cost, so stats show $0 for them and budgets do not count them; set its "
            "input_cost_per_token and output_cost_per_token")


class Pricing:
    def __init__(self) -> None:
        self._map: dict | None = None
        self._lock = threading.Lock()
        self._per_deployment: dict[int, tuple[float, float] | None] = {}

    def load(self) -> None:
        """Read the map (about 50 ms); called off the event loop at start-up."""
        with self._lock:
            if self._map is None:
                path = _price_map_path()
                self._map = orjson.loads(open(path, "rb").read()) if path else {}

    def _prices(self, d: ModelConfig) -> tuple[float, float] | None:
        key = id(d)
        if key in self._per_deployment:
            return self._per_deployment[key]
        if d.input_cost_per_token is not None or d.output_cost_per_token is not None:
            prices: tuple[float, float] | None = (d.input_cost_per_token or 0.0, d.output_cost_per_token or 0.0)
        else:
            if self._map is None:
                self.load()
            entry = None
            for name in (f"{d.provider}/{d.upstream_model}", d.upstream_model):
                entry = self._map.get(name) if self._map else None
                if entry:
                    break
            prices = (float(entry.get("input_cost_per_token") or 0.0), float(entry.get("output_cost_per_token") or 0.0)) \
                if entry else None
        self._per_deployment[key] = prices
        return prices

    def unpriced(self, models: list[ModelConfig]) -> list[ModelConfig]:
        """The deployments with no known price: their calls are recorded without a cost. A wildcard route's price
        is its matched model's, known only per call; a mock model calls no provider."""
        return [d for d in models if "*" not in d.name and d.provider != "mock" and self._prices(d) is None]

    def cost(self, d: ModelConfig, input_tokens: int, output_tokens: int) -> float | None:
        """USD, or None when the model has no known price (recorded as unknown, not as free)."""
        prices = self._prices(d)
        if prices is None:
            return None
        return input_tokens * prices[0] + output_tokens * prices[1]
