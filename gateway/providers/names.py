"""Provider names, and what they mean for routing: which are OpenAI-compatible (the body goes through as bytes)
with their default base URLs, and which kind of implementation serves a name. A leaf: config validation and the
provider registry both read it."""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Protocol
from urllib.parse import urlsplit

__all__ = ["PASS_THROUGH", "ANTHROPIC_NATIVE", "kind_of", "base_url", "server_address", "unknown_providers"]

# OpenAI-compatible providers and their default base URLs ("" = the deployment must give base_url)
PASS_THROUGH: Mapping[str, str] = {
    "openai": "https://api.openai.com/v1",
    "azure": "",
    "vllm": "",
    "openai_compatible": "",
    "ollama": "http://127.0.0.1:11434/v1",
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "mistral": "https://api.mistral.ai/v1",
    "together_ai": "https://api.together.xyz/v1",
    "fireworks_ai": "https://api.fireworks.ai/inference/v1",
    "openrouter": "https://openrouter.ai/api/v1",
}


# Anthropic-compatible providers (their Messages API takes `POST /v1/messages` as it is) and their default base URLs
ANTHROPIC_NATIVE: Mapping[str, str] = {"anthropic": "https://api.anthropic.com"}


class Deployment(Protocol):  # a config.ModelConfig, as far as names go
    provider: str
    base_url: str | None


def kind_of(provider: str, operation: str = "chat") -> str:
    """`pass_through`, `mock` or `litellm`; for Anthropic's Messages API (`operation` messages) `anthropic` where
    the provider speaks it, else `litellm` (which translates it for any provider)."""
    if provider == "mock":
        return "mock"
    if operation == "messages":
        return "anthropic" if provider in ANTHROPIC_NATIVE else "litellm"
    return "pass_through" if provider in PASS_THROUGH else "litellm"


def base_url(d: Deployment) -> str:
    return (d.base_url or PASS_THROUGH.get(d.provider) or ANTHROPIC_NATIVE.get(d.provider, "")).rstrip("/")


def server_address(d: Deployment) -> tuple[str, int | None]:
    parts = urlsplit(base_url(d))
    return parts.hostname or "", parts.port


def unknown_providers(providers: Iterable[str]) -> set[str]:
    """The names neither tagway nor litellm serves. litellm (seconds to import) is imported only when a name is not
    one of ours; its own list decides, so a provider litellm adds needs no change here."""
    rest = {p for p in providers if p != "mock" and p not in PASS_THROUGH and p not in ANTHROPIC_NATIVE}
    if not rest:
        return set()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price list at import
    import litellm  # noqa: PLC0415

    known = {getattr(p, "value", p) for p in litellm.provider_list}
    return rest - known
