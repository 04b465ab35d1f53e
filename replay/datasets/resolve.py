"""What `replay run --dataset REF` (and a spec's `dataset:`) loads, and the exact reference the run records:

- a versioned dataset: `refunds` (the latest version, recorded as e.g. `refunds@3`) or `refunds@3` (pinned);
- a JSONL file (a path ending in .jsonl/.json or containing a /): an export (`tagway dataset export`) or the cases
  `replay dataset save` wrote; recorded as the path;
- a pinned id in `replay_datasets` (`replay dataset save ID`, and the `run-<run_id>` lists runs pin).
Locks come along from versioned datasets and exports, so the gate can hold them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from exporters.datasets import NAME_RE, DatasetNotFound, dataset_names, nearest, parse_ref

from ..slice import Case
from .jsonl import parse_file
from .pinned import RUN_DATASET_PREFIX, is_file_ref, list_datasets, load_cases
from .versions import Lock, load

__all__ = ["Resolved", "resolve"]


@dataclasses.dataclass
class Resolved:
    dataset_id: str  # what the run and its results record: 'refunds@3', a pinned id, or the file path
    cases: list[Case]
    skipped: dict[str, int]
    locks: dict[str, Lock] = dataclasses.field(default_factory=dict)
    name: str = ""  # the dataset whatever its version: 'refunds' for 'refunds@3'; else the id or path


def resolve(store: Any, ref: str, *, pinned_id: bool = False) -> Resolved:
    if pinned_id:
        cases, skipped = load_cases(store, ref, pinned_id=True)
        return Resolved(ref, cases, skipped, name=ref)
    if is_file_ref(ref):
        parsed = parse_file(ref)
        return Resolved(ref, parsed.cases, {}, parsed.locks(), name=ref)
    name = ref.partition("@")[0]
    versioned = dataset_names(store)
    if NAME_RE.match(name) and name in versioned:
        parse_ref(ref)
        ds = load(store, ref)
        cases, skipped = ds.replay_cases()
        return Resolved(ds.ref, cases, skipped, ds.locks(), name=name)
    listed = [r["dataset_id"] for r in list_datasets(store, include_runs=True)]  # a run's own cases too
    if ref in listed:
        cases, skipped = load_cases(store, ref, pinned_id=True)
        return Resolved(ref, cases, skipped, name=ref)
    pinned = [d for d in listed if not d.startswith(RUN_DATASET_PREFIX)]
    close = nearest(ref, [*versioned, *pinned])
    hint = f"did you mean {', '.join(close)}?" if close else "see `tagway dataset list`"
    if Path(ref).is_file():
        hint += f"; for the file, write ./{ref}"
    raise DatasetNotFound(f"no dataset {ref!r} ({hint})")
