"""Versioned datasets in ClickHouse (tables of migration 6): the storage core that `tagway dataset ...` (replay) and
the admin API (gateway) share, so labels written over HTTP and from the CLI make versions the same way.

A dataset is a name and immutable versions 1, 2, ... Each version is a full snapshot of its cases (metadata only:
trace id, segment, the shared keys and tags at capture time, difficulty, label, lock) under a random `version_id`;
the content a case replays (request, production answer) lives once per trace in `dataset_content`, so it outlives
the TTL of `llm_calls`. Writing a version is: content, then the case rows, then the version row last (the commit),
so a reader never sees half a version. Two writers of the same version number: the first insert (server clock)
wins, the other notices on reading back and applies its change again on top of the winner (`commit`).

Eval records join production in one query on shared keys: `dataset_cases.dataset_id` is `name@version`, the value
`replay_results.dataset_id` records, and `dataset_cases.trace_id` is `llm_calls.trace_id` (see JOIN_SQL).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import secrets
import time
from typing import Any, Callable, Iterable, Sequence

import orjson

__all__ = ["DatasetStoreError", "DatasetNotFound", "NoChange", "ConcurrentChange", "CaseRecord", "Version",
           "LABELS", "DIFFICULTIES", "EXPECTS", "NAME_RE", "validate_name", "parse_ref", "format_ref", "nearest",
           "dataset_names", "not_found", "latest_versions", "history", "get_version", "read_cases", "commit",
           "put_content", "get_content", "relabel", "cases_for_trace", "holding_trace", "ever_held", "JOIN_SQL"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LABELS = ("pass", "fail")
DIFFICULTIES = ("easy", "medium", "hard", "safety")
EXPECTS = LABELS
_CHUNK = 2000


class DatasetStoreError(ValueError):
    """Bad input about a dataset (unknown name or version, empty version, bad label): one line for a user."""


class DatasetNotFound(DatasetStoreError):
    pass


class NoChange(DatasetStoreError):
    """The change would make a version identical to the latest one: no version is made."""


class ConcurrentChange(DatasetStoreError):
    pass


@dataclasses.dataclass
class CaseRecord:
    """One case of one version, without its content."""
    trace_id: str
    segment: str = ""
    customer: str = ""
    intent: str = ""
    prompt_version: str = ""
    model: str = ""
    source: str = ""
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # every vocabulary column at capture time
    tags: dict[str, str] = dataclasses.field(default_factory=dict)  # the call's tags at capture time
    captured_at: float = 0.0  # when the production call happened (epoch seconds)
    added_at: float = 0.0
    added_by: str = ""
    origin: str = ""  # where | feedback | run | trace | lock | import
    difficulty: str = ""  # easy | medium | hard | safety | "" (not set)
    difficulty_source: str = ""  # hand | history | import
    label: str = ""  # pass | fail | "" (unlabelled)
    critique: str = ""
    labeller: str = ""
    adjudicated: bool = False
    labelled_at: float | None = None
    locked: bool = False
    expect: str = ""  # the lock's expected outcome: pass | fail
    lock_note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CaseRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def matches(self, filters: Iterable[Any]) -> bool:
        """Does this case fall in the slice `filters` (exporters.vocabulary Filters: column or tag.<key>)?"""
        for f in filters:
            value = self.tags.get(f.key[4:], "") if f.key.startswith("tag.") else self.columns.get(f.key, "")
            if (value == f.value) != (f.op == "="):
                return False
        return True


@dataclasses.dataclass
class Version:
    name: str
    version: int
    version_id: str
    created_at: float
    author: str
    message: str
    op: str
    parent: int
    n_cases: int
    targets: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ref": self.ref}


# -- names and references ----------------------------------------------------------------------------------------
def validate_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise DatasetStoreError(f"bad dataset name {name!r}: 1-64 of [A-Za-z0-9_.-], starting with a letter or "
                                "digit (NAME@N names version N)")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'refunds' -> ('refunds', None: the latest); 'refunds@3' -> ('refunds', 3)."""
    name, sep, v = (ref or "").strip().partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not v.isdigit() or int(v) < 1:
        raise DatasetStoreError(f"bad dataset version {ref!r}: use NAME@N with N = 1, 2, ...")
    return name, int(v)


def format_ref(name: str, version: int) -> str:
    return f"{name}@{version}"


