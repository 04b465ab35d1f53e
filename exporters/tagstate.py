"""Applied tags: what tag rules and people put on a message (one call, by trace id) or a session, kept as an event
log plus a current-state table (migration 8).

- `tag_events` is the audit log: one row per change (apply or remove), with who did it (`rule:<evaluator>/<rule>`
  or `human:<key id>`), the run and its mode, and the field value that caused it. Rows are never updated.
- `tag_state` holds the newest event per (target, tag): a ReplacingMergeTree(version) filled by a materialized view
  from `tag_events`, so one insert writes both. Reads never use FINAL: they take `argMax(present, version)` per
  (target, tag), which is right before, during and after merges (merges only drop rows that argMax ignores).
- `tag_locks` serialises reconciliations: the rule runs that manage the same tag names take turns (`TagLock`).

A target is `message:<trace id>` (or a bare trace id) or `session:<customer>/<session id>`: sessions belong to a
tenant, so two tenants that happen to use the same session id never share its tags.

Versions are nanosecond times from this process, strictly increasing within it; between processes the newer clock
wins, and rule runs on the same tags never write at the same time (the lock).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import orjson

__all__ = ["MESSAGE", "SESSION", "TAG_NAME_RE", "TagInputError", "TagNotPresent", "TagLockBusy", "Target", "TagEvent",
           "validate_tag_name", "parse_target", "session_target_id", "next_version", "write_events", "current_tags",
           "tags_of", "audit", "run_events", "target_customer", "human_change", "TagLock", "has_tag_condition",
           "applied_tags_source", "WRITE_SETTINGS"]

MESSAGE, SESSION = "message", "session"
KINDS = (MESSAGE, SESSION)
TAG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,63}$")
_TRACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_SESSION_ID = 128
# Reads right after a write must see it: on a cluster a Distributed insert is otherwise queued in the background.
WRITE_SETTINGS = {"insert_distributed_sync": 1}
_CHUNK = 2000


class TagInputError(ValueError):
    """A bad target or tag name; `str(e)` is one line, `param` names the input."""

    def __init__(self, message: str, param: str = "target") -> None:
        super().__init__(message)
        self.message, self.param = message, param


class TagNotPresent(TagInputError):
    """A person asked to remove a tag the target does not carry."""


class TagLockBusy(RuntimeError):
    """Another run holds the tags; `holder` is its run id."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def validate_tag_name(tag: str, param: str = "tag") -> str:
    if not isinstance(tag, str) or not TAG_NAME_RE.match(tag):
        shown = repr(tag if not isinstance(tag, str) or len(tag) <= 80 else tag[:80] + "...")
        raise TagInputError(f"invalid tag name {shown}: tag names are 1-64 of [a-z0-9_.:-], starting with a letter "
                            "or digit", param=param)
    return tag


def check_session_id(session_id: str) -> str:
    sid = (session_id or "").strip()
    if not sid or len(sid) > MAX_SESSION_ID or _CONTROL.search(sid):
        raise TagInputError(f"invalid session id {sid[:40]!r}: 1-{MAX_SESSION_ID} characters, no control characters")
    return sid


def session_target_id(customer: str, session_id: str) -> str:
    """A session's target id: its tenant, '/', the session id the client sent (customers never contain '/')."""
    return f"{customer}/{session_id}"


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str  # message | session
    id: str  # trace id, or <customer>/<session id>

    @property
    def customer(self) -> str | None:
        """The tenant a session target names (None for a message: its call says)."""
        return self.id.split("/", 1)[0] if self.kind == SESSION else None

    @property
    def session_id(self) -> str:
        return self.id.split("/", 1)[1] if self.kind == SESSION else ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def parse_target(text: str, *, tenant: str | None = None) -> Target:
    """`message:<trace id>`, a bare trace id, or `session:<customer>/<session id>`. With `tenant` (a tenant key's
    customer) a session is `session:<session id>` and always that tenant's."""
    raw = (text or "").strip()
    kind, sep, rest = raw.partition(":")
    if not sep or kind not in KINDS:
        kind, rest = MESSAGE, raw
    if kind == MESSAGE:
        if not _TRACE_RE.match(rest):
            raise TagInputError(f"invalid target {raw[:80]!r}: use a trace id (message:<trace id>) or "
                                "session:<customer>/<session id>")
        return Target(MESSAGE, rest)
    if tenant is not None:
        return Target(SESSION, session_target_id(tenant, check_session_id(rest)))
    customer, slash, sid = rest.partition("/")
    if not slash or not customer:
        raise TagInputError(f"invalid target {raw[:80]!r}: a session is session:<customer>/<session id>")
    return Target(SESSION, session_target_id(customer, check_session_id(sid)))


