"""Model name -> deployment. Exact `models:` names first; then wildcard entries: `name: "openai/*"` serves every
name with that prefix and the rest is the upstream model (`model:` may be a template with one `*`, e.g.
`accounts/acme/models/*`); the longest prefix wins; `name: "*"` is the default upstream for any other name (and for
routes that carry no model). A deployment made for a wildcard match is the entry with the upstream model filled in;
it keeps the entry's name (the `deployment` recorded is the config entry) and is cached, so its fallback chain and
the provider's per-deployment state are computed once per model name. Pure lookups, O(1) for exact names.
"""
from __future__ import annotations

import re
from collections import OrderedDict

from .config import GatewayConfig, ModelConfig
from .providers.names import base_url, kind_of, server_address
from .routing import fallback_chain

__all__ = ["ModelRoutes", "is_wildcard", "wildcard_upstream", "wildcard_match_ok"]


def is_wildcard(name: str) -> bool:
    return name.endswith("*")


# What a wildcard's match may hold. It becomes the upstream model, which some providers put in a URL's path
# (Azure's deployment; Bedrock's and Vertex's model ids through litellm): a tenant's `az/gpt-4o/../admin` reached
# {base}/admin with the operator's key, past allowed_models' `az/gpt-4o*`. So: no `.`/`..` segment, none of
# `? # % \`, no whitespace or control character; and for Azure, whose deployment is one path segment, no `/`.
# Names like `meta-llama/Llama-3.1-8B`, `llama3:8b` and `ft:gpt-4o:org::id` stay valid.
_UNSAFE_MATCH = re.compile(r"[?#%\\\s\x00-\x1f\x7f]|(?:^|/)\.\.?(?:/|\Z)")


def wildcard_match_ok(entry: ModelConfig, rest: str) -> bool:
    return not _UNSAFE_MATCH.search(rest) and not (entry.provider == "azure" and "/" in rest)


def wildcard_upstream(entry: ModelConfig, requested: str) -> str:
    """The upstream model for `requested` served by wildcard `entry` (whose name's prefix it has)."""
    rest = requested[len(entry.name) - 1:]
    return (entry.model or "*").replace("*", rest, 1)


class ModelRoutes:
    def __init__(self, config: GatewayConfig, *, cache_size: int = 4096) -> None:
        self.config = config
        self._exact = {m.name: m for m in config.models if not is_wildcard(m.name)}
        wild = [m for m in config.models if is_wildcard(m.name)]
        self._prefixes = sorted(((m.name[:-1], m) for m in wild), key=lambda pm: len(pm[0]), reverse=True)
        self._chains = {m.name: fallback_chain(config, m) for m in self._exact.values()}
        self._addresses = {m.name: server_address(m)[0] for m in config.models}
        self._made: OrderedDict[str, tuple[ModelConfig, list[ModelConfig]]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def default(self) -> ModelConfig | None:
        """The `*` entry: the upstream for names nothing else serves and for routes without a model."""
        return next((m for p, m in self._prefixes if p == ""), None)

    def modelless(self) -> ModelConfig | None:
        """The upstream for a request that names no model (a Responses call with a stored prompt, a file, a
        batch): the `*` route, else the one OpenAI-compatible upstream there is (None: several, or none)."""
        d = self.default
        if d is not None:
            return d
        upstreams = {(base_url(m), m.api_key_env): m for m in self._exact.values()
                     if kind_of(m.provider) == "pass_through"}
        return next(iter(upstreams.values())) if len(upstreams) == 1 else None

    def entry_for(self, name: str) -> ModelConfig | None:
        """The config entry that serves `name` (exact or wildcard), without making a deployment."""
        m = self._exact.get(name)
        if m is not None:
            return m
        for prefix, m in self._prefixes:
            if name.startswith(prefix) and len(name) > len(prefix):
                # a match that could leave its place in the upstream's URL names no model (a 404, as unknown)
                return m if wildcard_match_ok(m, name[len(prefix):]) else None
        return None

    def resolve(self, name: str) -> ModelConfig | None:
        m = self._exact.get(name)
        if m is not None:
            return m
        hit = self._made.get(name)
        if hit is not None:
            return hit[0]
        entry = self.entry_for(name)
        if entry is None:
            return None
        d = entry.model_copy(update={"model": wildcard_upstream(entry, name)})
        self._made[name] = (d, fallback_chain(self.config, d))
        if len(self._made) > self._cache_size:
            self._made.popitem(last=False)
        return d

    def chain(self, name: str) -> list[ModelConfig]:
        """The deployment serving `name` and its fallbacks, in order ([] when nothing serves it)."""
        c = self._chains.get(name)
        if c is not None:
            return c
        if not name:
            d = self.modelless()
            return [d] if d is not None else []
        hit = self._made.get(name)
        if hit is None:
            if self.resolve(name) is None:
                return []
            hit = self._made[name]
        return hit[1]

    def address(self, d: ModelConfig) -> str:
        return self._addresses.get(d.name, "")
