"""The pure rules of tenant resources: referenced_ids reads the common keys without case folding (a fast path on every
tenant call) and must find what folding every key finds, on any body; only a provider's "no such resource" about an
id the request named is answered as the gateway's 404."""
from __future__ import annotations

import orjson
from hypothesis import given, settings, strategies as st

from gateway import resources
from gateway.errors import GatewayError
from gateway.resources import as_not_found, referenced_ids

_KEYS = sorted(resources._PLAIN_KEYS) + ["file_id", "File_Id", "previouſ_response_id", "PREVIOUS_RESPONSE_ID",
                                          "file_ids", "vector_store_ids", "Conversation", "container", "metadata",
                                          "arguments", "other", "ID"]


def _folding_every_key(payload, out=None):
    """The walk without the fast path: every key folded."""
    out = [] if out is None else out
    if isinstance(payload, dict):
        for k, v in payload.items():
            k = k.casefold()
            if k in resources._ID_KEYS and isinstance(v, str):
                out.append((k, v))
            elif k in resources._ID_LIST_KEYS and isinstance(v, list):
                out += [(k, x) for x in v if isinstance(x, str)]
            elif k in ("conversation", "container") and isinstance(v, str):
                out.append((k, v))
            elif k == "conversation" and isinstance(v, dict):
                out += [(k, x) for n, x in v.items() if n.casefold() == "id" and isinstance(x, str)]
            elif k not in resources._SKIP:
                _folding_every_key(v, out)
    elif isinstance(payload, list):
        for v in payload:  # a re-sent tool call block's input (its arguments) is the one thing passed over
            if isinstance(v, dict) and v.get("type") == "tool_use":
                v = {k: x for k, x in v.items() if k != "input"}
            _folding_every_key(v, out)
    return out


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.sampled_from(["file-a", "resp_b", "conv_c", "x", "tool_use"]),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), kids,
                                                                               max_size=5),
                     max_leaves=25)


def test_the_plain_keys_name_nothing_in_any_case():
    for k in resources._PLAIN_KEYS:
        assert k == k.casefold() and k not in resources._SKIP
        assert k not in resources._ID_KEYS | resources._ID_LIST_KEYS | resources.UNTRACKED_FIELDS


@settings(max_examples=400, deadline=None)
@given(_json)
def test_the_walk_finds_what_folding_every_key_finds(payload):
    assert sorted(set(referenced_ids(payload, cap=10_000))) == sorted(set(_folding_every_key(payload)))


def _provider_error(status: int, message: str, code: str | None = None) -> GatewayError:
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "code": code}})
    return GatewayError(status, "", raw=body)


def test_only_a_providers_no_such_resource_is_answered_as_the_gateways_404():
    wanted = [("input_file_id", "file-abc")]
    for status, message, code in [(404, "No such File object: file-abc", None),
                                  (400, "Previous response with id 'file-abc' not found.", "previous_response_not_found"),
                                  (400, "Invalid 'input_file_id': 'file-abc' does not exist.", None)]:
        e = as_not_found(_provider_error(status, message, code), wanted)
        assert (e.status, e.code, e.param) == (404, "resource_not_found", "input_file_id"), message
    # a complaint about the tenant's own file stays the provider's: the tenant needs to read it
    own = _provider_error(400, "File file-abc is not valid JSONL: line 2 is not a JSON object.", "invalid_file")
    assert as_not_found(own, wanted) is own
    other = _provider_error(404, "No such File object: file-zzz")  # not an id the request named
    assert as_not_found(other, wanted) is other
    assert as_not_found(_provider_error(500, "file-abc not found"), wanted).status == 500


class _SlowRecord:
    """A store that learns an id's owner only after `after` lookups (another worker's call, stored a moment later)."""

    def __init__(self, owners: dict[str, str], after: int) -> None:
        self.owners, self.after, self.asked = owners, after, 0

    def query(self, sql, params):
        self.asked += 1
        return [{"rid": i, "customer": self.owners[i]} for i in params["ids"] if i in self.owners] \
            if self.asked > self.after else []