def nearest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    return close or [c for c in choices if word.lower() in c.lower()][:n]


# -- reading -----------------------------------------------------------------------------------------------------
_VERSION_COLS = ("name, version, version_id, toFloat64(created_at) AS created_at, author, message, op, parent, "
                 "n_cases, targets_json")
# every (name, version) once: the first insert wins (a concurrent loser's row is never read)
_WINNERS = "SELECT * FROM dataset_versions {where} ORDER BY name, version, inserted, version_id LIMIT 1 BY name, version"


def _version(r: dict) -> Version:
    targets = orjson.loads(r["targets_json"]) if r.get("targets_json") else {}
    return Version(r["name"], int(r["version"]), r["version_id"], float(r["created_at"]), r["author"], r["message"],
                   r["op"], int(r["parent"]), int(r["n_cases"]), targets)


def dataset_names(store: Any) -> list[str]:
    return [r["name"] for r in store.query("SELECT DISTINCT name FROM dataset_versions ORDER BY name")]


def latest_versions(store: Any, names: Sequence[str] | None = None) -> list[Version]:
    """The latest version of every dataset (or of `names`), by name."""
    where, params = ("WHERE name IN {names:Array(String)}", {"names": list(names)}) if names is not None else ("", {})
    rows = store.query(f"SELECT {_VERSION_COLS} FROM ({_WINNERS.format(where=where)}) "
                       "ORDER BY name, version DESC LIMIT 1 BY name", params)
    return [_version(r) for r in rows]


def history(store: Any, name: str) -> list[Version]:
    """Every version of `name`, newest first (the log)."""
    rows = store.query(f"SELECT {_VERSION_COLS} FROM ({_WINNERS.format(where='WHERE name = {name:String}')}) "
                       "ORDER BY version DESC", {"name": validate_name(name)})
    if not rows:
        raise not_found(store, name)
    return [_version(r) for r in rows]


def not_found(store: Any, name: str) -> DatasetNotFound:
    """The error for a dataset that is not there, naming the nearest names (or what there is)."""
    names = dataset_names(store)
    close = nearest(name, names)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"datasets: {', '.join(names[:10])}" if names else "there is no dataset yet")
    return DatasetNotFound(f"no dataset {name!r} ({hint}; see `tagway dataset list`)")


def get_version(store: Any, ref: str) -> Version:
    """The version `ref` names ('refunds' = latest, 'refunds@3'). Unknown names and versions raise DatasetNotFound
    naming the nearest datasets or the versions there are."""
    name, v = parse_ref(ref)
    versions = history(store, name)
    if v is None:
        return versions[0]
    for ver in versions:
        if ver.version == v:
            return ver
    raise DatasetNotFound(f"dataset {name!r} has no version {v} (it has {name}@1 to {name}@{versions[0].version})")


_CASE_FIELDS = [f.name for f in dataclasses.fields(CaseRecord)]
_TIME_FIELDS = ("captured_at", "added_at", "labelled_at")


def read_cases(store: Any, version: Version) -> list[CaseRecord]:
    cols = ", ".join(f"toFloat64({c}) AS {c}" if c in _TIME_FIELDS else c for c in _CASE_FIELDS)
    rows = store.query(f"SELECT {cols} FROM dataset_cases WHERE name = {{name:String}} AND version = {{v:UInt32}} "
                       "AND version_id = {id:String} ORDER BY position",
                       {"name": version.name, "v": version.version, "id": version.version_id})
    out = []
    for r in rows:
        r["columns"], r["tags"] = dict(r["columns"] or {}), dict(r["tags"] or {})
        r["adjudicated"], r["locked"] = bool(r["adjudicated"]), bool(r["locked"])
        out.append(CaseRecord(**r))
    return out


def ever_held(store: Any, name: str) -> set[str]:
    """Every trace any version of `name` ever held: a trace removed by hand stays out of automatic additions."""
    return {r["trace_id"] for r in store.query(
        "SELECT DISTINCT trace_id FROM dataset_cases WHERE name = {n:String} AND version_id IN (SELECT version_id "
        "FROM dataset_versions WHERE name = {n:String} ORDER BY version, inserted, version_id LIMIT 1 BY version)",
        {"n": name})}


