"""Designing a dataset on two axes (seed 003): coverage, target counts per slice decided before collecting
(`intent=refund,tag.tier=enterprise: 30`), and difficulty, a visible mix of easy | medium | hard | safety cases.

- Targets name slices with the stats vocabulary (a column or `tag.<key>`; a bare key that is not a column is read as
  a tag key); a key the vocabulary does not know, or a tag key no recorded call or case carries, is refused with the
  nearest names.
- Difficulty is set by hand, or proposed from history: a case that every recent run passes is easy, one whose
  outcome flips is medium, one that usually fails is hard (safety is only ever set by hand).
- `coverage` compares targets with what the version holds, and shows what production holds for each slice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from exporters.coverage import production_counts
from exporters.datasets import DIFFICULTIES, CaseRecord, DatasetStoreError, Version, nearest
from exporters.queries import Selection, Window
from exporters.vocabulary import COLUMNS, TAG_PREFIX, QueryInputError, parse_filter

__all__ = ["parse_target", "parse_mix", "known_tag_keys", "run_history", "propose_difficulty", "TargetRow",
           "MixRow", "DatasetCoverage", "dataset_coverage"]

MIX_TOLERANCE = 0.011  # shares are rounded by people: 0.33 x 3 is a whole


def _key(raw: str, tag_keys: set[str]) -> str:
    key = raw.strip()
    if key in COLUMNS:
        return key
    tag = key[len(TAG_PREFIX):] if key.startswith(TAG_PREFIX) else key
    if tag in tag_keys:
        return TAG_PREFIX + tag
    close = nearest(key, [*COLUMNS, *(TAG_PREFIX + t for t in tag_keys)])
    raise DatasetStoreError(f"unknown column or tag key {key!r} in a target"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; columns: {', '.join(COLUMNS)}; tag keys seen: "
                            + (", ".join(sorted(tag_keys)[:20]) or "none"))


def parse_target(text: str, tag_keys: set[str]) -> dict[str, Any]:
    """'intent=refund,tag.tier=enterprise: 30' -> {"filters": ["intent=refund", "tag.tier=enterprise"], "n": 30}."""
    body, sep, n = text.rpartition(":")
    if not sep or not n.strip().isdigit() or int(n) < 1 or not body.strip():
        raise DatasetStoreError(f"bad target {text!r}: use FILTERS: N, e.g. 'intent=refund,tag.tier=enterprise: 30'")
    filters = []
    for part in body.split(","):
        k, op, v = part.partition("!=") if "!=" in part else part.partition("=")
        if not op:
            raise DatasetStoreError(f"bad target filter {part.strip()!r}: use key=value or key!=value")
        try:
            filters.append(str(parse_filter(f"{_key(k, tag_keys)}{op}{v.strip()}")))
        except QueryInputError as e:
            raise DatasetStoreError(f"bad target {text!r}: {e.message}") from None
    if len(set(filters)) != len(filters):
        raise DatasetStoreError(f"bad target {text!r}: a filter is repeated")
    return {"filters": filters, "n": int(n)}


def parse_mix(text: str) -> dict[str, float]:
    """'easy=0.4,medium=0.3,hard=0.2,safety=0.1' (or percentages: easy=40%) -> shares that add up to 1."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k not in DIFFICULTIES:
            raise DatasetStoreError(f"bad difficulty mix {text!r}: use {'=S,'.join(DIFFICULTIES)}=S (shares adding "
                                    "up to 1, or percentages)")
        v = v.strip()
        try:
            share = float(v[:-1]) / 100 if v.endswith("%") else float(v)
        except ValueError:
            raise DatasetStoreError(f"bad share {v!r} for {k} in the difficulty mix") from None
        if not 0 <= share <= 1 or k in mix:
            raise DatasetStoreError(f"bad difficulty mix {text!r}: each share once, from 0 to 1")
        mix[k] = share
    if abs(sum(mix.values()) - 1) > MIX_TOLERANCE:
        raise DatasetStoreError(f"the difficulty mix adds up to {sum(mix.values()):.2f}, not 1")
    return mix