async def test_an_id_nobody_owns_is_refused_unless_its_owners_record_arrives_within_the_settle_window():
    """Fail closed: nobody's is not the tenant's. With other processes writing the record, an id is looked for
    again for `settle` seconds first (a fresh id another worker made); the admin key's own ("") is nobody's."""
    from gateway.resources import ResourceOwners  # noqa: PLC0415

    record = _SlowRecord({"file-fresh": "acme", "file-admin": ""}, after=2)
    owners = ResourceOwners(lambda: record, settle=3.0)
    assert await owners.foreign(["file-fresh"], "acme") == []  # found on the third lookup, ~1 s later
    assert await owners.foreign(["file-fresh"], "globex") == ["file-fresh"]
    assert await owners.foreign(["file-admin", "file-none"], "acme") == ["file-admin", "file-none"]
    assert record.asked < 12
    closed = ResourceOwners(lambda: _SlowRecord({"file-fresh": "acme"}, after=2))  # the embedded store: no wait
    assert await closed.foreign(["file-fresh"], "acme") == ["file-fresh"]
    granted = ResourceOwners(lambda: _SlowRecord({}, after=0), granted={"vs_1": "acme"})
    assert await granted.foreign(["vs_1"], "acme") == [] and await granted.owned(["vs_1"], "acme") == {"vs_1"}


def test_a_tool_calls_input_is_passed_over_only_inside_a_list_of_blocks():
    """A re-sent tool_use block's arguments name no resource; but `"type": "tool_use"` at a request's or a batch
    line's top hid every id in it (review), as did the block's own keys beside its input."""
    hidden = {"type": "tool_use", "model": "m", "previous_response_id": "resp_A",
              "tools": [{"type": "file_search", "vector_store_ids": ["vs_A"]}]}
    assert sorted(referenced_ids(hidden)) == [("previous_response_id", "resp_A"), ("vector_store_ids", "vs_A")]
    line = {"custom_id": "1", "type": "tool_use", "body": {"type": "tool_use", "previous_response_id": "resp_A"}}
    assert referenced_ids(line) == [("previous_response_id", "resp_A")]
    blocks = {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"file_id": "file-args"}, "file_id": "file-B"}]}]}
    assert referenced_ids(blocks) == [("file_id", "file-B")]


async def test_waiting_requests_share_one_poll_and_another_tenants_id_waits_as_a_missing_one():
    """A review: 100 concurrent requests naming one unknown id made 1,300 store queries (each polled alone), and
    another tenant's id was refused at once where a missing one took the whole window (a timing oracle)."""
    import asyncio  # noqa: PLC0415
    import time  # noqa: PLC0415

    from gateway.resources import ResourceOwners  # noqa: PLC0415

    record = _SlowRecord({"file-theirs": "globex"}, after=0)
    owners = ResourceOwners(lambda: record, settle=1.5)
    t0 = time.monotonic()
    answers = await asyncio.gather(*(owners.foreign([f"file-none-{i % 3}"], "acme") for i in range(100)))
    assert all(a == [f"file-none-{i % 3}"] for i, a in enumerate(answers))
    # each request's own first lookup (as for any id), then one query a poll for all of them: not 12 each
    assert record.asked - 100 <= 5, record.asked
    missing_took = time.monotonic() - t0
    t0 = time.monotonic()
    assert await owners.foreign(["file-theirs"], "acme") == ["file-theirs"]
    theirs_took = time.monotonic() - t0
    assert 1.2 < missing_took < 3.0 and 1.2 < theirs_took < 3.0, (missing_took, theirs_took)
    record.owners["file-mine"] = "acme"
    t0 = time.monotonic()
    assert await owners.foreign(["file-mine"], "acme") == [] and time.monotonic() - t0 < 0.5  # one's own: no wait


async def test_owners_are_written_ahead_in_batches_and_a_failing_write_is_said_once(caplog, monkeypatch):
    """What this process answers is written ahead for other workers (a ClickHouse server), a batch every ~0.2 s;
    a store that refuses is said once a streak, not five times a second, and tried again after a pause (here 0.3 s;
    5 s in service); lookups' own finds are not re-sent."""
    import asyncio  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from gateway import resources  # noqa: PLC0415
    from gateway.resources import ResourceOwners  # noqa: PLC0415

    monkeypatch.setattr(resources, "_ANNOUNCE_RETRY_SECONDS", 0.3)

    written: list[list] = []
    failing = [True]

    def announce(rows):
        if failing[0]:
            raise OSError("connection refused")
        written.append([r[:2] for r in rows])

    owners = ResourceOwners(lambda: _SlowRecord({"file-seen": "acme"}, after=0), settle=1.0, announce=announce)
    with caplog.at_level(logging.WARNING, logger="tagway"):
        for i in range(3):
            owners.created(f"resp_{i}", "acme")
            await asyncio.sleep(0.35)
    assert caplog.text.count("could not write") == 1 and written == []
    failing[0] = False
    owners.created("resp_a", "acme")
    owners.created("resp_b", "globex")
    owners.created("resp_a", "acme")  # known already: not again
    assert await owners.foreign(["file-seen"], "acme") == []  # found by a lookup: not written back
    await asyncio.sleep(0.8)
    assert written == [[("resp_a", "acme"), ("resp_b", "globex")]]