def get_content(store: Any, trace_ids: Iterable[str]) -> dict[str, str]:
    """trace id -> the case content (JSON text) stored when it joined a dataset; ids without content are absent."""
    ids, out = sorted(set(trace_ids)), {}
    for i in range(0, len(ids), _CHUNK):
        for r in store.query("SELECT trace_id, any(content) AS content FROM dataset_content WHERE trace_id IN "
                             "{ids:Array(String)} GROUP BY trace_id", {"ids": ids[i:i + _CHUNK]}):
            out[r["trace_id"]] = r["content"]
    return out


# -- writing -----------------------------------------------------------------------------------------------------
def put_content(store: Any, contents: dict[str, str]) -> int:
    """Store the content of traces that have none yet (a trace's content never changes)."""
    have = get_content(store, contents)
    now = time.time()
    rows = [orjson.dumps({"trace_id": t, "content": c, "added_at": now}) for t, c in contents.items() if t not in have]
    if rows:
        store.insert_json_rows("dataset_content", b"\n".join(rows))
    return len(rows)


# change(latest version or None, its cases) -> (the new version's cases, targets, message suffix or "")
Change = Callable[[Version | None, list[CaseRecord]], tuple[list[CaseRecord], dict[str, Any]]]


def _case_row(v: Version, position: int, c: CaseRecord) -> bytes:
    d = c.to_json()
    d.update(name=v.name, version=v.version, version_id=v.version_id, dataset_id=v.ref, position=position)
    return orjson.dumps(d)


def _winner(store: Any, name: str, version: int) -> str:
    rows = store.query("SELECT version_id FROM dataset_versions WHERE name = {n:String} AND version = {v:UInt32} "
                       "ORDER BY inserted, version_id LIMIT 1", {"n": name, "v": version})
    return rows[0]["version_id"] if rows else ""


def _same(a: list[CaseRecord], b: list[CaseRecord]) -> bool:
    return [x.to_json() for x in a] == [x.to_json() for x in b]


def _refuse_pinned_name(store: Any, name: str) -> None:
    """A new versioned dataset may not take the name of a pinned one (`replay dataset save`): `--dataset NAME`
    would silently switch from the pinned cases to the new version's (a CI gate's input changing unsaid)."""
    rows = store.query("SELECT count() AS n FROM replay_datasets WHERE dataset_id = {id:String}", {"id": name})
    if rows and rows[0]["n"]:
        raise DatasetStoreError(f"a pinned dataset named {name!r} exists (`tagway replay dataset save`): "
                                f"`--dataset {name}` would stop meaning it; choose another name")


def commit(store: Any, name: str, change: Change, *, author: str, message: str | Callable[[], str],
           op: str, create: bool = True, attempts: int = 5) -> Version:
    """Make the next version of `name` from its latest one with `change` (a pure function of the latest cases).
    Creates the dataset (version 1) when `create` and it does not exist. Refuses an empty version (and a change
    that changes nothing: NoChange). Retries on a concurrent writer, applying `change` to the winner. `message` may
    be a function, asked once `change` has run (what the version says may depend on what it changed)."""
    validate_name(name)
    for _ in range(attempts):
        try:
            latest: Version | None = history(store, name)[0]
        except DatasetNotFound:
            if not create:
                raise
            latest = None
            _refuse_pinned_name(store, name)
        before = read_cases(store, latest) if latest is not None else []
        cases, targets = change(latest, [dataclasses.replace(c) for c in before])
        _check_unique(cases)
        if not cases:
            raise DatasetStoreError(f"refusing to make an empty version of {name!r} (a dataset keeps at least one "
                                    "case)")
        if latest is not None and _same(cases, before) and targets == latest.targets:
            raise NoChange(f"nothing changed: {latest.ref} already holds this; no new version")
        v = Version(name, (latest.version if latest else 0) + 1, secrets.token_hex(8), time.time(), author,
                    message() if callable(message) else message, op, latest.version if latest else 0, len(cases),
                    targets)
        for i in range(0, len(cases), _CHUNK):
            store.insert_json_rows("dataset_cases", b"\n".join(_case_row(v, i + j, c)
                                                                for j, c in enumerate(cases[i:i + _CHUNK])))
        row = {k: getattr(v, k) for k in ("name", "version", "version_id", "created_at", "author", "message", "op",
                                          "parent", "n_cases")}
        row["targets_json"] = orjson.dumps(targets).decode()
        store.insert_json_rows("dataset_versions", orjson.dumps(row))  # the commit
        if _winner(store, name, v.version) == v.version_id:
            return v
    raise ConcurrentChange(f"dataset {name!r} kept changing under this write ({attempts} attempts); try again")


