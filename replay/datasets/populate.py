"""One population of an auto-populating dataset (replay.datasets.autopopulate): the matching production traces
recorded since the last population, the sampled ones not yet in the dataset, added as a new version.

1. Under the dataset's populate lock (exporters.tagstate.TagLock, key `dataset-populate:<name>`), so two
   populations at once take turns and the second finds nothing new.
2. The window starts at the last population's watermark or, the first time, at the declaration (less its
   `since`), and ends now. A population that got through its window sets the watermark GRACE before its end
   (spans reach the store late: export batches, the spool), so the next one looks at that stretch again; that is
   harmless: a trace any version ever held is never added again, and sampling is a function of the trace id.
3. Oldest first, so a cap (`max`) or a full page (POOL_PAGE) leaves the rest for the next population: the
   watermark then stops at the first trace left out.
4. A version only when something is new (message "auto-populate: N new traces", author `auto-populate`); the
   population is logged either way (its watermark).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Sequence

from exporters.autopopulate import PopulationRecord, last_population, write_population
from exporters.datasets import DatasetStoreError, NoChange, Version, ever_held, history
from exporters.tagstate import TagLock
from exporters.vocabulary import NON_PRODUCTION_SOURCES, parse_duration

from ..slice import build_pool_query
from .autopopulate import SEGMENT_BY, AutoPopulate, is_sampled, stored
from .capture import NO_CONTENT, capture
from .versions import add_cases

__all__ = ["AUTHOR", "GRACE", "POOL_PAGE", "Row", "Population", "Pick", "window_start", "pick", "populate", "lock_key",
           "require_declaration"]

AUTHOR = "auto-populate"
GRACE = 600.0  # seconds before a population's end that the next one looks at again
POOL_PAGE = 20_000  # calls looked at per population; a busier window is finished by the next ones


@dataclasses.dataclass
class Row:
    trace_id: str
    ts: float  # epoch seconds
    has_content: bool = True


@dataclasses.dataclass
class Pick:
    take: list[str]  # trace ids to add, oldest first
    matched: int  # rows not held by the dataset yet
    sampled: int  # of those, in the sample
    watermark: float  # where the next population starts
    no_content: int = 0  # sampled but recorded without content


@dataclasses.dataclass
class Population:
    name: str
    record: PopulationRecord
    version: Version | None  # None: nothing new, no version
    added: list[str]
    spec: AutoPopulate


def lock_key(name: str) -> str:
    return f"dataset-populate:{name}"


def window_start(spec: AutoPopulate, declared_at: float, last: PopulationRecord | None) -> float:
    if last is not None:
        return last.watermark
    return declared_at - (parse_duration(spec.since).total_seconds() if spec.since else 0.0)


def pick(rows: Sequence[Row], rate: float, held: set[str], cap: int | None, start: float, end: float,
         full_page: bool) -> Pick:
    """Pure: which rows (oldest first) to add, and the next watermark: GRACE before `end` (never before `start`),
    or, when a cap or a full page left rows out, the first of them."""
    take: list[str] = []
    matched = sampled = no_content = 0
    watermark = rows[-1].ts if full_page and rows else max(start, end - GRACE)
    for r in rows:
        if r.trace_id in held:
            continue
        matched += 1
        if not is_sampled(r.trace_id, rate):
            continue
        sampled += 1
        if not r.has_content:
            no_content += 1
            continue
        if cap is not None and len(take) >= cap:
            watermark = min(watermark, r.ts)
            continue
        take.append(r.trace_id)
    return Pick(take, matched, sampled, watermark, no_content)


def require_declaration(store: Any, name: str) -> tuple[AutoPopulate, float]:
    history(store, name)  # an unknown dataset: DatasetNotFound naming the nearest
    found = stored(store, name)
    if found is None:
        raise DatasetStoreError(f"dataset {name!r} does not auto-populate (declare it: tagway dataset auto-populate "
                                f"{name} --where KEY=VALUE --sample RATE [--evaluator NAME])")
    return found


def _rows(store: Any, spec: AutoPopulate, start: float, end: float) -> list[Row]:
    sql, params = build_pool_query(spec.slice(start, end, POOL_PAGE), oldest_first=True,
                                   extra_where="source NOT IN {ap_excluded:Array(String)}")
    params["ap_excluded"] = list(NON_PRODUCTION_SOURCES)  # whatever the filter says about source
    return [Row(r["trace_id"], r["ts_ms"] / 1000, bool(r["has_content"])) for r in store.query(sql, params)]


def populate(store: Any, name: str, *, lock_wait: float = 30.0) -> Population:
    """Add the new sampled matching traces of `name` as a version. Raises DatasetStoreError (unknown dataset, no
    declaration) and TagLockBusy (another population held the dataset for `lock_wait` seconds)."""
    spec, declared_at = require_declaration(store, name)
    holder = f"populate {name} (pid {os.getpid()} on {socket.gethostname()})"
    with TagLock(store, [lock_key(name)], run_id="", holder=holder, wait=lock_wait, lease=600):
        last = last_population(store, name)
        end = time.time()
        start = window_start(spec, declared_at, last)
        rows = _rows(store, spec, start, end)
        p = pick(rows, spec.sample, ever_held(store, name), spec.max, start, end, len(rows) >= POOL_PAGE)
        notes = [f"skipped {p.no_content}: {NO_CONTENT}"] if p.no_content else []
        caps, problems = capture(store, p.take, segment_by=SEGMENT_BY, origin=AUTHOR, added_by=AUTHOR)
        notes += [f"skipped {t}: {why}" for t, why in problems.items()]
        version, added = None, []
        if caps:
            try:
                result = add_cases(store, name, caps, message=f"auto-populate: {len(caps)} new traces",
                                   author=AUTHOR, op=AUTHOR)
                version, added = result.version, result.added
            except NoChange:  # another writer added them first
                pass
        record = PopulationRecord(name, start, p.watermark, p.matched, p.sampled, len(added),
                                  version.ref if version else "", notes)
        write_population(store, record)
    return Population(name, record, version, added, spec)
