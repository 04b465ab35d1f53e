"""Auto-population of datasets in ClickHouse (migration 9): what a dataset declares and the log of its populations.

- `dataset_autopopulate`: one row per change of a dataset's declaration (its filter, sampling rate, cap and
  evaluators, as JSON); the newest row per name wins, and `enabled = 0` switches it off.
- `dataset_populations`: one row per population, also when nothing was new. The newest row's `watermark` is where
  the next population starts looking (replay.datasets.populate).

Rows are only appended; versions are nanosecond times from exporters.tagstate, so the newest write wins.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import orjson

from .tagstate import WRITE_SETTINGS, next_version

__all__ = ["Declaration", "PopulationRecord", "declare", "get_declaration", "declarations", "last_population",
           "write_population"]


@dataclasses.dataclass
class Declaration:
    name: str
    spec: dict[str, Any]  # where, since, sample, max, evaluators (replay.datasets.autopopulate.AutoPopulate)
    declared_at: float
    author: str
    enabled: bool = True


@dataclasses.dataclass
class PopulationRecord:
    name: str
    window_from: float  # epoch seconds: the traces looked at were recorded from here ...
    watermark: float  # ... up to here, where the next population starts
    matched: int  # matching traces in the window that the dataset never held
    sampled: int  # of those, the ones the sampling rate takes
    added: int  # of those, the ones added (a cap, or a call without content, leaves some out)
    dataset_version: str = ""  # the version made ('refunds@4'), "" when nothing was new
    notes: list[str] = dataclasses.field(default_factory=list)
    populated_at: float = dataclasses.field(default_factory=time.time)


def declare(store: Any, name: str, spec: dict[str, Any] | None, *, author: str) -> Declaration:
    """Store `name`'s declaration (`spec` None: switch auto-population off)."""
    d = Declaration(name, spec or {}, time.time(), author, spec is not None)
    store.insert_json_rows("dataset_autopopulate", orjson.dumps(
        {"name": name, "version": next_version(), "declared_at": d.declared_at, "author": author,
         "enabled": int(d.enabled), "declaration_json": orjson.dumps(d.spec).decode()}), settings=WRITE_SETTINGS)
    return d


_LATEST = ("SELECT name, argMax(declaration_json, version) AS declaration_json, argMax(enabled, version) AS enabled, "
           "toFloat64(argMax(declared_at, version)) AS declared_at, argMax(author, version) AS author "
           "FROM dataset_autopopulate {where} GROUP BY name ORDER BY name")


def _declaration(r: dict) -> Declaration:
    return Declaration(r["name"], orjson.loads(r["declaration_json"] or "{}"), float(r["declared_at"]), r["author"],
                       bool(r["enabled"]))


def get_declaration(store: Any, name: str) -> Declaration | None:
    """`name`'s declaration, or None when it never declared one or switched it off."""
    rows = store.query(_LATEST.format(where="WHERE name = {n:String}"), {"n": name})
    d = _declaration(rows[0]) if rows else None
    return d if d is not None and d.enabled else None


def declarations(store: Any, names: Sequence[str] | None = None) -> list[Declaration]:
    """Every dataset's enabled declaration (or those of `names`), by name."""
    where, params = ("WHERE name IN {names:Array(String)}", {"names": list(names)}) if names is not None else ("", {})
    return [d for d in map(_declaration, store.query(_LATEST.format(where=where), params)) if d.enabled]


def last_population(store: Any, name: str) -> PopulationRecord | None:
    rows = store.query("SELECT name, toFloat64(window_from) AS window_from, toFloat64(watermark) AS watermark, "
                       "matched, sampled, added, dataset_version, notes, toFloat64(populated_at) AS populated_at "
                       "FROM dataset_populations WHERE name = {n:String} ORDER BY version DESC LIMIT 1", {"n": name})
    if not rows:
        return None
    r = rows[0]
    return PopulationRecord(r["name"], r["window_from"], r["watermark"], int(r["matched"]), int(r["sampled"]),
                            int(r["added"]), r["dataset_version"], list(r["notes"]), r["populated_at"])


def write_population(store: Any, rec: PopulationRecord) -> None:
    row = {**dataclasses.asdict(rec), "version": next_version()}
    store.insert_json_rows("dataset_populations", orjson.dumps(row), settings=WRITE_SETTINGS)
