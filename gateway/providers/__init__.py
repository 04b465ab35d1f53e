"""Upstream providers behind one seam (`send(call)`): pass-through for OpenAI-compatible servers, litellm for
the rest, a deterministic mock, and `HandlerProvider` (answers from a function) for tests. `ProviderRegistry`
says which serves a deployment."""
from __future__ import annotations

from .base import Provider, UpstreamCall, UpstreamFailure, UpstreamResponse, UpstreamStream
from .handler import HandlerProvider, Stream
from .names import PASS_THROUGH, kind_of, server_address
from .registry import ProviderRegistry

__all__ = ["Provider", "ProviderRegistry", "UpstreamCall", "UpstreamFailure", "UpstreamResponse", "UpstreamStream",
           "HandlerProvider", "Stream", "PASS_THROUGH", "kind_of", "server_address"]