# -- versions and events ------------------------------------------------------------------------------------------
_version_lock = threading.Lock()
_last_version = 0


def next_version() -> int:
    """A nanosecond time, strictly increasing within this process."""
    global _last_version
    with _version_lock:
        _last_version = max(time.time_ns(), _last_version + 1)
        return _last_version


@dataclasses.dataclass
class TagEvent:
    """One change of one tag on one target: a row of the audit log."""
    target_kind: str
    target_id: str
    tag: str
    action: str  # apply | remove
    actor: str  # rule:<evaluator>/<rule> | human:<key id>
    customer: str = ""
    run_id: str = ""
    mode: str = ""  # full | delta (rule runs) | human
    evaluator: str = ""
    evaluator_version: int = 0
    rule: str = ""
    field: str = ""
    field_value: str = ""
    version: int = 0
    event_time: float = 0.0

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["version"] = self.version or next_version()
        d["event_time"] = self.event_time or d["version"] / 1e9
        return d


def write_events(store: Any, events: Sequence[TagEvent], *, database: str = "") -> int:
    """Append events (the materialized view moves each to tag_state). Versions are given in list order."""
    for e in events:
        if not e.version:
            e.version = next_version()
        if not e.event_time:
            e.event_time = e.version / 1e9
    for i in range(0, len(events), 5000):
        body = b"\n".join(orjson.dumps(e.row()) for e in events[i:i + 5000])
        store.insert_json_rows(_t(database, "tag_events"), body, settings=WRITE_SETTINGS)
    return len(events)


def _t(database: str, table: str) -> str:
    return f"`{database}`.`{table}`" if database else f"`{table}`"


def current_tags(store: Any, kind: str, target_ids: Iterable[str], tags: Iterable[str] | None = None, *,
                 database: str = "") -> dict[str, dict[str, dict]]:
    """{target id: {tag: {actor, run_id, version, customer}}} for the tags present now (FINAL-free)."""
    ids = sorted(set(target_ids))
    only = sorted(set(tags)) if tags is not None else None
    out: dict[str, dict[str, dict]] = {}
    if only == []:
        return out
    cond = " AND tag IN {tags:Array(String)}" if only is not None else ""
    for i in range(0, len(ids), _CHUNK):
        rows = store.query(
            f"SELECT target_id, tag, argMax(actor, version) AS actor, argMax(run_id, version) AS run_id, "
            f"argMax(customer, version) AS customer, max(version) AS latest FROM {_t(database, 'tag_state')} "
            f"WHERE target_kind = {{kind:String}} AND target_id IN {{ids:Array(String)}}{cond} "
            "GROUP BY target_id, tag HAVING argMax(present, version) = 1",
            {"kind": kind, "ids": ids[i:i + _CHUNK], **({"tags": only} if only is not None else {})})
        for r in rows:
            out.setdefault(r["target_id"], {})[r["tag"]] = {"actor": r["actor"], "run_id": r["run_id"],
                                                            "customer": r["customer"], "version": r["latest"]}
    return out


def tags_of(store: Any, target: Target, *, database: str = "") -> dict[str, dict]:
    """The tags a target carries now: {tag: {actor, run_id, customer, version}}."""
    return current_tags(store, target.kind, [target.id], database=database).get(target.id, {})


AUDIT_COLUMNS = ("event_time", "target_kind", "target_id", "customer", "tag", "action", "actor", "run_id", "mode",
                 "evaluator", "evaluator_version", "rule", "field", "field_value", "version")


