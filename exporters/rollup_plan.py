"""Which table answers which part of a stats question (pure functions; exporters.queries builds the SQL).

A question can use a rollup family (exporters.rollups) when every column it groups or filters by is one the family
holds: the per-customer family (the smallest) for customer, status and source; the main family for customer,
intent, prompt_version, model, provider, status, error_type, source; the tag family for one `tag.<key>` among its
rolled-up keys plus customer, status and source. Anything else (model_served, operation, key_id, stream,
session_id, applied_tag, two tag keys) reads `llm_calls`.

The window is then cut into pieces: before the rollup's coverage, raw; inside it, whole days from the day table,
whole hours at the day edges from the hour table, whole minutes at the hour edges from the minute table (the main
one, for the per-customer family), and the seconds at the ends raw. `splits` are instants no piece may cross: the
start of the current window in compare mode, and live_from when a resumed backfill over-counted the buckets that
straddle it (RollupState.splits). A time series uses only levels that divide its step, so each rollup bucket falls
in one step bucket.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Iterable, Sequence

from .rollups import CUSTOMER, CUSTOMER_KEYS, FAMILIES, MAIN, MAIN_KEYS, TAG_OTHER_KEYS, TAGS, RollupState
from .vocabulary import APPLIED_TAG, TAG_PREFIX, Filter

__all__ = ["Piece", "Route", "choose_route", "plan_pieces"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@dataclasses.dataclass(frozen=True)
class Piece:
    table: str  # "llm_calls" or a rollup table
    level: int  # bucket seconds; 0 = raw
    start: dt.datetime
    end: dt.datetime

    def to_dict(self) -> dict[str, str]:
        iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
        return {"table": self.table, "from": iso(self.start), "to": iso(self.end)}


@dataclasses.dataclass(frozen=True)
class Route:
    """`family` None: raw only, `reason` says why. Else the family, its coverage start and, for the tag family,
    the tag key it holds."""
    family: str | None
    reason: str = ""
    covered_from: dt.datetime | None = None
    tag_key: str | None = None
    splits: tuple[dt.datetime, ...] = ()  # instants no rollup piece may cross (RollupState.splits)
    family_from: dt.datetime | None = None  # before this the family it reads (Family.finer) answers for it


def choose_route(keys: Iterable[str], state: RollupState | None, now: dt.datetime) -> Route:
    """`keys`: every group-by and filter key of the question (status and source included when used)."""
    keys = set(keys)
    if state is None:
        return Route(None, "the store has no rollups")
    if APPLIED_TAG in keys:
        return Route(None, "applied_tag is current tag state, read from llm_calls")
    tags = sorted(k for k in keys if k.startswith(TAG_PREFIX))
    if not tags:
        if state.customer_from is not None and keys <= CUSTOMER_KEYS:
            return Route(CUSTOMER.name, covered_from=state.usable_from(now), splits=state.splits(),
                         family_from=state.customer_from)
        other = sorted(keys - MAIN_KEYS)
        if other:
            return Route(None, f"the rollups do not hold {', '.join(other)}")
        return Route(MAIN.name, covered_from=state.usable_from(now), splits=state.splits())
    if len(tags) > 1:
        return Route(None, "the tag rollup holds one tag key per question")
    key = tags[0][len(TAG_PREFIX):]
    since = state.tag_usable_from(key, now)
    if since is None:
        return Route(None, f"tag key {key!r} is not rolled up")
    other = sorted(keys - TAG_OTHER_KEYS - {tags[0]})
    if other:
        return Route(None, f"the tag rollup does not hold {', '.join(other)}")
    return Route(TAGS.name, covered_from=since, tag_key=key, splits=state.splits())


def question_keys(by: Sequence[str], filters: Sequence[Filter], status: str | None, excludes_sources: bool) -> set:
    keys = set(by) | {f.key for f in filters}
    if status:
        keys.add("status")
    if excludes_sources:
        keys.add("source")
    return keys


def _floor(t: dt.datetime, seconds: int) -> dt.datetime:
    us = (t - _EPOCH) // dt.timedelta(microseconds=1)
    return _EPOCH + dt.timedelta(microseconds=us // (seconds * 10**6) * seconds * 10**6)


def _ceil(t: dt.datetime, seconds: int) -> dt.datetime:
    f = _floor(t, seconds)
    return f if f == t else f + dt.timedelta(seconds=seconds)


def _cut(a: dt.datetime, b: dt.datetime, levels: Sequence[tuple[str, int]]) -> list[Piece]:
    """`levels`: (table, bucket seconds), finest first."""
    if a >= b:
        return []
    if not levels:
        return [Piece("llm_calls", 0, a, b)]
    table, seconds = levels[-1]  # coarsest first
    lo, hi = _ceil(a, seconds), _floor(b, seconds)
    if lo >= hi:
        return _cut(a, b, levels[:-1])
    return _cut(a, lo, levels[:-1]) + [Piece(table, seconds, lo, hi)] + _cut(hi, b, levels[:-1])


def plan_pieces(route: Route, start: dt.datetime, end: dt.datetime, splits: Iterable[dt.datetime] = (),
                step: int | None = None) -> list[Piece]:
    """The pieces of [start, end), in time order; raw only when the route has no family."""
    if route.family is None or route.covered_from is None:
        return [Piece("llm_calls", 0, start, end)]
    family = next(f for f in FAMILIES if f.name == route.family)
    fits = lambda lv: step is None or step % lv[1] == 0  # noqa: E731
    levels = [lv for lv in family.read_levels() if fits(lv)]
    before = [lv for lv in family.finer.read_levels() if fits(lv)] if family.finer else levels
    pieces: list[Piece] = []
    cov = route.covered_from
    if start < cov:
        pieces.append(Piece("llm_calls", 0, start, min(end, cov)))
    lo = max(start, cov)
    family_from = route.family_from or _EPOCH
    points = sorted({p for p in (*splits, *route.splits, family_from) if lo < p < end})
    for a, b in zip([lo] + points, points + [end]):
        pieces += _cut(a, b, before if a < family_from else levels)
    return _merge_raw(pieces)


def _merge_raw(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].end == p.start and out[-1].table == p.table and p.level in (0, out[-1].level):
            out[-1] = dataclasses.replace(out[-1], end=p.end)
        else:
            out.append(p)
    return out
