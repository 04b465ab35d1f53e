"""The coverage map (seed 004: "the case board is a map of where evaluation coverage is thin"): for each production
slice (any vocabulary columns and tags), its calls, failure rate and complaint rate over a window beside the dataset
cases that cover it (the latest versions of the named datasets, or of all) and their target; a slice with failures
or complaints but fewer cases than its target (or none) is a gap. Worst gaps first: gaps, then by the calls that
went wrong (errors + complaints), then by volume. Only calls that reached an upstream count (`REACHED_UPSTREAM`).
`tagway coverage` and `GET /admin/coverage` both answer from here.

A dataset target applies to a slice when it names exactly the slice's dimensions with its values
(`intent=refund,tag.tier=enterprise: 30` for `--by intent --by tag.tier`); several datasets: the largest target.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .datasets import latest_versions, not_found
from .feedback import feedback_table
from .queries import (Selection, _dim_select, _Params, _where, calls_table, parse_by, wilson_interval)
from .vocabulary import TAG_PREFIX, parse_filter

__all__ = ["SliceCoverage", "CoverageMap", "coverage_map", "production_counts", "target_key"]

MAX_SLICES = 10_000
# Coverage is about what upstreams did: a call the gateway refused before trying any deployment (no key, a bad
# request, a rate limit, a budget) is no model behaviour a dataset case could cover, so it is neither counted nor a
# gap. `tagway stats` counts those calls, so a slice's failure rate there can be higher than on the map.
REACHED_UPSTREAM = "attempts > 0"


@dataclasses.dataclass
class SliceCoverage:
    key: dict[str, str]
    calls: int = 0
    errors: int = 0
    complaints: int = 0
    cases: int = 0
    target: int | None = None

    @property
    def failure_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.calls if self.calls else 0.0

    @property
    def wanted(self) -> int:
        return self.target if self.target is not None else 1

    @property
    def gap(self) -> bool:
        """Production fails or complains here, and the datasets hold fewer cases than the target (or none)."""
        return (self.errors > 0 or self.complaints > 0) and self.cases < self.wanted

    @property
    def missing(self) -> int:
        return max(self.wanted - self.cases, 0) if self.gap else 0

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.errors, self.calls)
        return {"key": dict(self.key), "calls": self.calls, "errors": self.errors, "failure_rate": self.failure_rate,
                "failure_rate_ci": {"low": lo, "high": hi}, "complaints": self.complaints,
                "complaint_rate": self.complaint_rate, "cases": self.cases, "target": self.target, "gap": self.gap,
                "missing": self.missing, "below_target": self.target is not None and self.cases < self.target}


def _sort_key(s: SliceCoverage) -> tuple:
    return (not s.gap, -(s.errors + s.complaints), -s.calls, s.cases, tuple(s.key.values()))


@dataclasses.dataclass
class CoverageMap:
    by: tuple[str, ...]
    selection: Selection
    datasets: list[str]  # the exact versions read
    slices: list[SliceCoverage]
    truncated: bool = False

    @property
    def gaps(self) -> list[SliceCoverage]:
        return [s for s in self.slices if s.gap]

    def to_dict(self) -> dict[str, Any]:
        return {"by": list(self.by), **self.selection.to_dict(), "datasets": self.datasets,
                "gaps": len(self.gaps), "slices": [s.to_dict() for s in self.slices], "truncated": self.truncated}


def target_key(filters: Sequence[str], by: Sequence[str]) -> tuple[str, ...] | None:
    """The slice key a target names when its filters are exactly `key=value` on the `by` dimensions, else None."""
    parsed = [parse_filter(f) for f in filters]
    if len(parsed) != len(by) or any(f.op != "=" for f in parsed) or {f.key for f in parsed} != set(by):
        return None
    values = {f.key: f.value for f in parsed}
    return tuple(values[k] for k in by)


def _production(sel: Selection, p: _Params, database: str) -> tuple[str, str]:
    """The condition on the selection's calls that reached an upstream, and the expression true for a complained one
    (feedback since the window's start)."""
    since = p.time(sel.window.start)
    return (f"{_where(sel, p, sel.window, database)} AND {REACHED_UPSTREAM}",
            f"trace_id IN (SELECT trace_id FROM {feedback_table(database)} WHERE complaint AND Timestamp >= {since})")


def _case_dim(key: str, p: _Params) -> str:
    if key.startswith(TAG_PREFIX):
        return f"tags[{p.add('k', 'String', key[len(TAG_PREFIX):])}]"
    return f"columns[{p.add('k', 'String', key)}]"


def coverage_map(store: Any, sel: Selection, by: Sequence[str], *, datasets: Sequence[str] | None = None,
                 database: str = "") -> CoverageMap:
    """The map over `sel` cut by `by`, against the latest versions of `datasets` (all datasets when None)."""
    by = parse_by(by)
    versions = latest_versions(store, list(datasets) if datasets is not None else None)
    if datasets is not None:
        missing = sorted(set(datasets) - {v.name for v in versions})
        if missing:
            raise not_found(store, missing[0])  # the same error (a 404 over HTTP) as every other dataset lookup
    p = _Params()
    dims = [f"{_dim_select(k, p)} AS d{i}" for i, k in enumerate(by)]
    where, complained = _production(sel, p, database)
    group = ", ".join(f"d{i}" for i in range(len(by)))
    rows = store.query(f"SELECT {', '.join(dims)}, count() AS calls, countIf(status = 'error') AS errors, "
                       f"countIf({complained}) AS complaints\nFROM {calls_table(database)}\nWHERE {where}\n"
                       f"GROUP BY {group}\nORDER BY errors + complaints DESC, calls DESC\n"
                       f"LIMIT {p.add('n', 'UInt32', MAX_SLICES + 1)}", parameters=p.values)
    truncated = len(rows) > MAX_SLICES
    slices: dict[tuple[str, ...], SliceCoverage] = {}
    for r in rows[:MAX_SLICES]:
        k = tuple(str(r[f"d{i}"]) for i in range(len(by)))
        slices[k] = SliceCoverage(dict(zip(by, k)), int(r["calls"]), int(r["errors"]), int(r["complaints"]))
    if versions:
        q = _Params()
        cdims = [f"{_case_dim(k, q)} AS d{i}" for i, k in enumerate(by)]
        ids = q.add("ids", "Array(String)", [v.version_id for v in versions])
        for r in store.query(f"SELECT {', '.join(cdims)}, uniqExact(trace_id) AS n FROM dataset_cases "
                             f"WHERE version_id IN {ids} GROUP BY {group}", parameters=q.values):
            k = tuple(str(r[f"d{i}"]) for i in range(len(by)))
            slices.setdefault(k, SliceCoverage(dict(zip(by, k)))).cases = int(r["n"])
        for v in versions:
            for t in (v.targets or {}).get("slices", []):
                k = target_key(t.get("filters", []), by)
                if k is not None:
                    s = slices.setdefault(k, SliceCoverage(dict(zip(by, k))))
                    s.target = max(s.target or 0, int(t.get("n", 0)))
    ordered = sorted(slices.values(), key=_sort_key)
    return CoverageMap(by, sel, [v.ref for v in versions], ordered, truncated)


def production_counts(store: Any, sel: Selection, database: str = "") -> dict[str, int]:
    """Calls, errors and complained calls of one selection (a dataset target's slice)."""
    p = _Params()
    where, complained = _production(sel, p, database)
    r = store.query(f"SELECT count() AS calls, countIf(status = 'error') AS errors, countIf({complained}) AS "
                    f"complaints FROM {calls_table(database)} WHERE {where}", parameters=p.values)[0]
    return {"calls": int(r["calls"]), "errors": int(r["errors"]), "complaints": int(r["complaints"])}

