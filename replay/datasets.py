"""Pinned datasets: a slice frozen as a list of (trace id, segment), so the same cases can be replayed against
every future candidate. Two homes: the `replay_datasets` table (ids, immutable once saved) or a JSONL file,
which also carries each case's content so it survives the TTL of `llm_calls` (and can be shared in a repo).
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Sequence

import orjson

from .slice import Case, Sampled, fetch_cases

__all__ = ["DatasetError", "validate_dataset_id", "is_file_ref", "save_dataset", "load_dataset", "list_datasets",
           "save_jsonl", "load_jsonl", "load_cases", "RUN_DATASET_PREFIX"]

_ID_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")
RUN_DATASET_PREFIX = "run-"  # the cases a slice run sampled are pinned as dataset run-<run_id> (resume reads it)


class DatasetError(ValueError):
    """A dataset id or file is invalid, missing or already taken."""


def validate_dataset_id(dataset_id: str) -> str:
    if not _ID_RE.match(dataset_id):
        raise DatasetError(f"bad dataset id {dataset_id!r} (1-128 of [A-Za-z0-9_.:@+-])")
    return dataset_id


def is_file_ref(ref: str) -> bool:
    return ref.endswith((".jsonl", ".json")) or "/" in ref or Path(ref).is_file()


def save_dataset(store: Any, dataset_id: str, picked: Sequence[Sampled], description: str = "") -> int:
    validate_dataset_id(dataset_id)
    if not picked:
        raise DatasetError("refusing to save an empty dataset")
    n = store.query("SELECT count() AS n FROM replay_datasets WHERE dataset_id = {id:String}", {"id": dataset_id})
    if n and n[0]["n"]:
        raise DatasetError(f"dataset {dataset_id!r} already exists (datasets are pinned: choose a new id)")
    now = time.time()
    body = b"\n".join(orjson.dumps({"dataset_id": dataset_id, "trace_id": p.trace_id, "segment": p.segment,
                                    "position": i, "description": description, "added_at": now})
                      for i, p in enumerate(picked))
    store.insert_json_rows("replay_datasets", body)
    return len(picked)


def load_dataset(store: Any, dataset_id: str) -> list[Sampled]:
    rows = store.query("SELECT trace_id, segment FROM replay_datasets WHERE dataset_id = {id:String} "
                       "ORDER BY position LIMIT 1 BY trace_id", {"id": validate_dataset_id(dataset_id)})
    if not rows:
        raise DatasetError(f"no dataset {dataset_id!r} (see `tagway replay dataset list`)")
    return [Sampled(r["trace_id"], r["segment"]) for r in rows]


def list_datasets(store: Any, *, include_runs: bool = False) -> list[dict]:
    rows = store.query("SELECT dataset_id, count() AS n, uniqExact(segment) AS segments, any(description) AS "
                       "description, toFloat64(min(added_at)) AS created_at FROM replay_datasets GROUP BY dataset_id "
                       "ORDER BY created_at DESC")
    return [r for r in rows if include_runs or not r["dataset_id"].startswith(RUN_DATASET_PREFIX)]


def save_jsonl(path: str | Path, cases: Sequence[Case]) -> int:
    """Write full cases (request, baseline answer, keys) one per line."""
    Path(path).write_bytes(b"".join(orjson.dumps(c.to_json()) + b"\n" for c in cases))
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


def load_cases(store: Any, ref: str) -> tuple[list[Case], dict[str, int]]:
    """A dataset id (content from llm_calls) or a JSONL file (content inline) -> (cases, skipped reasons)."""
    if is_file_ref(ref):
        return load_jsonl(ref), {}
    return fetch_cases(store, load_dataset(store, ref))
