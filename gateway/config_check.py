"""`tagway config check`: what a valid config still gets wrong at run time, said before the gateway starts.

`findings(...)` is pure (the config, its path, the environment, and the result of probing the store) and returns
one `Finding` per problem, each naming the setting and what to do; `probe_store` and `probe_spool` are its I/O.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from .config import GatewayConfig, KeyConfig
from .providers.names import kind_of

__all__ = ["Finding", "findings", "orphan_keys", "unpriced_budgets", "limits_on_unknown_models", "probe_store",
           "probe_spool", "ADMIN_KEY_HOWTO"]

ADMIN_KEY_HOWTO = ("create one with `tagway keys admin` and set it in the gateway's environment "
                   "(export {env}=<key>), or put the admin_key_hash it prints in the config")


@dataclasses.dataclass(frozen=True)
class Finding:
    where: str  # the setting (or "config" for the file as a whole)
    problem: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.where}: {self.problem}" + (f"; {self.fix}" if self.fix else "")


def findings(cfg: GatewayConfig, path: str | None, env: Mapping[str, str], store_error: str | None,
             keys_without_tenant: Sequence[tuple[str, KeyConfig]] = (), spool_error: str | None = None,
             file_keys: Sequence[KeyConfig] = ()) -> list[Finding]:
    """`file_keys`: the keys file's keys (`tagway keys create/limits` write their limits there).
    `keys_without_tenant`: the keys file's active keys whose customer is no tenant, each with where it is
    (`gateway.auth.keys_without_tenant`)."""
    out: list[Finding] = []
    if not path:
        out.append(Finding("config", "no config file: running on built-in defaults (no models, no tenants)",
                           "pass --config tagway.yaml or set TAGWAY_CONFIG (`tagway demo` shows a complete setup)"))
    if not cfg.admin_key_hash and not env.get(cfg.admin_key_env):
        out.append(Finding("admin_key_env", f"${cfg.admin_key_env} is not set: no admin key, so the admin API, "
                           "the /ui dashboard and replays through the gateway cannot authenticate",
                           ADMIN_KEY_HOWTO.format(env=cfg.admin_key_env)))
    if not cfg.models:
        out.append(Finding("models", "no models: every call gets 404 model_not_found",
                           "add at least one entry under models:"))
    for i, m in enumerate(cfg.models):
        if m.api_key_env and not env.get(m.api_key_env):
            out.append(Finding(f"models[{i}] ({m.name}).api_key_env",
                               f"${m.api_key_env} is not set: {m.provider} will refuse calls to {m.name}",
                               f"export {m.api_key_env}=<the provider key>"))
        if m.drop_params and kind_of(m.provider) != "litellm":
            out.append(Finding(f"models[{i}] ({m.name}).drop_params",
                               f"has no effect: {m.provider} is passed the request as it is sent, not translated, "
                               "so its own API answers a parameter it does not take", "remove it"))
        if not m.stream_usage and kind_of(m.provider) != "pass_through":
            out.append(Finding(f"models[{i}] ({m.name}).stream_usage",
                               f"has no effect: {m.provider} is not passed the request as it is sent, and its "
                               "translation always counts a stream's tokens", "remove it"))
    if not cfg.tenants:
        out.append(Finding("tenants", "no tenants: only the admin key can make calls",
                           "add a tenant (customer: name), then `tagway keys create --customer name`"))
    out += orphan_keys(keys_without_tenant)
    out += unpriced_budgets(cfg, file_keys)
    out += limits_on_unknown_models(cfg, file_keys)
    if store_error:
        out.append(Finding("storage.dsn" if cfg.storage.dsn else "storage.data_dir", store_error,
                           "the gateway would start and spool every call to disk until the store takes them"
                           if cfg.storage.dsn else "choose a data_dir this user can write"))
    if spool_error and not (store_error and not cfg.storage.spool_dir):  # under data_dir: said just above
        out.append(Finding("storage.spool_dir" if cfg.storage.spool_dir else "storage.data_dir", spool_error,
                           "`tagway serve` refuses to start without a spool; choose a directory this user can write"))
    return out


def unpriced_budgets(cfg: GatewayConfig, file_keys: Sequence[KeyConfig] = ()) -> list[Finding]:
    """Budgets over models that have no price (in the config or litellm's map): their calls carry no cost, so the
    budget never counts them (`tagway serve` names such models at start, but not the budgets they defeat)."""
    budgets = [(f"tenants[{i}] ({t.customer}).limits.budget", t) for i, t in enumerate(cfg.tenants)
               if t.limits is not None and t.limits.budget is not None]
    budgets += [(f"tenants[{i}] ({t.customer}).keys[{j}] ({k.id}).limits.budget", t) for i, t in enumerate(cfg.tenants)
                for j, k in enumerate(t.keys) if k.limits is not None and k.limits.budget is not None and not k.revoked]
    on_model = [(f"{where}.budget", name) for where, name, lim in _model_limits(cfg, file_keys)
                if lim.budget is not None]
    if not budgets and not on_model:
        return []
    from .pricing import Pricing  # noqa: PLC0415 - reads litellm's packaged price map: only when there are budgets

    unpriced = Pricing().unpriced(cfg.models)
    out = []
    for where, name in on_model:
        if any(m.name == name for m in unpriced):
            out.append(Finding(where, f"{name} has no price, so calls to it are recorded without a cost and this "
                               "budget never counts them", "set input_cost_per_token and output_cost_per_token on it"))
    for where, tenant in budgets:
        names = [m.name for m in unpriced if tenant.allows(m.name)]
        if names:
            out.append(Finding(where, f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no price, so "
                               "calls to it are recorded without a cost and this budget does not count them",
                               "set input_cost_per_token and output_cost_per_token on "
                               f"{'it' if len(names) == 1 else 'them'}, or leave it out of the tenant's "
                               "allowed_models"))
    return out


def _model_limits(cfg: GatewayConfig, file_keys: Sequence[KeyConfig] = ()) -> list[tuple[str, str, Any]]:
    """(where, model name, its limits) for every `limits.models` entry of the config's tenants and keys, and of the
    keys file's keys."""
    keys_file = os.path.basename(cfg.keys_file or "keys file")
    out = [(f"{keys_file}: key {k.id}.limits.models.{name}", name, lim) for k in file_keys
           if k.limits is not None and not k.revoked for name, lim in k.limits.models.items()]
    for i, t in enumerate(cfg.tenants):
        owners = [(f"tenants[{i}] ({t.customer}).limits", t.limits)]
        owners += [(f"tenants[{i}] ({t.customer}).keys[{j}] ({k.id}).limits", k.limits) for j, k in enumerate(t.keys)
                   if not k.revoked]
        out += [(f"{where}.models.{name}", name, lim) for where, limits in owners if limits is not None
                for name, lim in limits.models.items()]
    return out


def limits_on_unknown_models(cfg: GatewayConfig, file_keys: Sequence[KeyConfig] = ()) -> list[Finding]:
    """A limit on a model no `models:` entry serves (a typo, a renamed model) would never hold: say so."""
    from .model_routes import ModelRoutes  # noqa: PLC0415

    routes = ModelRoutes(cfg)
    return [Finding(where, unserved_model(name), "use the name clients ask for, as in `models:`")
            for where, name, _ in _model_limits(cfg, file_keys) if routes.entry_for(name) is None]


def unserved_model(name: str) -> str:
    return (f"no model {name!r} is served (no `models:` entry has that name or a wildcard that matches it), so this "
            "limit never applies")


def probe_store(cfg: GatewayConfig, timeout: float = 3.0) -> str | None:
    """Can the configured store be reached, and can the gateway's user record into it? A server DSN is connected to
    and pinged (an unreachable host, a wrong password, a server too old are all told here), and its schema read: a
    database or migrations the gateway would have to make, with a user who may not make them, are told too (asked
    without making anything). The embedded store's directory must be creatable. Returns the problem in one line,
    or None."""
    from exporters.schema import may_run_ddl, pending_message, pending_versions  # noqa: PLC0415
    from exporters.store import ServerTooOldError, StoreError, connect, dsn_database, is_embedded  # noqa: PLC0415
    from exporters.store import redact_dsn  # noqa: PLC0415

    if not cfg.recording.enabled:
        return None
    dsn = cfg.storage.resolved_dsn()
    if is_embedded(dsn):
        return _writable_dir(cfg.storage.data_dir, "the embedded store")
    where = f"ClickHouse at {redact_dsn(dsn)}"
    try:
        store = connect(dsn, connect_timeout=timeout)
    except StoreError as e:
        msg = str(e)
        database = dsn_database(dsn)
        if e.code == 81 and database:  # the gateway creates the DSN's database at start, if its user may
            return _probe_database(dsn, database, timeout)
        if redact_dsn(dsn) in msg:
            return msg
        return f"{where}: {msg}" if isinstance(e, ServerTooOldError) else f"{where} is unreachable: {msg}"
    try:
        if not store.ping():
            return f"{where} does not answer its ping"
        settings = cfg.schema_settings()
        pending = pending_versions(store, settings)
        if pending and not may_run_ddl(store, settings):
            return f"{where}: {pending_message(len(pending))}"
    except StoreError as e:
        return f"{where}: {e}"
    finally:
        store.close()
    return None


def _probe_database(dsn: str, database: str, timeout: float) -> str | None:
    """The DSN's database is missing: None when the gateway's user may create it (the gateway does, at start)."""
    from exporters.schema import may_create_database, no_database_message  # noqa: PLC0415
    from exporters.store import StoreError, connect, redact_dsn, without_database  # noqa: PLC0415

    try:
        store = connect(without_database(dsn), connect_timeout=timeout)
    except StoreError as e:
        return f"ClickHouse at {redact_dsn(dsn)}: {e}"
    try:
        return None if may_create_database(store, database) else \
            f"ClickHouse at {redact_dsn(dsn)}: {no_database_message(database, dsn)}"
    except StoreError as e:
        return f"ClickHouse at {redact_dsn(dsn)}: {e}"
    finally:
        store.close()


def probe_spool(cfg: GatewayConfig) -> str | None:
    """Can the spool (and the write-ahead log beside it) be written? What the gateway falls back on while the store
    fails, and all a server-DSN deployment writes locally. The problem in one line, or None."""
    return _writable_dir(cfg.storage.resolved_spool(), "the spool") if cfg.recording.enabled else None


def _writable_dir(directory: str, what: str) -> str | None:
    d = os.path.abspath(directory)
    while not os.path.exists(d):  # the gateway creates the missing part: the first existing parent must be writable
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if not os.path.isdir(d):
        return f"{d} is not a directory, so {what} cannot be created under it"
    if not os.access(d, os.W_OK | os.X_OK):
        return f"{d} is not writable by this user, so {what} cannot be created there"
    return None


def orphan_keys(keys_without_tenant: Sequence[tuple[str, KeyConfig]]) -> list[Finding]:
    """The keys file's active keys whose customer is no tenant: warnings (`config check`, and `tagway serve` at
    start), not errors, since removing a tenant is how its keys are shut out."""
    return [Finding(f"{where} ({k.id})", f"customer {k.customer!r} is not a tenant in the config: this key gets 401 "
                    "\"Incorrect API key provided.\"", f"add the tenant (customer: {k.customer}), or `tagway keys "
                    f"revoke {k.id}`") for where, k in keys_without_tenant]
