"""Pinned datasets: a slice frozen as a list of (trace id, segment), so the same cases can be replayed against
every future candidate. Two homes: the `replay_datasets` table (ids, immutable once saved) or a JSONL file,
which also carries each case's content so it survives the TTL of `llm_calls` (and can be shared in a repo).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from exporters.datasets import dataset_names

from ..slice import Case, Sampled, fetch_cases

__all__ = ["DatasetError", "validate_dataset_id", "validate_run_id", "is_file_ref", "is_dataset_file",
           "check_writable", "save_dataset", "append_to_run_dataset", "load_dataset", "list_datasets", "save_jsonl",
           "load_jsonl", "load_cases", "RUN_DATASET_PREFIX"]

# Ids and files never overlap: a reference is a file when it ends in .jsonl/.json or contains a path separator
# (write ./golden for a file without a suffix); ids start with a letter, digit or _ and never end in those suffixes.
FILE_SUFFIXES = (".jsonl", ".json")
_ID_CHARS = r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]"
_ID_RE = re.compile(_ID_CHARS + "{0,127}")
RUN_DATASET_PREFIX = "run-"  # the cases a slice run sampled are pinned as dataset run-<run_id> (resume reads it)
_RUN_ID_RE = re.compile(_ID_CHARS + "{0,%d}" % (127 - len(RUN_DATASET_PREFIX)))
_SEPARATORS = tuple(sep for sep in ("/", os.sep, os.altsep) if sep)


class DatasetError(ValueError):
    """A dataset id or file is invalid, missing or already taken."""


def _has_file_suffix(ref: str) -> bool:
    return ref.lower().endswith(FILE_SUFFIXES)


def validate_dataset_id(dataset_id: str) -> str:
    if not _ID_RE.fullmatch(dataset_id) or _has_file_suffix(dataset_id):
        raise DatasetError(f"bad dataset id {dataset_id!r}: 1-128 of [A-Za-z0-9_.:@+-], starting with a letter, digit "
                           "or _, not ending in .json/.jsonl (a file is a path ending in .jsonl/.json or containing "
                           "a /)")
    return dataset_id


def validate_run_id(run_id: str) -> str:
    """Run ids follow the dataset id rules (a slice run pins its cases as dataset run-<run_id>)."""
    limit = 128 - len(RUN_DATASET_PREFIX)
    if not _RUN_ID_RE.fullmatch(run_id) or _has_file_suffix(run_id):
        raise DatasetError(f"bad run id {run_id!r}: 1-{limit} of [A-Za-z0-9_.:@+-], starting with a letter, digit or "
                           "_, not ending in .json/.jsonl")
    return run_id


def is_file_ref(ref: str) -> bool:
    """A dataset reference names a JSONL file when it says so (suffix or path separator); otherwise it is an id.
    Never guessed from what happens to exist in the current directory."""
    return _has_file_suffix(ref) or any(sep in ref for sep in _SEPARATORS)


def is_dataset_file(path: str | Path) -> bool:
    """An existing file that holds tagway cases (what `save_jsonl` writes), so overwriting it loses no other data."""
    try:
        load_jsonl(path)
    except DatasetError:
        return False
    return True


def check_writable(path: str | Path, what: str, *, force: bool = False,
                   keep_unless: Callable[[Path], bool] | None = None) -> Path:
    """Fail early (before any query or paid call) when `path` cannot be written: its directory is missing or not
    writable, it is a directory, or it exists and `keep_unless(path)` is false and `force` is not set."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise DatasetError(f"{what} {p}: is a directory")
    if not parent.is_dir():
        raise DatasetError(f"{what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise DatasetError(f"{what} {p}: not writable")
    if p.exists() and keep_unless is not None and not force and not keep_unless(p):
        raise DatasetError(f"{what} {p}: refusing to overwrite a file that is not a tagway dataset (pass --force)")
    return p


def _insert(store: Any, dataset_id: str, picked: Sequence[Sampled], start: int, description: str) -> int:
    now = time.time()
    body = b"\n".join(orjson.dumps({"dataset_id": dataset_id, "trace_id": p.trace_id, "segment": p.segment,
                                    "position": start + i, "description": description, "added_at": now})
                      for i, p in enumerate(picked))
    if picked:
        store.insert_json_rows("replay_datasets", body)
    return len(picked)


def save_dataset(store: Any, dataset_id: str, picked: Sequence[Sampled], description: str = "") -> int:
    validate_dataset_id(dataset_id)
    if not picked:
        raise DatasetError("refusing to save an empty dataset")
    n = store.query("SELECT count() AS n FROM replay_datasets WHERE dataset_id = {id:String}", {"id": dataset_id})
    if n and n[0]["n"]:
        raise DatasetError(f"dataset {dataset_id!r} already exists (datasets are pinned: choose a new id)")
    if dataset_id in dataset_names(store):  # `--dataset ID` resolves to the versioned one first: this would be unseen
        raise DatasetError(f"a versioned dataset named {dataset_id!r} exists (`tagway dataset`): choose a new id")
    return _insert(store, dataset_id, picked, 0, description)


def append_to_run_dataset(store: Any, dataset_id: str, picked: Sequence[Sampled], start: int,
                          description: str = "") -> int:
    """Escalation: more cases pinned to a run's own dataset (run-<run_id>), after the `start` cases it holds, so a
    resume replays them too. Only tagway appends, and only to the run's dataset; saved datasets stay immutable."""
    if not dataset_id.startswith(RUN_DATASET_PREFIX):
        raise DatasetError(f"only a run's own dataset grows, not {dataset_id!r}")
    return _insert(store, dataset_id, picked, start, description)


def load_dataset(store: Any, dataset_id: str, *, validate: bool = True) -> list[Sampled]:
    rows = store.query("SELECT trace_id, segment FROM replay_datasets WHERE dataset_id = {id:String} "
                       "ORDER BY position LIMIT 1 BY trace_id",
                       {"id": validate_dataset_id(dataset_id) if validate else dataset_id})
    if not rows:
        hint = f"; for the file, write ./{dataset_id}" if Path(dataset_id).is_file() else ""
        raise DatasetError(f"no dataset {dataset_id!r} (see `tagway replay dataset list`{hint})")
    return [Sampled(r["trace_id"], r["segment"]) for r in rows]


def list_datasets(store: Any, *, include_runs: bool = False) -> list[dict]:
    rows = store.query("SELECT dataset_id, count() AS n, uniqExact(segment) AS segments, any(description) AS "
                       "description, toFloat64(min(added_at)) AS created_at FROM replay_datasets GROUP BY dataset_id "
                       "ORDER BY created_at DESC")
    return [r for r in rows if include_runs or not r["dataset_id"].startswith(RUN_DATASET_PREFIX)]


def save_jsonl(path: str | Path, cases: Sequence[Case], *, force: bool = False) -> int:
    """Write full cases (request, baseline answer, keys) one per line. An existing file is replaced only when it is
    a tagway dataset (or `force`)."""
    p = check_writable(path, "dataset file", force=force, keep_unless=is_dataset_file)
    try:
        p.write_bytes(b"".join(orjson.dumps(c.to_json()) + b"\n" for c in cases))
    except OSError as e:
        raise DatasetError(f"cannot write dataset file {p}: {e.strerror or e}") from None
    return len(cases)


def load_jsonl(path: str | Path) -> list[Case]:
    p = Path(path)
    try:
        lines = p.read_bytes().splitlines()
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {p}: {e.strerror}") from None
    cases = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = orjson.loads(line)
            if isinstance(d, dict) and "tagway_dataset" in d:  # the header of a versioned export (replay.datasets.jsonl)
                continue
            if "case_id" not in d and "trace_id" in d:
                d["case_id"] = d.pop("trace_id")
            if not d.get("messages"):
                raise ValueError("no messages")
            d.setdefault("segment", d.get("customer") or "(none)")
            cases.append(Case.from_json(d))
        except (orjson.JSONDecodeError, ValueError, TypeError) as e:
            raise DatasetError(f"{p}:{i}: bad case line ({e})") from None
    if not cases:
        raise DatasetError(f"dataset file {p} has no case")
    return cases


def load_cases(store: Any, ref: str, *, pinned_id: bool = False) -> tuple[list[Case], dict[str, int]]:
    """A dataset id (content from llm_calls) or a JSONL file (content inline) -> (cases, skipped reasons).
    `pinned_id`: `ref` is an id tagway itself stored (a run's run-<run_id>), never a file."""
    if pinned_id:
        return fetch_cases(store, load_dataset(store, ref, validate=False))
    if is_file_ref(ref):
        return load_jsonl(ref), {}
    return fetch_cases(store, load_dataset(store, ref))