def _check_unique(cases: Sequence[CaseRecord]) -> None:
    seen: set[str] = set()
    for c in cases:
        if c.trace_id in seen:  # a programming error in a change function: never store a trace twice
            raise AssertionError(f"trace {c.trace_id} twice in one version")
        seen.add(c.trace_id)


def relabel(cases: list[CaseRecord], trace_ids: Sequence[str], *, label: str, critique: str = "",
            labeller: str = "", adjudicated: bool = False, now: float | None = None) -> list[CaseRecord]:
    """Pure: the cases with `trace_ids` labelled pass|fail (with critique, labeller, adjudicated flag). Unknown
    trace ids and labels other than pass/fail raise DatasetStoreError."""
    if label not in LABELS:
        raise DatasetStoreError(f"bad label {label!r}: a label is pass or fail (binary; the nuance goes in the "
                                "critique)")
    by_id = {c.trace_id: c for c in cases}
    missing = [t for t in trace_ids if t not in by_id]
    if missing:
        raise DatasetStoreError(f"not in this dataset: {', '.join(missing[:5])}"
                                f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
    now = time.time() if now is None else now
    for t in trace_ids:
        c = by_id[t]
        if (c.label, c.critique, c.labeller, c.adjudicated) != (label, critique, labeller, adjudicated):
            c.label, c.critique, c.labeller, c.adjudicated, c.labelled_at = label, critique, labeller, adjudicated, now
    return cases


def cases_for_trace(store: Any, trace_id: str) -> list[dict[str, Any]]:
    """The latest version of each dataset that holds `trace_id` and labels, locks or grades it: the case's label,
    lock and difficulty (the case board's "labels" section; a dataset merely holding it is in "In datasets")."""
    ids = [v.version_id for v in latest_versions(store)]
    if not ids:
        return []
    return store.query("SELECT dataset_id, label, critique, labeller, adjudicated, locked, expect, lock_note, "
                       "difficulty FROM dataset_cases WHERE trace_id = {t:String} AND version_id IN "
                       "{ids:Array(String)} AND (label != '' OR locked OR difficulty != '') ORDER BY dataset_id",
                       {"t": trace_id, "ids": ids})


def holding_trace(store: Any, trace_id: str) -> list[dict[str, Any]]:
    """The latest version of each dataset that holds `trace_id` (the case board's "In datasets" section, beside the
    pinned ones): its ref, the case's segment, when the case was added and the version's message."""
    latest = {v.version_id: v for v in latest_versions(store)}
    if not latest:
        return []
    rows = store.query("SELECT version_id, segment, toFloat64(added_at) AS added_at FROM dataset_cases "
                       "WHERE trace_id = {t:String} AND version_id IN {ids:Array(String)}",
                       {"t": trace_id, "ids": list(latest)})
    return sorted(({"dataset_id": latest[r["version_id"]].ref, "segment": r["segment"],
                    "description": latest[r["version_id"]].message, "added_at": r["added_at"]} for r in rows),
                  key=lambda r: r["dataset_id"])


# Every replayed case of a run beside its dataset case (label, lock, difficulty) and the production call it came
# from: one query on the shared keys.
JOIN_SQL = """SELECT r.run_id AS run_id, r.candidate AS candidate, r.case_id AS trace_id, r.status AS status,
       d.dataset_id AS dataset_id, d.label AS label, d.locked AS locked, d.difficulty AS difficulty,
       p.customer AS customer, p.intent AS intent, p.prompt_version AS prompt_version, p.model_requested AS model,
       p.status AS production_status
FROM replay_results AS r
INNER JOIN dataset_cases AS d ON d.dataset_id = r.dataset_id AND d.trace_id = r.case_id
INNER JOIN llm_calls AS p ON p.trace_id = r.case_id
WHERE r.run_id = {run_id:String} AND p.replay_run_id = ''
  AND d.version_id IN (SELECT version_id FROM dataset_versions ORDER BY name, version, inserted, version_id
                       LIMIT 1 BY name, version)"""