def audit(store: Any, target: Target, *, limit: int = 1000, database: str = "") -> list[dict]:
    """The audit log of one target, oldest first: one row per change."""
    cols = ", ".join(c if c != "event_time" else "toFloat64(event_time) AS event_time" for c in AUDIT_COLUMNS)
    return store.query(f"SELECT {cols} FROM {_t(database, 'tag_events')} WHERE target_kind = {{kind:String}} AND "
                       "target_id = {id:String} ORDER BY version LIMIT {n:UInt32}",
                       {"kind": target.kind, "id": target.id, "n": limit})


def target_customer(store: Any, target: Target, *, database: str = "") -> str | None:
    """The customer of a target that exists in llm_calls (a recorded call, or a session with calls), else None."""
    calls = _t(database, "llm_calls")
    if target.kind == MESSAGE:
        rows = store.query(f"SELECT customer FROM {calls} WHERE trace_id = {{t:String}} AND replay_run_id = '' "
                           "LIMIT 1", {"t": target.id})
        return rows[0]["customer"] if rows else None
    rows = store.query(f"SELECT count() AS n FROM {calls} WHERE customer = {{c:String}} AND session_id = {{s:String}}",
                       {"c": target.customer, "s": target.session_id})
    return target.customer if rows and rows[0]["n"] else None


def run_events(store: Any, run_id: str, *, customer: str | None = None, database: str = "") -> list[dict]:
    """The changes one rule run made, in the order it made them (for a tenant: on its own targets)."""
    cols = ", ".join(c if c != "event_time" else "toFloat64(event_time) AS event_time" for c in AUDIT_COLUMNS)
    cond = " AND customer = {c:String}" if customer is not None else ""
    return store.query(f"SELECT {cols} FROM {_t(database, 'tag_events')} WHERE run_id = {{r:String}}{cond} "
                       "ORDER BY version", {"r": run_id, **({"c": customer} if customer is not None else {})})


def human_change(store: Any, target: Target, tag: str, action: str, actor: str, customer: str, *,
                 database: str = "", lock_wait: float = 10.0) -> TagEvent | None:
    """A person adds or removes a tag. Adding a tag the target already carries changes nothing (None, no audit
    row); removing one it does not carry raises TagNotPresent. Waits (up to `lock_wait` s) for a rule run that is
    reconciling this tag, so a person's change never lands in the middle of one."""
    validate_tag_name(tag)
    if action not in ("apply", "remove"):
        raise TagInputError(f"unknown action {action!r}: apply or remove", param="action")
    with TagLock(store, [f"tag:{tag}"], run_id="", holder=actor, wait=lock_wait, database=database):
        present = tag in tags_of(store, target, database=database)
        if action == "apply" and present:
            return None
        if action == "remove" and not present:
            raise TagNotPresent(f"{target} does not carry the tag {tag!r}: nothing to remove", param="tag")
        event = TagEvent(target.kind, target.id, tag, action, actor, customer=customer, mode="human")
        write_events(store, [event], database=database)
        return event


