"""Upstream providers behind one seam (`send(call)`): pass-through for OpenAI-compatible servers, litellm for
the rest, and a deterministic mock."""
from __future__ import annotations

from ..config import OPENAI_COMPATIBLE, ModelConfig
from .base import Provider, UpstreamCall, UpstreamFailure, UpstreamResponse, UpstreamStream
from .litellm_provider import LiteLLMProvider
from .mock import MockProvider
from .openai_compat import OpenAICompatibleProvider, server_address

__all__ = ["Provider", "Providers", "UpstreamCall", "UpstreamFailure", "UpstreamResponse", "UpstreamStream",
           "server_address"]


class Providers:
    """Picks the provider implementation for a deployment; one shared instance of each."""

    def __init__(self) -> None:
        self.openai = OpenAICompatibleProvider()
        self.mock = MockProvider()
        self.litellm = LiteLLMProvider()

    def for_deployment(self, d: ModelConfig) -> Provider:
        if d.provider == "mock":
            return self.mock
        if d.provider in OPENAI_COMPATIBLE:
            return self.openai
        return self.litellm

    async def aclose(self) -> None:
        await self.openai.aclose()
