"""Anthropic-compatible upstreams for Anthropic's Messages API (`POST /v1/messages` from Anthropic-SDK clients):
the body goes through as bytes, like the OpenAI pass-through, with Anthropic's auth (`x-api-key`) and an
`anthropic-version` when the client sent none. Chat completions to the same deployments still go through litellm.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import UpstreamCall, UpstreamResponse
from .names import base_url
from .openai_compat import OpenAICompatibleProvider, _Prepared, _Stream

if TYPE_CHECKING:
    from ..config import ModelConfig

__all__ = ["AnthropicProvider", "ANTHROPIC_VERSION"]

ANTHROPIC_VERSION = "2023-06-01"


class _AnthropicPrepared(_Prepared):
    def __init__(self, d: ModelConfig) -> None:
        super().__init__(d)
        root = base_url(d).removesuffix("/v1")  # Anthropic's base URL has no /v1; accept one that does
        self.url_prefix, self.query = root + "/v1", ""
        self.root, self.root_query = self.url_prefix, ""
        self.headers.pop("Authorization", None)
        if d.api_key:
            self.headers["x-api-key"] = d.api_key
        self.own = frozenset(k.lower().encode("latin-1") for k in self.headers)


class AnthropicProvider(OpenAICompatibleProvider):
    _prepared_type = _AnthropicPrepared

    async def send(self, call: UpstreamCall) -> UpstreamResponse | _Stream:
        if not any(k == b"anthropic-version" for k, _ in call.headers):
            call.headers = [*call.headers, (b"anthropic-version", ANTHROPIC_VERSION.encode())]
        return await super().send(call)
