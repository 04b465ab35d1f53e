"""Provider names, and what they mean for routing: which are OpenAI-compatible (the body goes through as bytes)
with their default base URLs, and which kind of implementation serves a name. A leaf: config validation and the
provider registry both read it."""
from __future__ import annotations

from typing import Mapping, Protocol
from urllib.parse import urlsplit

__all__ = ["PASS_THROUGH", "kind_of", "base_url", "server_address"]

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


class Deployment(Protocol):  # a config.ModelConfig, as far as names go
    provider: str
    base_url: str | None


def kind_of(provider: str) -> str:
    """`pass_through`, `mock` or `litellm`."""
    if provider == "mock":
        return "mock"
    return "pass_through" if provider in PASS_THROUGH else "litellm"


def base_url(d: Deployment) -> str:
    return (d.base_url or PASS_THROUGH.get(d.provider, "")).rstrip("/")


def server_address(d: Deployment) -> tuple[str, int | None]:
    parts = urlsplit(base_url(d))
    return parts.hostname or "", parts.port
