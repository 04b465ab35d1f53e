"""Configuration: one YAML file plus `TAGWAY_*` environment overrides (`__` nests: TAGWAY_STORAGE__DSN), validated
by pydantic at start-up and reported as one clear line per problem."""
from __future__ import annotations

import difflib
import itertools
import os
import re
import typing
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from exporters.dsn import anchor_storage_paths, embedded_dsn, is_http_url
from exporters.vocabulary import PRODUCTION_SOURCE, TAG_KEY_RE
from exporters.yamlfile import YamlFileError, load_mapping

from .providers.names import kind_of
from .redact import PatternError, compile_pattern

__all__ = ["GatewayConfig", "ModelConfig", "TenantConfig", "KeyConfig", "Taxonomy", "ShadowConfig", "ConfigError",
           "load_config"]

NAME_RE = TAG_KEY_RE  # customer names and taxonomy keys follow the tag-key rule


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MockConfig(_Strict):
    latency_ms: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    jitter_ms: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    error_status: int = Field(503, ge=400, le=599)  # an error the upstream answers with
    seed: int = 0
    reply: str | None = None  # fixed reply; default is a deterministic echo of the last user message
    stream_chunk_words: int = Field(3, ge=1)


class ModelConfig(_Strict):
    name: str  # the public name clients ask for
    provider: str = "openai"
    model: str | None = None  # upstream model name; defaults to `name`
    base_url: str | None = None
    api_key_env: str | None = None  # name of the env var holding the provider key (never the key itself)
    api_version: str | None = None  # azure
    timeout: float = Field(60.0, gt=0)  # seconds, whole call (non-stream) / between chunks (stream)
    connect_timeout: float = Field(5.0, gt=0)
    fallbacks: list[str] = []
    headers: dict[str, str] = {}
    # translated providers (litellm): drop the OpenAI parameters the provider has no equivalent for (presence_penalty,
    # seed, n... on Anthropic) instead of answering 400 unsupported_parameter
    drop_params: bool = False
    # pass-through streams (chat, completions): ask the upstream for its usage chunk (`stream_options.include_usage`)
    # so the call's tokens are counted. Left true, an upstream's first refusal of the field (a 400 naming
    # stream_options) turns it off for that model until a restart; false never sends it. Either way such streams'
    # tokens are estimated (gateway/usage_estimate.py)
    stream_usage: bool = True
    # override litellm's local price map; finite and not negative (an infinite or NaN price is no cost anyone can sum)
    input_cost_per_token: float | None = Field(None, ge=0, allow_inf_nan=False)
    output_cost_per_token: float | None = Field(None, ge=0, allow_inf_nan=False)
    mock: MockConfig | None = None

    @property
    def upstream_model(self) -> str:
        return self.model or self.name

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class BudgetConfig(_Strict):
    usd: float = Field(gt=0)  # spend per period (recorded cost of production calls)
    per: str = "month"  # month (calendar, UTC) or a duration: 1h, 1d, 7d, 30d (windows aligned to the epoch)
    soft: float = Field(0.8, gt=0, le=1)  # past this share of the budget, responses carry x-tagway-budget-warning

    @field_validator("per")
    @classmethod
    def _period(cls, v: str) -> str:
        if v != "month":
            from exporters.vocabulary import QueryInputError, parse_duration  # noqa: PLC0415

            try:
                parse_duration(v, "per")
            except QueryInputError as e:
                raise ValueError(f"{e} (or 'month')") from None
        return v


class ModelLimitsConfig(_Strict):
    rpm: int | None = Field(None, ge=1)  # requests per minute
    tpm: int | None = Field(None, ge=1)  # tokens (input + output) per minute
    budget: BudgetConfig | None = None


class LimitsConfig(ModelLimitsConfig):
    # limits on one model (the name clients ask for) beside the key's or tenant's own: {gpt-4o: {rpm: 60}}
    models: dict[str, ModelLimitsConfig] = {}


# a key's stored form, as `tagway keys create` writes it (gateway/auth.hash_key)
_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_KEY_HASH_ANY_CASE = re.compile(r"sha256:[0-9a-f]{64}", re.IGNORECASE)
KEY_HASH_FORM = "'sha256:' and 64 hex digits, as `tagway keys create` writes it"


