"""A dataset version as a JSONL file: one header line (`{"tagway_dataset": 1, "ref": "refunds@2", ...}`: name,
version, author, message, targets) and one line per case carrying everything: the trace id and shared keys, tags at
capture time, difficulty, label and critique, the lock, and the content (messages, params, production answer). So a
version can live in a repo, be reviewed in a pull request and be imported into another store after the original
calls are gone. Case lines are also valid `replay run --dataset FILE.jsonl` cases.

Import checks every line before it writes anything: a bad line stops it with the file, the line number and why,
and nothing is imported.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import orjson

from exporters.datasets import DIFFICULTIES, EXPECTS, LABELS, CaseRecord, DatasetStoreError, validate_name

from ..slice import Case
from .capture import Captured
from .pinned import check_writable
from .versions import Lock, LoadedDataset

__all__ = ["FORMAT", "Header", "ParsedFile", "export_lines", "write_export", "parse_file", "is_export_header"]

FORMAT = 1
_TRACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclasses.dataclass
class Header:
    name: str = ""
    version: int = 0
    author: str = ""
    message: str = ""
    targets: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" if self.name and self.version else self.name


@dataclasses.dataclass
class ParsedFile:
    path: str
    header: Header | None
    items: list[Captured]

    @property
    def cases(self) -> list[Case]:
        return [c.case for c in self.items]

    def locks(self) -> dict[str, Lock]:
        return {c.trace_id: Lock(c.trace_id, c.record.expect, c.record.lock_note) for c in self.items
                if c.record.locked}


def is_export_header(d: Any) -> bool:
    return isinstance(d, dict) and "tagway_dataset" in d


def export_lines(ds: LoadedDataset) -> list[bytes]:
    """The file's lines. Cases without stored content are refused (the file would not replay them)."""
    missing = [c.trace_id for c in ds.cases if c.case is None]
    if missing:
        raise DatasetStoreError(f"{ds.ref}: {len(missing)} case(s) have no stored content (e.g. {missing[0]}); "
                                "cannot export them with content")
    v = ds.version
    head = {"tagway_dataset": FORMAT, **v.to_json()}
    head.pop("version_id", None)
    lines = [orjson.dumps(head)]
    for c in ds.cases:
        assert c.case is not None
        line = {**c.case.to_json(), **c.record.to_json()}
        line["case_id"] = c.trace_id
        lines.append(orjson.dumps(line))
    return lines


def write_export(ds: LoadedDataset, path: str | Path, *, force: bool = False) -> int:
    from .pinned import is_dataset_file
    p = check_writable(path, "export file", force=force, keep_unless=is_dataset_file)
    try:
        p.write_bytes(b"\n".join(export_lines(ds)) + b"\n")
    except OSError as e:
        raise DatasetStoreError(f"cannot write {p}: {e.strerror or e}") from None
    return len(ds.cases)


def _header(d: dict, where: str) -> Header:
    if d.get("tagway_dataset") != FORMAT:
        raise DatasetStoreError(f"{where}: unknown dataset file format {d.get('tagway_dataset')!r} (this tagway "
                                f"reads {FORMAT})")
    name = str(d.get("name") or "")
    if name:
        validate_name(name)
    targets = d.get("targets") or {}
    if not isinstance(targets, dict):
        raise DatasetStoreError(f"{where}: targets must be a mapping")
    return Header(name, int(d.get("version") or 0), str(d.get("author") or ""), str(d.get("message") or ""), targets)


def _case(d: Any) -> Captured:
    if not isinstance(d, dict):
        raise ValueError("a case line is a JSON object")
    tid = d.get("trace_id") or d.get("case_id")
    if not isinstance(tid, str) or not _TRACE_RE.match(tid):
        field = "trace_id" if d.get("trace_id") or "case_id" not in d else "case_id"  # the one that was read
        raise ValueError(f"no valid {field} (a string of letters, digits, - and _)")
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("no messages to replay")
    for key, allowed in (("label", LABELS), ("difficulty", DIFFICULTIES), ("expect", EXPECTS)):
        v = d.get(key) or ""
        if v and v not in allowed:
            raise ValueError(f"{key} {v!r} is not one of {', '.join(allowed)}")
    if d.get("locked") and not d.get("expect"):
        raise ValueError("a locked case needs expect: pass or fail")
    for key in ("tags", "columns", "params"):
        if not isinstance(d.get(key) or {}, dict):
            raise ValueError(f"{key} must be an object")
    rec_fields = {f.name for f in dataclasses.fields(CaseRecord)}
    rec = CaseRecord.from_json({k: v for k, v in d.items() if k in rec_fields and v is not None} | {"trace_id": tid})
    rec.tags = {str(k): str(v) for k, v in rec.tags.items()}
    rec.columns = {str(k): str(v) for k, v in rec.columns.items()}
    rec.segment = rec.segment or rec.customer or "(none)"
    case = Case.from_json({**d, "case_id": tid, "segment": rec.segment})
    return Captured(rec, case)


def parse_file(path: str | Path) -> ParsedFile:
    """Every line checked; the first bad one raises DatasetStoreError('FILE:LINE: why')."""
    p = Path(path)
    try:
        lines = p.read_bytes().splitlines()
    except OSError as e:
        raise DatasetStoreError(f"cannot read {p}: {e.strerror or e}") from None
    header: Header | None = None
    items: list[Captured] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise DatasetStoreError(f"{where}: not JSON ({str(e).splitlines()[0]})") from None
        if is_export_header(d):
            if header is not None or items:
                raise DatasetStoreError(f"{where}: the dataset header must be the first line, once")
            header = _header(d, where)
            continue
        try:
            item = _case(d)
        except (ValueError, TypeError) as e:
            raise DatasetStoreError(f"{where}: bad case ({e})") from None
        if item.trace_id in seen:
            raise DatasetStoreError(f"{where}: trace {item.trace_id} is already on line {seen[item.trace_id]}")
        seen[item.trace_id] = i
        items.append(item)
    if not items:
        raise DatasetStoreError(f"{p}: no case in the file")
    return ParsedFile(str(p), header, items)

