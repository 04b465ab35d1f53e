"""Retention as configured, on a store that already exists. `storage.ttl_days` and `storage.rollup_ttl_days` were
read only when a table was created, so changing them on a running deployment did nothing, silently. The gateway's
start-up and `tagway db migrate` now compare each table's TTL with the config and change it where it differs
(`ALTER TABLE ... MODIFY TTL`, which re-evaluates the existing parts in the background; `REMOVE TTL` for 0, keep
forever), saying so in a log line per table.

Only a migration that carries the gateway's own settings does this (`SchemaSettings.apply_retention`): a replay or
stats command migrating with the defaults must not remove the TTL an operator set.

Rollups: their coverage depends on their TTL (exporters.rollups.RollupState.usable_from), so the state row learns
the new TTL too, and a longer TTL never claims days the old one already deleted (rollups.set_ttl).
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from typing import Any

from . import rollups

__all__ = ["RAW_TABLES", "sync_retention", "ttl_days_of"]

log = logging.getLogger(__name__)

# the tables created with `SchemaSettings.ttl(column)`: calls, spans, their trace index, feedback
RAW_TABLES = (("otel_traces", "Timestamp"), ("otel_traces_trace_id_ts", "Start"), ("llm_calls", "Timestamp"),
              ("llm_feedback", "Timestamp"))
_TTL = re.compile(r"\bTTL\s+(.*?)(?:\s+SETTINGS\s|\s*$)", re.S)


def ttl_days_of(create_query: str, column: str) -> int | None:
    """The days a table's TTL keeps rows, from its CREATE statement: 0 with no TTL (kept forever), None for a TTL
    tagway does not write (moves to volumes, another unit or column, several rules: an operator's own, left as is)."""
    m = _TTL.search(create_query)
    if m is None:
        return 0
    own = re.fullmatch(rf"(?:toDateTime\({re.escape(column)}\)|{re.escape(column)}) \+ toIntervalDay\((\d+)\)",
                       m.group(1).strip())
    return int(own.group(1)) if own else None


def _days(n: int) -> str:
    return f"{n} days" if n else "forever"


def _tables(store: Any, s: Any) -> dict[str, str]:
    """name -> CREATE statement of every table in the store's database."""
    db = "{db:String}" if s.database else "currentDatabase()"
    rows = store.query(f"SELECT name, create_table_query AS q FROM system.tables WHERE database = {db}",
                       parameters={"db": s.database} if s.database else None)
    return {r["name"]: r["q"] for r in rows}


def _alter(s: Any, table: str, expr: str, days: int) -> str:
    ttl = f"MODIFY TTL {expr} + toIntervalDay({days})" if days else "REMOVE TTL"
    return f"ALTER TABLE {s.local(table)}{s.on_cluster()} {ttl}"


def sync_retention(store: Any, s: Any, now: dt.datetime | None = None) -> list[str]:
    """Bring every table's TTL to `s.ttl_days` / `s.rollup_ttl_days`; returns (and logs) what changed."""
    tables = _tables(store, s)
    local = (lambda t: f"{t}_local") if s.cluster else (lambda t: t)
    changes: list[str] = []
    if "ttl_days" in s.apply_retention:
        for t, col in RAW_TABLES:
            if local(t) not in tables:
                continue
            days = ttl_days_of(tables[local(t)], col)
            if days is None:
                log.warning("retention: %s has a TTL tagway did not write; left as it is (storage.ttl_days %s)", t,
                            _days(s.ttl_days))
            elif days != s.ttl_days:
                store.command(_alter(s, t, f"toDateTime({col})", s.ttl_days))
                changes.append(f"{t}: kept {_days(days)}, now {_days(s.ttl_days)} (storage.ttl_days)")
    st = rollups.read_state(store, s) if rollups.STATE_TABLE in tables or local(rollups.STATE_TABLE) in tables \
        else None
    if st is not None and st.ttl_days != s.rollup_ttl_days and "rollup_ttl_days" in s.apply_retention:
        present = [t for t in rollups.rollup_tables() if local(t) in tables]
        foreign = [t for t in present if ttl_days_of(tables[local(t)], "bucket") is None]
        if foreign:  # the state's TTL must be the tables': all of them change, or none
            log.warning("retention: %s have a TTL tagway did not write; the rollups keep theirs (storage."
                        "rollup_ttl_days %s not applied)", ", ".join(foreign), _days(s.rollup_ttl_days))
        else:
            for table in present:
                store.command(_alter(s, table, "bucket", s.rollup_ttl_days))
            rollups.set_ttl(store, s, st, s.rollup_ttl_days, now or dt.datetime.now(dt.timezone.utc))
            changes.append(f"rollups: kept {_days(st.ttl_days)}, now {_days(s.rollup_ttl_days)} "
                           "(storage.rollup_ttl_days)")
    for line in changes:
        log.warning("retention changed: %s", line)
    return changes