def normal_key_hash(value: Any) -> Any:
    """A hash written with capital hex digits or spaces around it is the same hash: stored as hash_key writes it."""
    if isinstance(value, str) and _KEY_HASH_ANY_CASE.fullmatch(value.strip()):
        return "sha256:" + value.strip()[7:].lower()
    return value


def key_hash_ok(value: str | None) -> bool:
    """A stored hash that some key can match (anything else, a pasted key or a cut digest, never authenticates)."""
    return isinstance(value, str) and _KEY_HASH.fullmatch(value) is not None


class KeyConfig(_Strict):
    id: str
    hash: str  # "sha256:<hex>" of the key; the key itself is never stored
    customer: str | None = None  # set when the key lives in the keys file rather than under a tenant
    revoked: bool = False
    created_at: str | None = None
    tags: dict[str, str] = {}  # key-bound tags: the highest authority
    limits: LimitsConfig | None = None  # this key's rate limits and budget

    _hash = field_validator("hash", mode="before")(normal_key_hash)


class TenantConfig(_Strict):
    customer: str
    allowed_models: list[str] = ["*"]
    may_set_customer: bool = False  # e.g. a platform key that serves many customers
    capture_content: bool = True
    tags: dict[str, str] = {}  # tenant-bound tags, e.g. {intent: support}
    keys: list[KeyConfig] = []
    limits: LimitsConfig | None = None  # the tenant's rate limits and budget, over all its keys
    shadow: bool = True  # false: none of this tenant's calls is mirrored to a shadow candidate
    # provider resource ids made outside the gateway (uploaded straight to the provider, before tagway recorded
    # owners) that this tenant's keys may reach and list (api.tenant_resources: isolated): nobody's are refused
    resources: list[str] = []

    def allows(self, model: str) -> bool:
        allowed = self.allowed_models
        if "*" in allowed or model in allowed:
            return True
        return any("*" in p and fnmatchcase(model, p) for p in allowed)  # fnmatch caches compiled patterns


class TagRule(_Strict):
    values: list[str] | None = None  # None = any value


class Taxonomy(_Strict):
    keys: dict[str, TagRule] = {}  # known keys (customer/intent/prompt_version may list values too)
    required: list[str] = []
    unknown: Literal["keep", "drop", "reject"] = "keep"  # what an unknown key or value gets


