"""Which ClickHouse a command-line tool opens: the one place that answers it for `tagway stats|errors|show` and
`tagway replay`, so both find the store a gateway started with the same settings writes to.

Precedence: an explicit DSN (`--dsn`) > `$TAGWAY_DSN` > the gateway's config (`--config` or `$TAGWAY_CONFIG`: its
`storage` mapping, with `$TAGWAY_STORAGE__DSN` / `$TAGWAY_STORAGE__DATA_DIR` / `$TAGWAY_STORAGE__DATABASE`
overriding it as they do for the gateway) > the embedded default, `chdb://<abs ./tagway-data>/clickhouse`.

Only the `storage` mapping of the config is read (with exporters.yamlfile): `exporters` never imports `gateway`.
Its keys are checked against STORAGE_KEYS, which a test keeps equal to the gateway's StorageConfig fields.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .yamlfile import YamlFileError, load_mapping

__all__ = ["DsnConfigError", "ResolvedDsn", "resolve_dsn", "embedded_dsn", "default_dsn", "DEFAULT_DATA_DIR",
           "STORAGE_KEYS", "anchor_storage_paths", "is_http_url"]

DEFAULT_DATA_DIR = os.path.join(".", "tagway-data")
STORAGE_KEYS = frozenset({"data_dir", "dsn", "spool_dir", "database", "cluster", "ttl_days", "query_concurrency",
                          "query_max_seconds", "query_max_memory_bytes", "query_max_threads", "rollup_ttl_days",
                          "rollup_tag_keys"})
_STRING_KEYS = ("data_dir", "dsn", "database")
_ENV_OVERRIDES = {"dsn": "TAGWAY_STORAGE__DSN", "data_dir": "TAGWAY_STORAGE__DATA_DIR",
                  "database": "TAGWAY_STORAGE__DATABASE"}


class DsnConfigError(ValueError):
    """The gateway config file named for the DSN is missing or its `storage` mapping is invalid (one line)."""


@dataclasses.dataclass(frozen=True)
class ResolvedDsn:
    dsn: str
    database: str = ""
    source: str = "default"  # flag | env | config | default


def is_http_url(url: str) -> bool:
    """An http:// or https:// URL with a host: what a model's base_url and replay's --gateway must be."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # 'http://[::1', a port that is no number: not one
        return False


def embedded_dsn(data_dir: str | os.PathLike[str]) -> str:
    """The embedded (chDB) store of a gateway data directory: `chdb://<absolute data_dir>/clickhouse`. Absolute on
    purpose: `chdb:///./x` names `/x` at the filesystem root, not `./x`."""
    return f"chdb://{os.path.abspath(os.path.join(os.fspath(data_dir), 'clickhouse'))}"


def default_dsn() -> str:
    """The store a gateway started in the current directory without a config uses."""
    return embedded_dsn(DEFAULT_DATA_DIR)


def _read_storage(path: str) -> dict[str, Any]:
    """The config file's `storage` mapping, `data_dir` made relative to the file's directory (as the gateway does)."""
    p = Path(path)
    try:
        loaded = load_mapping(p)
    except YamlFileError as e:
        raise DsnConfigError(str(e)) from None
    storage = loaded.get("storage")
    if storage is None:
        return {}
    if not isinstance(storage, dict):
        raise DsnConfigError("storage: must be a mapping (data_dir, dsn, database, ...)")
    for key in storage:
        if key not in STORAGE_KEYS:
            raise DsnConfigError(f"storage.{key}: unknown setting")
    for key in _STRING_KEYS:
        if storage.get(key) is not None and not isinstance(storage[key], str):
            raise DsnConfigError(f"storage.{key}: must be a string")
    return anchor_storage_paths(storage, p.parent)


def anchor_storage_paths(storage: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a config's `storage` mapping (data_dir, spool_dir, a `chdb://relative/path` DSN) are
    relative to the config file's directory, not to wherever the command happens to run."""
    out = dict(storage)
    for key in ("data_dir", "spool_dir"):
        if isinstance(out.get(key), str) and out[key] and not os.path.isabs(out[key]):
            out[key] = str(base / out[key])
    dsn = out.get("dsn")
    if isinstance(dsn, str) and dsn.startswith("chdb://") and not dsn.startswith("chdb:///") \
            and dsn[len("chdb://"):] not in ("", ":memory:"):
        out["dsn"] = "chdb://" + str((base / dsn[len("chdb://"):]).resolve())
    return out


def resolve_dsn(dsn: str | None = None, config: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> ResolvedDsn:
    """The DSN (and database) a command should open; see the module docstring for the order. Raises DsnConfigError
    when a config file is named but cannot be used."""
    env = os.environ if environ is None else environ
    if dsn:
        return ResolvedDsn(dsn, "", "flag")
    if env.get("TAGWAY_DSN"):
        return ResolvedDsn(env["TAGWAY_DSN"], "", "env")
    config = config or env.get("TAGWAY_CONFIG")
    storage = _read_storage(os.fspath(config)) if config else {}
    overridden = False
    for key, var in _ENV_OVERRIDES.items():
        if env.get(var):
            storage[key] = env[var]
            overridden = True
    database = storage.get("database") or ""
    source = "config" if config else "env" if overridden else "default"
    if storage.get("dsn"):
        return ResolvedDsn(storage["dsn"], database, source)
    return ResolvedDsn(embedded_dsn(storage.get("data_dir") or DEFAULT_DATA_DIR), database, source)