# -- the lock ----------------------------------------------------------------------------------------------------
class TagLock:
    """A lease-based lock in ClickHouse over a set of keys (`tag:<name>`, `evaluator:<name>`), all or nothing.

    Each contender inserts one row per key; the server stamps them (`acquired_at DEFAULT now64`). A contender holds
    the keys when, after its own insert, no other live row (not released, lease not expired) on any of them is
    older than its own (ties broken by token). Inserts are visible to every read that starts after they return, so
    of two contenders at least the later one sees the earlier and yields. A yielding contender releases its rows at
    once and tries again until `wait` seconds have passed, then raises TagLockBusy naming the holder. A crashed
    holder's lease expires after `lease` seconds."""

    def __init__(self, store: Any, keys: Iterable[str], *, run_id: str, holder: str, wait: float = 60.0,
                 lease: float = 900.0, poll: float = 0.25, database: str = "") -> None:
        self.store, self.keys = store, sorted(set(keys))
        self.run_id, self.holder, self.wait, self.lease, self.poll = run_id, holder, wait, lease, poll
        self.table = _t(database, "tag_locks")
        self.token = ""

    def _insert(self, released: int) -> None:
        body = b"\n".join(orjson.dumps({"lock_key": k, "token": self.token, "run_id": self.run_id,
                                        "holder": self.holder, "lease_seconds": int(self.lease),
                                        "released": released}) for k in self.keys)
        self.store.insert_json_rows(self.table, body, settings=WRITE_SETTINGS)

    def _first_holders(self) -> dict[str, dict]:
        rows = self.store.query(
            f"SELECT lock_key, token, any(run_id) AS run_id, any(holder) AS holder, "
            f"toFloat64(min(acquired_at)) AS since FROM {self.table} WHERE lock_key IN {{keys:Array(String)}} "
            "GROUP BY lock_key, token HAVING max(released) = 0 AND "
            "min(acquired_at) + toIntervalSecond(max(lease_seconds)) > now64(6) "
            "ORDER BY lock_key, since, token LIMIT 1 BY lock_key", {"keys": self.keys})
        return {r["lock_key"]: r for r in rows}

    def acquire(self) -> "TagLock":
        deadline = time.monotonic() + self.wait
        while True:
            self.token = uuid.uuid4().hex
            self._insert(0)
            first = self._first_holders()
            other = next((r for k, r in sorted(first.items()) if r["token"] != self.token), None)
            if other is None and len(first) == len(self.keys):
                return self
            self._insert(1)
            if other is None or time.monotonic() >= deadline:
                if other is None:  # our rows were not visible to our own read: a store we cannot lock on
                    raise TagLockBusy("the tag lock could not be taken: the store did not show our own lock rows", "")
                who = other["run_id"] or other["holder"]
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(other["since"]))
                raise TagLockBusy(f"{other['lock_key']} is being reconciled by {who} (since {since} UTC); waited "
                                  f"{self.wait:g}s: try again when it has finished", who)
            time.sleep(self.poll)

    def release(self) -> None:
        if self.token:
            with contextlib.suppress(Exception):  # a lease that cannot be released expires on its own
                self._insert(1)
            self.token = ""

    def __enter__(self) -> "TagLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- SQL for queries over llm_calls ------------------------------------------------------------------------------
def _current_ids(database: str, kind: str, tag_placeholder: str) -> str:
    return (f"SELECT target_id FROM {_t(database, 'tag_state')} WHERE target_kind = '{kind}' AND tag = "
            f"{tag_placeholder} GROUP BY target_id HAVING argMax(present, version) = 1")


def has_tag_condition(tag_placeholder: str, database: str = "") -> str:
    """A condition on `llm_calls` columns: the call carries the tag now, on itself (its trace id) or on its
    session. FINAL-free; `tag_placeholder` is a bound parameter such as {v0:String}."""
    return (f"(trace_id IN ({_current_ids(database, MESSAGE, tag_placeholder)}) OR (session_id != '' AND "
            f"concat(customer, '/', session_id) IN ({_current_ids(database, SESSION, tag_placeholder)})))")


def _tag_lists(database: str, kind: str) -> str:
    return (f"SELECT target_id, groupArray(tag) AS tag_list FROM (SELECT target_id, tag FROM "
            f"{_t(database, 'tag_state')} WHERE target_kind = '{kind}' GROUP BY target_id, tag "
            "HAVING argMax(present, version) = 1) GROUP BY target_id")


def applied_tags_source(calls_table: str, database: str = "") -> str:
    """`llm_calls` with one more column, `applied_tags` (the call's own tags and its session's), for grouping by
    applied tag. A FROM-clause subquery; callers filter it as they filter the table."""
    return (f"(SELECT c.*, arrayDistinct(arrayConcat(m.tag_list, s.tag_list)) AS applied_tags FROM {calls_table} AS c "
            f"LEFT JOIN ({_tag_lists(database, MESSAGE)}) AS m ON m.target_id = c.trace_id "
            f"LEFT JOIN ({_tag_lists(database, SESSION)}) AS s ON s.target_id = concat(c.customer, '/', c.session_id))")