async def test_a_refusal_comes_at_one_time_whatever_its_kind_and_no_one_else_can_stretch_or_crowd_a_wait():
    """A second review: another tenant's id (in memory) and a missing one (looked up, found by no poll) were still
    told apart by when their 404 came, on the embedded store too; a request naming the same missing id every 1.5 s
    kept another's wait going for ever; one tenant's made-up ids filled a cap shared by all, and another tenant's
    fresh id was refused at once."""
    import asyncio  # noqa: PLC0415
    import time  # noqa: PLC0415

    from gateway import resources  # noqa: PLC0415
    from gateway.resources import ResourceOwners  # noqa: PLC0415

    async def took(owners, ids, customer):
        t0 = time.monotonic()
        out = await owners.foreign(ids, customer)
        return out, time.monotonic() - t0

    embedded = ResourceOwners(lambda: _SlowRecord({"file-theirs": "globex"}, after=0))  # no settle window
    await embedded.foreign(["file-theirs"], "acme")  # known in memory from now on
    (a, ta), (b, tb) = await took(embedded, ["file-theirs"], "acme"), await took(embedded, ["file-none"], "acme")
    assert a == ["file-theirs"] and b == ["file-none"]
    assert resources._REFUSAL_FLOOR <= ta < resources._REFUSAL_FLOOR + 0.05
    assert resources._REFUSAL_FLOOR <= tb < resources._REFUSAL_FLOOR + 0.05

    record = _SlowRecord({}, after=0)
    owners = ResourceOwners(lambda: record, settle=1.0)
    first = asyncio.create_task(took(owners, ["file-x"], "acme"))
    await asyncio.sleep(0.6)
    later = asyncio.create_task(took(owners, ["file-x"], "mallory"))  # the same id, asked again
    (_, t_first), (_, t_later) = await first, await later
    assert 0.95 < t_first < 1.3 and 0.95 < t_later < 1.3, (t_first, t_later)  # each its own deadline

    record = _SlowRecord({}, after=0)
    owners = ResourceOwners(lambda: record, settle=1.0)
    flood = asyncio.create_task(owners.foreign([f"file-fake-{i}" for i in range(400)], "mallory"))
    await asyncio.sleep(0.1)
    fresh = asyncio.create_task(owners.foreign(["file-fresh"], "acme"))
    await asyncio.sleep(0.3)
    record.owners["file-fresh"] = "acme"  # another worker's owner row lands
    assert await fresh == [] and len(await flood) == 400


def test_an_owners_map_outlives_its_event_loop():
    """The app started again on another loop (an in-process restart, a second test client): waits and the
    write-ahead timer of the first loop are dropped, not waited on (a review: a request hung, and writing ahead
    stopped for good)."""
    import asyncio  # noqa: PLC0415

    from gateway.resources import ResourceOwners  # noqa: PLC0415

    written = []
    record = _SlowRecord({}, after=0)
    owners = ResourceOwners(lambda: record, settle=0.6, announce=lambda rows: written.extend(r[0] for r in rows))

    async def first():
        owners.created("resp_1", "acme")  # its timer is left behind when this loop ends
        task = asyncio.create_task(owners.foreign(["file-none"], "acme"))
        await asyncio.sleep(0.05)
        task.cancel()

    async def second():
        owners.created("resp_2", "acme")
        assert await asyncio.wait_for(owners.foreign(["file-none"], "acme"), 3) == ["file-none"]
        await asyncio.sleep(0.4)

    asyncio.run(first())
    asyncio.run(second())
    assert "resp_2" in written
