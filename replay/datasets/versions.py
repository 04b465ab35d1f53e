"""The Python face of versioned datasets: load `NAME[@V]` -> cases with their trace ids (and labels, difficulty,
locks), and changes that each make a new version (add, remove, lock, label, difficulty, targets). Every change is a
pure function of the latest version's cases handed to `exporters.datasets.commit`, which writes the version.

    ds = load(store, "refunds@2")            # or "refunds" for the latest
    ds.version.ref, [c.trace_id for c in ds.cases], ds.replay_cases()
    add_cases(store, "refunds", captured, message="complaints of week 48", author="ana")   # -> Version refunds@3
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

from exporters.datasets import (DIFFICULTIES, EXPECTS, CaseRecord, DatasetStoreError, NoChange, Version, commit,
                                get_content, get_version, put_content, read_cases, relabel)

from ..slice import Case
from .capture import Captured, case_from_content, content_json

__all__ = ["DatasetCase", "Lock", "LoadedDataset", "load", "add_cases", "remove_cases", "lock_case", "label_cases",
           "set_difficulty", "set_targets", "import_version", "AddResult"]


@dataclasses.dataclass(frozen=True)
class Lock:
    """A locked case: a fixed bug's trace that must keep its expected outcome (a unit test, not a sample)."""
    trace_id: str
    expect: str  # pass | fail
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DatasetCase:
    record: CaseRecord
    case: Case | None  # None: no content stored (cannot be replayed)

    @property
    def trace_id(self) -> str:
        return self.record.trace_id


@dataclasses.dataclass
class LoadedDataset:
    version: Version
    cases: list[DatasetCase]

    @property
    def ref(self) -> str:
        return self.version.ref

    @property
    def trace_ids(self) -> list[str]:
        return [c.trace_id for c in self.cases]

    def replay_cases(self) -> tuple[list[Case], dict[str, int]]:
        """The replayable cases (in order) and the skipped reasons, as replay.slice.fetch_cases gives them."""
        cases = [c.case for c in self.cases if c.case is not None]
        missing = len(self.cases) - len(cases)
        return cases, ({"no content stored for the case": missing} if missing else {})

    def locks(self) -> dict[str, Lock]:
        return {c.trace_id: Lock(c.trace_id, c.record.expect, c.record.lock_note) for c in self.cases
                if c.record.locked}


def load(store: Any, ref: str) -> LoadedDataset:
    """The cases of `ref` ('refunds' = latest, 'refunds@3'), with content. Raises DatasetNotFound (nearest names)."""
    version = get_version(store, ref)
    records = read_cases(store, version)
    content = get_content(store, (r.trace_id for r in records))
    return LoadedDataset(version, [DatasetCase(r, case_from_content(r, content[r.trace_id])
                                               if r.trace_id in content else None) for r in records])


@dataclasses.dataclass
class AddResult:
    version: Version
    added: list[str]
    duplicates: list[str]  # already in the dataset: never added twice


def _norm_captured(items: Iterable[Captured | DatasetCase]) -> list[Captured]:
    out = []
    for it in items:
        if isinstance(it, DatasetCase):
            if it.case is None:
                raise DatasetStoreError(f"case {it.trace_id} has no content to store")
            it = Captured(it.record, it.case)
        out.append(it)
    return out


def add_cases(store: Any, name: str, items: Iterable[Captured | DatasetCase], *, message: str, author: str,
              op: str = "add", difficulty: str = "") -> AddResult:
    """A new version of `name` (created when missing) with `items` appended; traces already in it are skipped and
    reported (`duplicates`). Content is stored first, the version last."""
    new = _norm_captured(items)
    if difficulty and difficulty not in DIFFICULTIES:
        raise DatasetStoreError(f"bad difficulty {difficulty!r}: use one of {', '.join(DIFFICULTIES)}")
    if not new:
        raise DatasetStoreError(f"nothing to add to {name!r}: no case was selected")
    put_content(store, {c.trace_id: content_json(c.case) for c in new})
    result: dict[str, list[str]] = {}

    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        have = {c.trace_id for c in cases}
        added, dups = [], []
        for c in new:
            if c.trace_id in have:
                dups.append(c.trace_id)
                continue
            have.add(c.trace_id)
            rec = dataclasses.replace(c.record)
            if difficulty:
                rec.difficulty, rec.difficulty_source = difficulty, "hand"
            cases.append(rec)
            added.append(c.trace_id)
        result["added"], result["dups"] = added, dups
        return cases, latest.targets if latest else {}

    try:
        v = commit(store, name, change, author=author, message=message, op=op)
    except NoChange:
        raise NoChange(f"nothing new: all {len(result['dups'])} selected trace(s) are already in {name!r}; no new "
                       "version") from None
    return AddResult(v, result["added"], result["dups"])


def remove_cases(store: Any, name: str, trace_ids: Sequence[str], *, message: str, author: str,
                 force: bool = False, reason: str = "") -> Version:
    """A new version without `trace_ids`. A locked case goes only with `force` and a `reason`, which the log keeps."""
    ids = list(dict.fromkeys(trace_ids))

    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        by_id = {c.trace_id: c for c in cases}
        missing = [t for t in ids if t not in by_id]
        if missing:
            raise DatasetStoreError(f"not in {latest.ref if latest else name}: {', '.join(missing[:5])}")
        locked = [t for t in ids if by_id[t].locked]
        if locked and not (force and reason.strip()):
            raise DatasetStoreError(f"{', '.join(locked[:5])} {'is' if len(locked) == 1 else 'are'} locked (a fixed "
                                    "bug's regression case): remove with --force and --reason, which the log keeps")
        drop = set(ids)
        return [c for c in cases if c.trace_id not in drop], latest.targets if latest else {}

    return commit(store, name, change, author=author, message=message, op="remove", create=False)


