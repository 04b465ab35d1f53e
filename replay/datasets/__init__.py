"""Datasets, the product's memory (issue 12). Its faces:

- `versions`: load `NAME[@V]` -> cases with trace ids, labels, difficulty and locks; changes that make versions
  (add, remove, lock, label, difficulty, targets), over the storage core `exporters.datasets`;
- `capture`: production traces -> cases (trace id, shared keys and tags at capture time, content);
- `build`: which traces to add (a filtered, stratified sample; complaints and feedback; a run's flipped cases);
- `jsonl`: export/import of a version with its content (a version can live in a repo and outlive the TTL);
- `design`: coverage targets per slice and difficulty mix, and difficulty proposed from run history;
- `pinned`: the frozen id lists replay runs pin their sampled cases to (`run-<run_id>`), and JSONL case files;
- `resolve`: what `replay run --dataset REF` loads (a versioned dataset, a pinned id or a file);
- `autopopulate`, `populate`: what a dataset declares to take from production (filter, sampling rate by trace id
  hash, cap, evaluators) and one population: the new sampled matching traces as a version (the delta runs that
  follow are replay.evals.populate);
- `cli`, `populate_cli`: `tagway dataset ...` (auto-populate and populate among them) and `tagway coverage`.
"""
from exporters.datasets import (DatasetNotFound, DatasetStoreError, NoChange, Version, format_ref, parse_ref)

from .capture import Captured, capture
from .pinned import (RUN_DATASET_PREFIX, DatasetError, append_to_run_dataset, check_writable, is_dataset_file,
                     is_file_ref, list_datasets, load_cases, load_dataset, load_jsonl, save_dataset, save_jsonl,
                     validate_dataset_id, validate_run_id)
from .versions import (AddResult, DatasetCase, LoadedDataset, Lock, add_cases, label_cases, load, lock_case,
                       remove_cases, set_difficulty, set_targets)

__all__ = ["DatasetError", "validate_dataset_id", "validate_run_id", "is_file_ref", "is_dataset_file",
           "check_writable", "save_dataset", "append_to_run_dataset", "load_dataset", "list_datasets", "save_jsonl",
           "load_jsonl", "load_cases", "RUN_DATASET_PREFIX",
           "DatasetStoreError", "DatasetNotFound", "NoChange", "Version", "parse_ref", "format_ref", "Captured",
           "capture", "DatasetCase", "LoadedDataset", "Lock", "AddResult", "load", "add_cases", "remove_cases",
           "lock_case", "label_cases", "set_difficulty", "set_targets"]
