"""Tag state on the real engine (chDB): the newest event per (target, tag) wins whatever order the events were
inserted in, before and after merges, with FINAL-free queries; targets parse one way everywhere."""
from __future__ import annotations

import uuid

import pytest

from exporters import tagstate as ts


def _present(store, target_id: str, tag: str) -> bool:
    return tag in ts.current_tags(store, ts.MESSAGE, [target_id]).get(target_id, {})


def test_the_newest_version_wins_in_any_insert_order_before_and_after_merges(chdb_store):
    target, tag = uuid.uuid4().hex, "flip"
    base = ts.next_version()
    # 40 events, each its own insert (its own part): apply at even versions, remove at odd ones, inserted
    # newest-first for half of them, so the last row inserted is not the newest
    events = [ts.TagEvent(ts.MESSAGE, target, tag, "apply" if i % 2 == 0 else "remove", "human:t", version=base + i)
              for i in range(40)]
    for e in events[20:][::-1] + events[:20]:
        ts.write_events(chdb_store, [e])
    assert not _present(chdb_store, target, tag)  # version base+39 is a remove
    ts.write_events(chdb_store, [ts.TagEvent(ts.MESSAGE, target, tag, "apply", "human:t", version=base + 41)])
    ts.write_events(chdb_store, [ts.TagEvent(ts.MESSAGE, target, tag, "remove", "human:t", version=base + 40)])
    assert _present(chdb_store, target, tag)  # the apply is newer than the remove inserted after it
    chdb_store.command("OPTIMIZE TABLE tag_state FINAL")  # merges keep the newest version, as argMax reads it
    assert _present(chdb_store, target, tag)
    rows = chdb_store.query("SELECT count() AS n FROM tag_state WHERE target_id = {t:String}", {"t": target})
    assert rows == [{"n": 1}]
    assert len(ts.audit(chdb_store, ts.Target(ts.MESSAGE, target))) == 42  # the log keeps every change


@pytest.mark.parametrize("text,kind,target_id", [
    ("0af7651916cd43dd8448eb211c80319c", "message", "0af7651916cd43dd8448eb211c80319c"),
    ("message:abc_DEF-1", "message", "abc_DEF-1"),
    ("session:acme/Conv 42", "session", "acme/Conv 42"),
    ("session:acme/a/b", "session", "acme/a/b"),
])
def test_targets(text, kind, target_id):
    t = ts.parse_target(text)
    assert (t.kind, t.id) == (kind, target_id)
    assert ts.parse_target("session:Conv 42", tenant="acme") == ts.Target("session", "acme/Conv 42")


@pytest.mark.parametrize("text,message", [
    ("", "invalid target ''"),
    ("message:a b", "use a trace id"),
    ("session:nocustomer", "a session is session:<customer>/<session id>"),
    ("session:acme/", "invalid session id"),
    ("session:acme/" + "x" * 129, "invalid session id"),
])
def test_bad_targets(text, message):
    with pytest.raises(ts.TagInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ts.parse_target(text)