class ShadowConfig(_Strict):
    """Mirror a sample of live calls to a candidate model (gateway/shadow.py), off the request path: the client is
    answered by production; the copy is recorded with source `shadow` and the live call's trace id as its case id."""
    model: str  # a configured model name (or one a wildcard route serves)
    sample: float = Field(ge=0.0, le=1.0)  # share of matching live calls mirrored
    where: dict[str, str] = {}  # customer, intent, prompt_version, model (as requested) or tag.<key> -> value
    max_rps: float = Field(5.0, gt=0)  # shadow calls started per second, at most
    queue: int = Field(100, ge=1)  # sampled calls waiting to be sent; past it a sampled call is dropped (counted)
    max_in_flight: int = Field(16, ge=1)  # shadow calls waiting on the candidate at once (a hanging upstream)
    evaluators: list[dict[str, Any]] = []  # default evaluators for `tagway replay report --shadow` (not run here)

    @field_validator("where")
    @classmethod
    def _where_keys(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            bare = k.removeprefix("tag.")
            if k not in SHADOW_WHERE_KEYS and not (k.startswith("tag.") and TAG_KEY_RE.match(bare)):
                raise ValueError(f"unknown key {k!r}: use {', '.join(SHADOW_WHERE_KEYS)} or tag.<key>")
        return v


SHADOW_WHERE_KEYS = ("customer", "intent", "prompt_version", "model")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)  # 0: any free port (said at start)
    # SIGTERM: calls in flight get this long to finish (streams of long generations: raise it, with the pod's
    # terminationGracePeriodSeconds above it); past it they are cancelled, and recorded as such
    graceful_shutdown_seconds: float = Field(60.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1)
    # the request line and headers: a larger head is a 431 before any of it is buffered past this (the SDKs send
    # ~1 KiB; an unauthenticated client's 40 MB header block was read whole)
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    max_model_chars: int = Field(256, ge=1)  # a longer model name is refused (400), never cut
    replay_concurrency: int = Field(4, ge=0)  # replay/judge calls in flight at once (gateway/lanes.py); 0 = no cap
    # browser apps (openai-node's dangerouslyAllowBrowser) on these origins may call /v1 (CORS); "*" for any.
    # Empty: no CORS headers, and a browser's preflight is refused as before.
    cors_allow_origins: list[str] = []

    @field_validator("cors_allow_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        out = []
        for origin in v:
            # browsers send the origin lower-case, compared as a string: no wildcard or user inside it
            o = origin.strip().rstrip("/").lower()
            if o != "*" and not re.fullmatch(r"https?://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?", o):
                raise ValueError(f"{origin!r} is not an origin: scheme://host[:port] (no path, no wildcard in the "
                                 "host), or * alone")
            out.append(o)
        return out

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        # an empty host binds every interface: a templated value that came out empty must not expose the gateway
        if not v.strip():
            raise ValueError("empty: give an address (127.0.0.1 for this machine only, 0.0.0.0 for every interface)")
        return v.strip()


class DashboardConfig(_Strict):
    """Limits of the dashboard's and the read API's interactive queries: ClickHouse stops a query past them and the
    page says what to narrow, instead of spinning."""
    query_seconds: float = Field(10.0, gt=0)
    search_seconds: float = Field(20.0, gt=0)  # free-text search reads the captured content of the whole window
    search_max_rows: int = Field(0, ge=0)  # rows a search may read; 0 = no limit


class StorageConfig(_Strict):
    data_dir: str = "./tagway-data"
    dsn: str | None = None  # default chdb:///<data_dir>/clickhouse
    spool_dir: str | None = None  # default <data_dir>/spool
    database: str = ""
    cluster: str = ""
    ttl_days: int = Field(0, ge=0)
    # reads (stats, dashboard, the CLI through the gateway, budgets) use clients of their own, with limits
    query_concurrency: int = Field(2, ge=1, le=64)  # statements at once; more wait their turn
    query_max_seconds: float = Field(30.0, gt=0)
    query_max_memory_bytes: int = Field(4 << 30, ge=64 << 20)
    query_max_threads: int = Field(0, ge=0)  # 0: half the cores
    # rollups (exporters.rollups): their own TTL, and the tag keys rolled up (None: the taxonomy keys that list
    # their values, a bounded vocabulary; list only keys with few values)
    rollup_ttl_days: int = Field(0, ge=0)
    rollup_tag_keys: list[str] | None = None

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        # a scheme no driver speaks would start a gateway that spools for ever, "degraded until it answers"
        if v is None:
            return v
        v = v.strip()
        if not v:  # a Secret's empty value: the embedded store instead of the server, unsaid
            raise ValueError("empty: leave it out to use the embedded store under data_dir, or give a DSN")
        scheme, sep, _ = v.partition("://")
        if not sep or scheme not in ("chdb", "http", "https"):  # lower case, as every reader of a DSN expects it
            raise ValueError("unsupported DSN: use chdb:///path/to/dir (embedded), "
                             "http://user:password@host:8123/database or https://... (a ClickHouse server)")
        return v

    def resolved_dsn(self) -> str:
        return self.dsn or embedded_dsn(self.data_dir)  # the one helper replay and stats use too

    def resolved_spool(self) -> str:
        return self.spool_dir or os.path.abspath(os.path.join(self.data_dir, "spool"))


class RecordingConfig(_Strict):
    enabled: bool = True
    capture_content: bool = True  # global switch; a tenant can turn it off for itself
    capture_max_chars: int = Field(200_000, ge=0)  # captured text per call; longer content is cut, and says so
    capture_max_message_chars: int = Field(50_000, ge=0)  # and per string (one message part, one parameter)
    max_user_chars: int = Field(256, ge=1)  # the body's `user`, as recorded (cut with the original length noted)
    redact_builtin: list[Literal["email", "card", "bearer"]] = ["email", "card", "bearer"]
    redact_patterns: list[str] = []
    # Big, few inserts: each costs chDB ~50-100 ms of CPU whatever its size (the views' query analysis, a part per
    # table, their merges), so under load the window sets the cost (bench: 5 s vs 2 s, 8% less CPU a call). 5 s is
    # the OpenTelemetry batch processor's default too. Local CLI commands do not wait for it (they flush first).
    batch_max_rows: int = Field(20_000, ge=1)
    batch_max_seconds: float = Field(5.0, gt=0)
    queue_max: int = Field(50_000, ge=100)
    # memory and disk are capped by bytes too: rows with big captured content are not interchangeable with small
    queue_max_bytes: int = Field(256 << 20, ge=1 << 20)  # encoded spans in memory; past it, the oldest go to the spool
    # one insert; 32 MiB lets a 5 s window of ~3 KB spans fill at ~2,500 calls/s (a 16 MiB cap cut it at ~5,500 rows)
    batch_max_bytes: int = Field(32 << 20, ge=64 << 10)
    spool_max_bytes: int = Field(5 << 30, ge=0)  # pending spool files (0: no cap)
    spool_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest"  # what goes when the spool is full (counted)
    poison_attempts: int = Field(3, ge=1)  # refusals of a batch's rows before the refused rows are set aside
    # ended spans reach the write-ahead log within this: the most a SIGKILL or OOM kill can lose
    flush_interval_ms: int = Field(100, ge=10, le=10_000)
    write_ahead: bool = True
    service_name: str = "tagway"
    source: str = PRODUCTION_SOURCE  # tagway.source when the request does not say

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> "RecordingConfig":
        if self.batch_max_rows > self.queue_max:
            raise ValueError(f"batch_max_rows ({self.batch_max_rows}) cannot exceed queue_max ({self.queue_max})")
        if self.spool_max_bytes and self.spool_max_bytes < self.batch_max_bytes:  # no full batch would ever fit
            raise ValueError(f"spool_max_bytes ({self.spool_max_bytes}) is below batch_max_bytes "
                             f"({self.batch_max_bytes}): a full batch could never be spooled (0 = no cap)")
        return self

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                compile_pattern(p)
            except PatternError as e:
                raise ValueError(f"redact {e}") from None
        return v


class FeedbackConfig(_Strict):
    """POST /v1/tagway/feedback (gateway/feedback_api.py): ratings per minute per key (a token bucket: a burst of
    `per_minute`, then refilled evenly), and the longest comment kept."""
    per_minute: int = Field(120, ge=1)
    max_comment_chars: int = Field(4000, ge=0, le=100_000)


class MetricsConfig(_Strict):
    auth: bool = False  # /metrics answers only with the admin key (Authorization: Bearer ...)
    customer_label: bool = False  # a `customer` label on the call counters of /metrics (one series per customer)
    customer_label_limit: int = Field(100, ge=1)  # customers past this many share the label value `other`


class CooldownConfig(_Strict):
    """A deployment that failed this many times in a row, in ways a fallback takes over, is passed over for its
    fallbacks for `seconds` (gateway/cooldowns.py); 0 failures: never."""
    after_failures: int = Field(3, ge=0)
    seconds: float = Field(30.0, gt=0)


class AccessLogConfig(_Strict):
    enabled: bool = True  # `tagway serve` writes one line per /v1 call to stderr (never content or keys)
    format: Literal["text", "json"] = "text"  # logfmt-style key=value, or one JSON object per line


class ApiConfig(_Strict):
    """How tagway speaks the providers' APIs beyond the body: which headers cross it, and what /v1/models lists."""
    # client -> upstream (case-insensitive names; `prefix-*` matches a family). Never tagway's own or auth headers.
    forward_headers: list[str] = ["openai-beta", "idempotency-key", "openai-organization", "openai-project",
                                  "anthropic-version", "anthropic-beta"]
    # upstream -> client, beside tagway's own x-tagway-* (request ids for support tickets, rate-limit state, and the
    # retry advice SDKs follow: retry-after, x-should-retry)
    return_headers: list[str] = ["x-request-id", "request-id", "x-ratelimit-*", "retry-after", "retry-after-ms",
                                 "x-should-retry", "openai-processing-ms", "openai-version", "anthropic-ratelimit-*"]
    list_upstream_models: bool = False  # /v1/models also lists what wildcard routes' upstreams serve
    upstream_models_ttl: float = Field(300.0, gt=0)  # seconds an upstream's model list is cached
    # files, batches, responses and stored completions live on the provider account the deployments share:
    # `isolated`, a tenant key reaches (and lists) only those its tenant created through the gateway
    # (gateway/resources.py); `shared`, any key reaches any of them, as the account's own keys do
    tenant_resources: Literal["isolated", "shared"] = "isolated"

    @field_validator("forward_headers", "return_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        out = []
        for name in v:
            n = name.strip().lower()
            if not re.fullmatch(r"[a-z0-9!#$%&'+.^_`|~-]+\*?", n):
                raise ValueError(f"{name!r} is not a header name (a trailing * matches a family)")
            if n in ("authorization", "api-key", "x-api-key", "host", "content-length", "content-type",
                     "transfer-encoding", "connection") or n.startswith("x-tagway-"):
                raise ValueError(f"{name!r} is tagway's or the connection's own header and cannot be passed through")
            out.append(n)
        return out


class GatewayConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TAGWAY_", env_nested_delimiter="__", extra="forbid")
    _config_file: str | None = PrivateAttr(None)  # the file load_config read, if any
    # set by `tagway serve` and `tagway db migrate` (the operator's own commands): their config file states the
    # retention whole; any other process that loads a config (an in-process gateway of a replay or a pytest gate)
    # applies only the TTLs it sets
    _states_retention: bool = PrivateAttr(False)

    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    recording: RecordingConfig = RecordingConfig()
    metrics: MetricsConfig = MetricsConfig()
    dashboard: DashboardConfig = DashboardConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    admin_key_env: str = "TAGWAY_ADMIN_KEY"
    admin_key_hash: str | None = None  # "sha256:<hex>" of the admin key, instead of the key in admin_key_env
    keys_file: str | None = None  # where `tagway keys create` stores hashes; default beside the config file
    models: list[ModelConfig] = []
    tenants: list[TenantConfig] = []
    taxonomy: Taxonomy = Taxonomy()
    access_log: AccessLogConfig = AccessLogConfig()
    api: ApiConfig = ApiConfig()
    shadow: list[ShadowConfig] = []
    cooldown: CooldownConfig = CooldownConfig()

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple:
        # The YAML file arrives as init values; the environment overrides it (12-factor deployments).
        return env_settings, init_settings

    _admin_hash = field_validator("admin_key_hash", mode="before")(normal_key_hash)

    @model_validator(mode="after")
    def _cross_checks(self) -> "GatewayConfig":
        problems: list[str] = []
        if self.admin_key_hash is not None and not key_hash_ok(self.admin_key_hash):
            problems.append("admin_key_hash: must be 'sha256:' and 64 hex digits, as `tagway keys admin` prints it "
                            "(no admin key could ever match this one)")
        names = [m.name for m in self.models]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"models: duplicate model name {dup!r}")
        known = set(names)
        wildcards = [n[:-1] for n in names if n.endswith("*")]
        for i, m in enumerate(self.models):
            if "*" in m.name and (m.name.count("*") > 1 or not m.name.endswith("*")):
                problems.append(f"models[{i}] ({m.name}).name: a wildcard ends in one * ('openai/*', or '*')")
            elif m.name.endswith("*") and m.model is not None and m.model.count("*") != 1:
                problems.append(f"models[{i}] ({m.name}).model: a wildcard's model has one * (the matched rest), "
                                f"e.g. '*' or 'accounts/acme/models/*'")
            for fb in m.fallbacks:
                if fb.endswith("*"):
                    problems.append(f"models[{i}] ({m.name}).fallbacks: {fb!r} is a wildcard, name a model")
                elif fb not in known:
                    problems.append(f"models[{i}] ({m.name}).fallbacks: unknown model {fb!r}")
                if fb == m.name:
                    problems.append(f"models[{i}] ({m.name}).fallbacks: a model cannot fall back to itself")
            if m.provider == "mock":
                continue
            if m.base_url is not None and not is_http_url(m.base_url):
                problems.append(f"models[{i}] ({m.name}).base_url: {m.base_url!r} is not an http(s) URL, e.g. "
                                "http://10.0.0.5:8000/v1")
            if m.provider == "azure" and not (m.base_url and m.api_version):
                problems.append(f"models[{i}] ({m.name}): azure needs base_url and api_version")
            if kind_of(m.provider) == "litellm" and "/" in (m.model or ""):
                problems.append(f"models[{i}] ({m.name}).model: give the upstream name without a provider prefix")
        customers = [t.customer for t in self.tenants]
        for dup in sorted({c for c in customers if customers.count(c) > 1}):
            problems.append(f"tenants: duplicate customer {dup!r}")
        key_ids: list[str] = []
        first_hash: dict[str, str] = {}  # a key's hash -> where it is first written
        for i, t in enumerate(self.tenants):
            if not NAME_RE.match(t.customer):
                problems.append(f"tenants[{i}].customer: {t.customer!r} must match [a-z0-9_.-]{{1,64}}")
            for m in t.allowed_models:  # names, or glob patterns ('openai/gpt-4o*') checked per call
                if "*" not in m and m not in known and not any(m.startswith(w) for w in wildcards):
                    problems.append(f"tenants[{i}] ({t.customer}).allowed_models: unknown model {m!r}")
            for j, k in enumerate(t.keys):
                key_ids.append(k.id)
                if not key_hash_ok(k.hash):
                    problems.append(f"tenants[{i}] ({t.customer}).keys: key {k.id!r} hash must be {KEY_HASH_FORM}")
                if k.hash in first_hash:  # whose tenant the key is would be the last entry's say
                    problems.append(f"tenants[{i}] ({t.customer}).keys[{j}]: key {k.id!r} is the same key as "
                                    f"{first_hash[k.hash]} (keep one entry per key)")
                else:
                    first_hash[k.hash] = f"tenants[{i}].keys[{j}] ({k.id!r})"
        for dup in sorted({k for k in key_ids if key_ids.count(k) > 1}):
            problems.append(f"tenants: duplicate key id {dup!r}")
        granted: dict[str, str] = {}  # a resource id -> the tenant it is first granted to
        for i, t in enumerate(self.tenants):
            for rid in t.resources:
                if granted.setdefault(rid, t.customer) != t.customer:
                    problems.append(f"tenants[{i}] ({t.customer}).resources: {rid!r} is granted to "
                                    f"{granted[rid]!r} too (a resource has one owner)")
        for i, sh in enumerate(self.shadow):
            if sh.model not in known and not any(sh.model.startswith(w) for w in wildcards):
                problems.append(f"shadow[{i}].model: unknown model {sh.model!r} (shadow to a configured model)")
        shadowed = [sh.model for sh in self.shadow]
        for dup in sorted({m for m in shadowed if shadowed.count(m) > 1}):
            problems.append(f"shadow: two rules mirror to {dup!r} (give one rule per candidate)")
        for k in self.taxonomy.keys:
            if not NAME_RE.match(k):
                problems.append(f"taxonomy.keys: {k!r} must match [a-z0-9_.-]{{1,64}}")
        for k in self.storage.rollup_tag_keys or ():
            if not NAME_RE.match(k):
                problems.append(f"storage.rollup_tag_keys: {k!r} must match [a-z0-9_.-]{{1,64}}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model(self, name: str) -> ModelConfig | None:
        return self._models_by_name().get(name)

    def rollup_tag_keys(self) -> tuple[str, ...]:
        """The tag keys the tag rollup holds: storage.rollup_tag_keys, else the taxonomy's keys with listed values
        (customer, intent and prompt_version are columns, rolled up anyway)."""
        if self.storage.rollup_tag_keys is not None:
            return tuple(sorted(set(self.storage.rollup_tag_keys)))
        columns = ("customer", "intent", "prompt_version")
        return tuple(sorted(k for k, rule in self.taxonomy.keys.items() if rule.values and k not in columns))

    def states_retention(self) -> "GatewayConfig":
        """Mark this config as the gateway's own (`serve`, `db migrate`): its file states the retention whole."""
        self._states_retention = True
        return self

    def schema_settings(self) -> Any:
        """The store's schema settings (exporters.schema.SchemaSettings) from storage and taxonomy."""
        from exporters.schema import SchemaSettings  # noqa: PLC0415 - config stays light to import

        s = self.storage
        # The gateway's config file states the retention, a TTL it leaves out included (0: kept for ever): a line
        # removed from it is a TTL removed at the next start (`serve`, `db migrate`). Otherwise only what the file
        # or the environment sets is applied, so a command run on other settings never removes a TTL.
        ttls = ("ttl_days", "rollup_ttl_days")
        return SchemaSettings(database=s.database, cluster=s.cluster, ttl_days=s.ttl_days,
                              rollup_ttl_days=s.rollup_ttl_days, rollup_tag_keys=self.rollup_tag_keys(),
                              apply_retention=ttls if self._config_file and self._states_retention else tuple(
                                  f for f in ttls if f in s.model_fields_set))

    def _models_by_name(self) -> dict[str, ModelConfig]:
        cache = self.__dict__.get("_by_name_cache")
        if cache is None:
            cache = {m.name: m for m in self.models}
            self.__dict__["_by_name_cache"] = cache
        return cache

    def tenant(self, customer: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.customer == customer), None)


def _format_errors(e: ValidationError, path: str | os.PathLike | None = None,
                   file_keys: frozenset[str] = frozenset()) -> list[str]:
    """One line per problem naming where it is: `<file>: models[0].timeout: ...`, or the environment variable
    family when the setting came from there (`$TAGWAY_SERVER__*: server.port: ...`)."""
    out = []
    for err in e.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        top = str(err["loc"][0]) if err["loc"] else ""
        env_prefix = f"TAGWAY_{top.upper()}"
        # the variable of this very setting, or of the list holding it (TAGWAY_TENANTS='[...]': a list is read whole;
        # a section's variable is merged with the file's section, so the value may be the file's)
        names = list(itertools.takewhile(lambda p: isinstance(p, str), err["loc"]))
        var = "TAGWAY_" + "__".join(names).upper()
        exact = var if names and any(k.upper() == var for k in os.environ) else None
        if exact:  # set in both: the environment's value is the one read
            where = f"${exact}: "
        elif top and top not in file_keys and (family := sorted(
                k for k in os.environ if k.upper() == env_prefix or k.upper().startswith(env_prefix + "__"))):
            # the one variable of the section that is set, or the family when several are
            where = f"${family[0]}: " if len(family) == 1 else f"${env_prefix}__*: "
        else:
            where = f"{path}: " if path else ""
        # cross-checks arrive as one message joined with "; "
        out += [f"{where}{loc}: {m}" if loc else f"{where}{m}" for m in msg.split("; ")]
    return out


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> GatewayConfig:
    """Load the YAML file at `path` (or $TAGWAY_CONFIG, or built-in defaults when neither is given), apply env
    overrides, validate. Raises ConfigError with one line per problem, each naming the file (or environment
    variable) and the setting."""
    path = path or os.environ.get("TAGWAY_CONFIG")
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            loaded = load_mapping(p)
        except YamlFileError as e:
            raise ConfigError([str(e)]) from None
        data = loaded
        # relative paths in the file are relative to the file, whatever directory the command runs in
        base = p.resolve().parent
        keys_file = data.get("keys_file")
        data["keys_file"] = str(base / keys_file) if isinstance(keys_file, str) and keys_file \
            else str(base / (p.stem + ".keys.yaml"))
        if isinstance(data.get("storage"), dict):
            data["storage"] = anchor_storage_paths(data["storage"], base)
    file_keys = frozenset(data)
    data.update(overrides)
    named = {v for v in _env_names(data) if isinstance(v, str)}  # the variables the config names (*_env)
    unknown = _unknown_sections({k: v for k, v in os.environ.items() if k not in named})
    indexed = _indexed_variables(k for k in os.environ if k not in named)
    if indexed:  # read as a mapping {"0": ...} that replaces the list: its errors would blame the file
        raise ConfigError(unknown + indexed)
    try:
        cfg = GatewayConfig(**data)
    except ValidationError as e:
        raise ConfigError(unknown + _format_errors(e, path, file_keys)) from None
    except SettingsError as e:  # a variable holding a list or a section is read as JSON, and this one is not JSON
        raise ConfigError(unknown + _env_json_errors(e)) from None
    if unknown:
        raise ConfigError(unknown)
    cfg._config_file = str(path) if path else None
    return cfg


def _env_json_errors(e: SettingsError) -> list[str]:
    """pydantic-settings names only the section whose variable was not JSON: name the variable(s) too."""
    m = re.search(r'field "(\w+)"', str(e))
    section = m.group(1) if m else ""
    cause = e.__cause__ or e.__context__
    why = f" ({cause})" if isinstance(cause, ValueError) else ""
    prefix = f"TAGWAY_{section.upper()}"
    bad = []
    for var in sorted(v for v in os.environ if v.upper() == prefix or v.upper().startswith(prefix + "__")):
        try:
            orjson.loads(os.environ[var])
        except orjson.JSONDecodeError:
            bad.append(var)
    # the section's own variable is JSON; a nested one only when its setting holds a list, a mapping or a section
    bad = [v for v in bad if v.upper() == prefix] or [v for v in bad if _json_setting(section, v)] or [prefix]
    return [f"${v}: {v[len('TAGWAY_'):].lower().replace('__', '.')}: not valid JSON{why}; a setting that holds a list "
            "or a section is given as JSON ('[...]' or '{...}')" for v in bad]


def _json_setting(section: str, var: str) -> bool:
    """Whether the setting `var` names (TAGWAY_SECTION__NAME) is read as JSON: a list, a mapping or a section."""
    field = GatewayConfig.model_fields.get(section)
    sub = var.split("__", 1)[1].lower() if "__" in var else ""
    model = field.annotation if field is not None else None
    inner = model.model_fields.get(sub) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if inner is None:
        return True  # not a setting we can see: keep it named
    kinds = [inner.annotation, *typing.get_args(inner.annotation)]
    return any(typing.get_origin(k) in (list, dict, tuple, set) or (isinstance(k, type) and issubclass(k, BaseModel))
               for k in kinds)


def _env_names(data: Any) -> Iterator[Any]:
    """The values of every `*_env` setting in the raw config (api_key_env, admin_key_env, ...): variables it names
    to read secrets from, whatever they are called (TAGWAY_OPENAI__KEY is a key, not a settings section)."""
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and k.endswith("_env"):
                yield v
            else:
                yield from _env_names(v)
    elif isinstance(data, list):
        for v in data:
            yield from _env_names(v)


def _indexed_variables(names: Iterable[str]) -> list[str]:
    """`TAGWAY_MODELS__0__TIMEOUT`: pydantic-settings cannot set one item of a list; it reads a mapping that
    replaces the whole list. Said as what it is, naming the variable to use instead."""
    out = []
    for var in sorted(names):
        parts = var.split("__")
        index = next((i for i, p in enumerate(parts) if i and p.isdigit()), None)  # the first list index
        if not var.upper().startswith("TAGWAY_") or index is None:
            continue
        head = "__".join(parts[:index])
        out.append(f"${var}: {head[len('TAGWAY_'):].lower().replace('__', '.')}: a list's items cannot be set one by "
                   f"one; set ${head.upper()} to the whole list as JSON ('[...]')")
    return out


def _unknown_sections(environ: Mapping[str, str]) -> list[str]:
    """A `TAGWAY_X__Y` variable whose section X is no setting would be ignored without a word (pydantic-settings
    reads only the sections it knows): TAGWAY_ACCESSLOG__ENABLED=false would leave the access log on."""
    sections = {name.upper(): name for name in GatewayConfig.model_fields}
    out = []
    for var in sorted(environ):
        if not var.upper().startswith("TAGWAY_") or "__" not in var[len("TAGWAY_"):]:
            continue
        section = var[len("TAGWAY_"):].split("__", 1)[0].upper()
        if section in sections:
            continue
        near = difflib.get_close_matches(section.lower(), list(sections.values()), n=1, cutoff=0.6)
        hint = f" (did you mean $TAGWAY_{near[0].upper()}__...?)" if near else ""
        out.append(f"${var}: {section.lower()}: unknown settings section{hint}")
    return out
