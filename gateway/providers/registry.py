"""Which implementation serves a deployment's `provider:` name, in one table: OpenAI-compatible servers get the
pass-through client (bytes in, bytes out), `mock` the built-in deterministic provider, every other name litellm's
translation. Implementations are made on first use, so a gateway that never translates never imports litellm.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Iterable, Mapping

from .base import Provider
from .names import PASS_THROUGH, base_url, kind_of, server_address

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = ["ProviderRegistry", "PASS_THROUGH", "kind_of", "base_url", "server_address"]

# kind -> factory ("module:attr", imported on first use)
FACTORIES: Mapping[str, str] = {
    "pass_through": "gateway.providers.openai_compat:OpenAICompatibleProvider",
    "mock": "gateway.providers.mock:MockProvider",
    "litellm": "gateway.providers.litellm_provider:LiteLLMProvider",
    "anthropic": "gateway.providers.anthropic_native:AnthropicProvider",
}


def _make(kind: str) -> Provider:
    module, _, attr = FACTORIES[kind].partition(":")
    return getattr(importlib.import_module(module), attr)()


class ProviderRegistry:
    """One shared instance per kind. `overrides` (provider name -> instance) put a provider of your own behind a
    `provider:` name: a `HandlerProvider` in tests, or an embedder's client."""

    def __init__(self, overrides: Mapping[str, Provider] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._by_kind: dict[str, Provider] = {}

    def for_deployment(self, d: "ModelConfig", operation: str = "chat") -> Provider:
        p = self._overrides.get(d.provider)
        if p is not None:
            return p
        kind = kind_of(d.provider, operation)
        p = self._by_kind.get(kind)
        if p is None:
            p = self._by_kind[kind] = _make(kind)
        return p

    def translates(self, models: Iterable["ModelConfig"]) -> bool:
        """Does any of these deployments go through litellm (whose import costs seconds: pay it at start-up)?"""
        return any(m.provider not in self._overrides and kind_of(m.provider) == "litellm" for m in models)

    async def aclose(self) -> None:
        for p in (*self._by_kind.values(), *self._overrides.values()):
            close = getattr(p, "aclose", None)
            if close is not None:
                await close()
        self._by_kind.clear()
