"""`tagway db status`: what the store holds and how this command reached it, in a few lines (or JSON).

`gather` reads (the store, the spool directory); `render` is pure. Through a running gateway or opened directly,
the figures are the same; the first line says which it was.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from exporters.remote_store import RemoteStore
from exporters.schema import MIGRATIONS, SchemaSettings, applied_versions
from exporters.spool import quarantined, unsent_spans
from exporters.store import is_embedded, redact_dsn
from exporters.vocabulary import iso_utc

__all__ = ["gather", "render", "spool_status", "spool_line"]


def gather(store: Any, dsn: str, settings: SchemaSettings, spool_dir: str) -> dict[str, Any]:
    if isinstance(store, RemoteStore):
        via = f"through the running gateway ({store.announcement.describe()})"
    else:
        via = "opened directly"
    applied = applied_versions(store, settings)
    known = [v for v, _name, _fn in MIGRATIONS]
    missing = [v for v in known if v not in applied]
    out: dict[str, Any] = {
        "store": redact_dsn(dsn), "embedded": is_embedded(dsn), "access": via,
        "schema": {"applied": len(known) - len(missing), "known": len(known), "missing": missing},
    }
    if not missing:
        db = f"`{settings.database}`." if settings.database else ""
        rows, _ = store.query_rows(
            f"SELECT count(), min(Timestamp), max(Timestamp), countIf(source = 'production') FROM {db}llm_calls")
        calls, oldest, newest, production = rows[0]
        spans = store.query_rows(f"SELECT count() FROM {db}otel_traces")[0][0][0]
        out["calls"] = {"total": int(calls), "production": int(production), "spans": int(spans),
                        "oldest": _iso(oldest) if calls else None, "newest": _iso(newest) if calls else None}
    out["spool"] = spool_status(spool_dir)
    return out


def spool_status(spool_dir: str) -> dict[str, Any]:
    """What waits in the spool: said also when the store cannot be reached, which is when it matters most."""
    return {"directory": spool_dir, "unsent": unsent_spans(spool_dir), "quarantined_files": len(quarantined(spool_dir))}


def render(d: dict[str, Any]) -> list[str]:
    lines = [f"store: {d['store']} ({'embedded' if d['embedded'] else 'ClickHouse server'}), {d['access']}"]
    s = d["schema"]
    if s["missing"]:
        lines.append(f"schema: {s['applied']} of {s['known']} migrations applied, missing "
                     f"{', '.join(map(str, s['missing']))}: run `tagway db migrate` (the gateway does at start-up "
                     "when its user may run DDL)")
    else:
        lines.append(f"schema: up to date ({s['known']} migrations)")
    c = d.get("calls")
    if c is not None:
        span = f", {c['oldest']} to {c['newest']}" if c["total"] else ""
        lines.append(f"calls: {c['total']:,} ({c['production']:,} production){span}; spans: {c['spans']:,}")
    lines.append(spool_line(d["spool"]))
    return lines


def spool_line(sp: dict[str, Any]) -> str:
    waiting = (f"{sp['unsent']:,} span(s) not stored yet (stored when a gateway runs on this store)"
               if sp["unsent"] else "nothing waiting")
    return (f"spool: {sp['directory']}: {waiting}"
            + (f"; {sp['quarantined_files']} quarantined file(s): `tagway db spool list`" if sp["quarantined_files"]
               else ""))


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):  # chDB gives naive UTC times; seconds are enough here
        return iso_utc((value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).replace(microsecond=0))
    return str(value)