def lock_case(store: Any, name: str, item: Captured | DatasetCase | None, trace_id: str, *, expect: str, note: str,
              message: str, author: str) -> Version:
    """Lock `trace_id` in `name` with its expected outcome: added first when it is not a case yet (`item` is its
    capture then), and the dataset created when it does not exist."""
    if expect not in EXPECTS:
        raise DatasetStoreError(f"bad --expect {expect!r}: pass or fail")
    if item is not None:
        (cap,) = _norm_captured([item])
        put_content(store, {cap.trace_id: content_json(cap.case)})

    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        by_id = {c.trace_id: c for c in cases}
        rec = by_id.get(trace_id)
        if rec is None:
            if item is None:
                raise DatasetStoreError(f"trace {trace_id} is not in {name!r} and was not captured")
            rec = dataclasses.replace(cap.record)
            cases.append(rec)
        rec.locked, rec.expect, rec.lock_note = True, expect, note
        return cases, latest.targets if latest else {}

    return commit(store, name, change, author=author, message=message, op="lock")


def label_cases(store: Any, name: str, trace_ids: Sequence[str], *, label: str, critique: str = "",
                labeller: str = "", adjudicated: bool = False, message: str, author: str) -> Version:
    """A new version with `trace_ids` labelled pass|fail (critique, labeller, adjudicated)."""
    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        return relabel(cases, trace_ids, label=label, critique=critique, labeller=labeller,
                       adjudicated=adjudicated), latest.targets if latest else {}

    return commit(store, name, change, author=author, message=message, op="label", create=False)


def set_difficulty(store: Any, name: str, assignments: dict[str, str], *, source: str, message: str,
                   author: str) -> Version:
    """A new version with each trace's difficulty set (`source`: hand | history)."""
    bad = {d for d in assignments.values() if d not in DIFFICULTIES}
    if bad:
        raise DatasetStoreError(f"bad difficulty {sorted(bad)[0]!r}: use one of {', '.join(DIFFICULTIES)}")

    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        by_id = {c.trace_id: c for c in cases}
        missing = [t for t in assignments if t not in by_id]
        if missing:
            raise DatasetStoreError(f"not in {latest.ref if latest else name}: {', '.join(missing[:5])}")
        for t, d in assignments.items():
            by_id[t].difficulty, by_id[t].difficulty_source = d, source
        return cases, latest.targets if latest else {}

    return commit(store, name, change, author=author, message=message, op="difficulty", create=False)


def set_targets(store: Any, name: str, targets: dict, *, message: str, author: str) -> Version:
    """A new version with the coverage targets (per slice, difficulty mix) replaced by `targets`."""
    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        return cases, targets

    return commit(store, name, change, author=author, message=message, op="targets", create=False)


def import_losses(before: Sequence[CaseRecord], after: Sequence[CaseRecord]) -> dict[str, list[str]]:
    """What a version holding exactly `after` takes away from `before`, by trace id: cases gone, locks dropped
    (gone, unlocked or expecting another outcome) and labels cleared or changed."""
    now = {c.trace_id: c for c in after}
    out: dict[str, list[str]] = {"cases": [], "locks": [], "labels": []}
    for c in before:
        n = now.get(c.trace_id)
        if n is None:
            out["cases"].append(c.trace_id)
        if c.locked and (n is None or not n.locked or n.expect != c.expect):
            out["locks"].append(c.trace_id)
        if c.label and n is not None and n.label != c.label:
            out["labels"].append(c.trace_id)
    return out


def import_version(store: Any, name: str, items: Sequence[Captured], targets: dict, *,
                   message: str | Callable[[], str], author: str, force: bool = False, reason: str = "",
                   losses: dict[str, list[str]] | None = None) -> Version:
    """A new version of `name` (created when missing) holding exactly `items` (an imported file's cases, their
    labels, difficulty and locks as the file says) and `targets`. Content first, the version last. A lock of the
    latest version that the file does not keep goes only with `force` and a `reason`, as in `remove_cases`;
    `losses` (when given) is filled with what the import took away (import_losses)."""
    new = _norm_captured(items)
    put_content(store, {c.trace_id: content_json(c.case) for c in new})

    def change(latest: Version | None, cases: list[CaseRecord]) -> tuple[list[CaseRecord], dict]:
        after = [dataclasses.replace(c.record) for c in new]
        lost = import_losses(cases, after)
        if lost["locks"] and not (force and reason.strip()):
            ids = lost["locks"]
            raise DatasetStoreError(f"the file does not keep {len(ids)} lock(s) of {latest.ref if latest else name} "
                                    f"({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}): a locked case goes "
                                    "only with --force and --reason, which the log keeps")
        if losses is not None:
            losses.clear()
            losses.update(lost)
        return after, dict(targets)

    return commit(store, name, change, author=author, message=message, op="import")