def known_tag_keys(store: Any, cases: Sequence[CaseRecord] = (), *, days: int = 30) -> set[str]:
    """Tag keys on recorded calls of the last `days` days, and on the dataset's cases."""
    rows = store.query("SELECT DISTINCT arrayJoin(mapKeys(tags)) AS k FROM llm_calls WHERE Timestamp >= "
                       "now64() - toIntervalDay({d:UInt32}) LIMIT 10000", {"d": days})
    return {r["k"] for r in rows} | {k for c in cases for k in c.tags}


# -- difficulty from history --------------------------------------------------------------------------------------
def run_history(store: Any, trace_ids: Sequence[str], *, runs: int = 10) -> dict[str, list[bool]]:
    """Per case, the scored outcomes (passed or not) of every candidate in its `runs` most recent runs; errored
    results and the baseline are left out."""
    rows = store.query("SELECT case_id, run_id, candidate, argMax(status, Timestamp) AS st, max(Timestamp) AS t "
                       "FROM replay_results WHERE case_id IN {ids:Array(String)} AND candidate != 'baseline' "
                       "GROUP BY case_id, run_id, candidate ORDER BY t DESC", {"ids": list(trace_ids)})
    out: dict[str, list[bool]] = {}
    seen_runs: dict[str, list[str]] = {}
    for r in rows:
        mine = seen_runs.setdefault(r["case_id"], [])
        if r["run_id"] not in mine:
            if len(mine) >= runs:
                continue
            mine.append(r["run_id"])
        if r["st"] in ("passed", "failed"):
            out.setdefault(r["case_id"], []).append(r["st"] == "passed")
    return out


def propose_difficulty(history: Mapping[str, Sequence[bool]], *, min_results: int = 2) -> dict[str, tuple[str, str]]:
    """trace id -> (difficulty, why) for cases with at least `min_results` scored results: all passed -> easy; at
    least half passed -> medium (it flips); fewer -> hard. Pure."""
    out = {}
    for tid, outcomes in history.items():
        n, passed = len(outcomes), sum(outcomes)
        if n < min_results:
            continue
        d = "easy" if passed == n else "medium" if passed * 2 >= n else "hard"
        out[tid] = (d, f"passed {passed} of {n} recent results")
    return out


# -- coverage of one dataset --------------------------------------------------------------------------------------
@dataclasses.dataclass
class TargetRow:
    filters: list[str]
    target: int
    have: int
    production: dict[str, int]  # calls, errors, complaints in the window

    @property
    def missing(self) -> int:
        return max(self.target - self.have, 0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "missing": self.missing}


@dataclasses.dataclass
class MixRow:
    difficulty: str
    share: float | None  # the target share (None: no mix declared)
    target: int | None
    have: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DatasetCoverage:
    ref: str
    cases: int
    window: Window
    slices: list[TargetRow]
    mix: list[MixRow]
    unset: int  # cases with no difficulty yet

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.ref, "cases": self.cases, "window": self.window.to_dict(),
                "slices": [s.to_dict() for s in self.slices], "difficulty": [m.to_dict() for m in self.mix],
                "difficulty_unset": self.unset}


def dataset_coverage(store: Any, version: Version, cases: Sequence[CaseRecord], window: Window, *,
                     database: str = "") -> DatasetCoverage:
    slices = []
    for t in version.targets.get("slices", []):
        filters = tuple(parse_filter(f) for f in t["filters"])
        have = sum(1 for c in cases if c.matches(filters))
        prod = production_counts(store, Selection(window, filters), database)
        slices.append(TargetRow(list(t["filters"]), int(t["n"]), have, prod))
    mix = version.targets.get("mix") or {}
    n = len(cases)
    rows = [MixRow(d, mix.get(d) if mix else None, round(mix.get(d, 0) * n) if mix else None,
                   sum(1 for c in cases if c.difficulty == d)) for d in DIFFICULTIES]
    return DatasetCoverage(version.ref, n, window, slices, rows, sum(1 for c in cases if not c.difficulty))

