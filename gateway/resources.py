"""Whose a provider resource is: the files, batches, responses, stored chat completions, conversations and vector
stores tenants create through the gateway live on the provider account its deployments share, where any key of
that account reaches any of them. With `api.tenant_resources: isolated` (the default) a tenant key reaches only what
its tenant created here, and lists only that.

The owner of an id is the customer recorded on the call that created it (one of CREATING_APIS, a stored response or
chat completion, answered with that id; its span says `tagway.creates_resource`): remembered in memory as the
answer passes, and otherwise looked up in `resource_owners` (filled from those spans by a view, read by its
primary key, kept 400 days whatever the calls' retention; migration 15 filled it once from the calls recorded
before), so ownership survives a restart and is shared by workers. A batch's output and error files
are the provider's making, named only in batch objects: they become the batch owner's when a batch object naming
them is relayed to its tenant key (`made_known`; the span's `tagway.owns_resources`, read by a second view). The
operator may grant a tenant ids made elsewhere (`tenants[].resources`).

A tenant key is refused (the same 404 as for another tenant's) every id its tenant does not own: another's, and
nobody's too (the admin key's own, a file uploaded straight to the provider, anything made before owners were
recorded or out of the gateway's sight). An id nobody owns may be one another worker or gateway made a moment ago
and has not stored yet: with a ClickHouse server it is looked for again for a batch window (`settle`) before the
refusal; the embedded store has one process, which knows its own at once.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import logging
import re
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

import orjson

from .errors import GatewayError, bad_request

log = logging.getLogger("tagway")

__all__ = ["CREATING_APIS", "MAX_IDS_PER_REQUEST", "MAX_IDS_PER_UPLOAD", "ResourceOwners", "not_found",
           "referenced_ids", "batch_input_ids", "batch_files", "UNTRACKED_FIELDS", "as_not_found"]

# the pass-through APIs whose answer's id is a resource later reached by id (the hot routes' stored responses and
# completions are told by the proxy: gateway/proxy.py `_stored`)
CREATING_APIS = ("files.create", "batches.create", "conversations.create", "vector_stores.create",
                 "vector_stores.file_batches.create")
MAX_IDS_PER_REQUEST = 64
MAX_IDS_PER_UPLOAD = 10_000  # a batch's input file: one request a line
_MAX_IDS = 100_000
_UNKNOWN_SECONDS = 2.0  # "nobody's" is believed this long (a lookup a second for an id asked again and again)
_LOOKUP_SECONDS = 5.0
_SETTLE_POLL = 0.5  # how often an id nobody owns is looked up again while it may be another worker's fresh one
_MAX_SETTLING_EACH = 256  # ids a customer has polled at once (one query a poll for all); past it, not polled
# the least time any refusal takes, so a 404 for an id known in memory (another tenant's) and one looked up in the
# store (missing) cannot be told apart by when they come (with a ClickHouse server, the settle window is the time)
_REFUSAL_FLOOR = 0.1
# With a ClickHouse server, the owners of what this process answers are written ahead of their calls' batch, at most
# this late, so another worker's lookup finds them in a poll or two instead of a batch window (the span's view
# writes the same row later: the record stays the source of truth, this only makes it known sooner)
_ANNOUNCE_SECONDS = 0.2
_ANNOUNCE_RETRY_SECONDS = 5.0
_MAX_ANNOUNCING = 10_000
# body fields that name resources; `annotations` (citations in a model's own output, re-sent by stateless loops)
# are not requests for a resource. Keys compare case-folded: an upstream may match them case-insensitively (Go's
# encoding/json, which many relays are written with, reads `Previous_Response_Id`, and `previouſ_response_id` with
# a long s, as previous_response_id), so a spelling the gateway did not look at must not reach it unchecked.
_ID_KEYS = frozenset({"file_id", "input_file_id", "previous_response_id"})
_ID_LIST_KEYS = frozenset({"file_ids", "vector_store_ids"})
_SKIP = frozenset({"annotations", "arguments", "parameters", "schema", "json_schema", "metadata"})
# Resources made where the gateway does not see it (the Containers API is not carried; a code interpreter's
# container is made by the provider mid-call): nobody here owns one, and a tenant key may not name one at all
# (refused before any lookup, whatever an operator's grant says). Conversations and vector stores are carried.
UNTRACKED_FIELDS = frozenset({"container"})
# the keys most bodies are made of, which name no resource whatever their case: read without case folding (a chat
# body's walk 2.8 -> 1.9 µs a call; it runs on every tenant key's chat, responses and messages call)
_PLAIN_KEYS = frozenset({"role", "content", "type", "text", "name", "model", "messages", "tools", "function",
                         "tool_calls", "tool_call_id", "id", "image_url", "url", "detail", "input", "output", "call_id",
                         "stream", "instructions", "description", "refusal", "audio", "data", "format", "image",
                         "source", "media_type", "temperature", "max_tokens", "status", "strict", "tool_choice",
                         "user", "summary"})


# a provider's 400 that says an id names nothing (OpenAI: "Previous response with id '...' not found.", code
# previous_response_not_found; "No such File object: ..."): only these are answered as the gateway's 404. A 400 about
# the resource itself ("file-x is not valid JSONL") is the tenant's own to read.
_SAYS_MISSING = re.compile(rb"(?i)not[ _]found|no such|does not exist|doesn't exist|not exist")


def not_found(rid: str, param: str = "id") -> GatewayError:
    return GatewayError(404, f"No such resource: {rid[:100]}.", code="resource_not_found", param=param)


def as_not_found(e: GatewayError, wanted: list[tuple[str, str]]) -> GatewayError:
    """An upstream's 400 or 404 about a resource a tenant's request named (it does not exist, or is not the
    account's) as the gateway's own 404 for another tenant's: the same status, body and headers (none of the
    upstream's), so a tenant cannot tell an id another tenant holds from one that does not exist. Any other
    error as it is."""
    if e.status not in (400, 404) or not wanted:
        return e
    said = e.raw if e.raw is not None else e.message.encode("utf-8", "replace")
    if e.status == 400 and not _SAYS_MISSING.search(said):  # a real complaint about the tenant's own resource
        return e
    for field, rid in wanted:
        if rid and rid.encode("utf-8", "replace") in said:
            return not_found(rid, field)
    return e


def referenced_ids(payload: Any, cap: int = MAX_IDS_PER_REQUEST) -> list[tuple[str, str]]:
    """(field, id) of the resources a request body names anywhere: a batch's input file, a response's predecessor,
    file parts and tools' file lists, a conversation, vector stores, a container (iterative: a deep body costs no
    recursion). Fields are named case-folded (`Previous_Response_Id` is previous_response_id)."""
    out: list[tuple[str, str]] = []
    stack = [payload]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _PLAIN_KEYS:
                    if isinstance(v, (dict, list)):
                        stack.append(v)
                    continue
                k = k.casefold() if isinstance(k, str) else k
                if k in _ID_KEYS and isinstance(v, str):
                    out.append((k, v))
                elif k in _ID_LIST_KEYS and isinstance(v, list):
                    out += [(k, x) for x in v if isinstance(x, str)]
                elif (k == "conversation" or k == "container") and isinstance(v, str):
                    out.append((k, v))  # a conversation id, a container id (`{"type": "auto"}` makes a new one)
                elif k == "conversation" and isinstance(v, dict):  # `{"id": "conv_..."}`
                    out += [(k, x) for n, x in v.items() if isinstance(n, str) and n.casefold() == "id"
                            and isinstance(x, str)]
                elif k not in _SKIP and isinstance(v, (dict, list)):
                    stack.append(v)
        elif isinstance(node, list):
            stack += [_without_tool_input(v) for v in node if isinstance(v, (dict, list))]
    out = list(dict.fromkeys(out))
    if len({rid for _, rid in out}) > cap:
        raise bad_request(f"The request names more than {cap} resources; at most {cap} are checked for a tenant "
                          "key.", code="too_many_resource_ids")
    return out


def _without_tool_input(v: Any) -> Any:
    """A content block of a model's own tool call, re-sent (`{"type": "tool_use", "input": {...}}`): its input is the
    model's arguments, no request for a resource. Only its input is passed over, and only in a list of blocks: a
    request or a batch line that says `"type": "tool_use"` at its top is read whole (it hid every id it named)."""
    if isinstance(v, dict) and v.get("type") == "tool_use" and "input" in v:
        return {k: x for k, x in v.items() if k != "input"}
    return v


def batch_files(obj: Any) -> list[str]:
    """The output and error file ids of a batch object, or of each batch of a list of them."""
    items = obj.get("data") if isinstance(obj, dict) and obj.get("object") == "list" else [obj]
    return [x[k] for x in items if isinstance(x, dict) for k in ("output_file_id", "error_file_id")
            if isinstance(x.get(k), str) and x[k]] if isinstance(items, list) else []


def batch_input_ids(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """The resources the requests of a batch input upload name (a `files.create` with purpose `batch`: each line a
    request the provider will run, so another tenant's previous response or file there would be read through the
    batch, whose output file is nobody's). Blocking (a whole upload is parsed): run it off the event loop.

    The multipart body is parsed as a mail parser reads it (transfer encodings decoded, which other parsers honour
    too), and every line of the file must be a JSON object: a line this cannot read (a bare CR splitting an object,
    NaN, a pretty-printed object) could be read otherwise by the provider, so it is refused, not skipped."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        return []
    purpose, files = "", []
    for part in msg.iter_parts():
        encoding = str(part.get("content-transfer-encoding") or "").strip().lower()
        if encoding not in ("", "7bit", "8bit", "binary"):
            raise bad_request(f"An upload's part may not be sent {encoding}-encoded.", code="invalid_upload")
        data = part.get_payload(decode=True) or b""
        name = part.get_param("name", header="content-disposition")
        if name == "purpose":
            purpose = data.decode("utf-8", "replace").strip()
        elif name == "file" or part.get_filename() is not None:
            files.append(data)
    if purpose != "batch":
        return []
    out: list[tuple[str, str]] = []
    for data in files:
        for n, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                raise bad_request(f"Line {n} of the batch input is not a JSON object.", code="invalid_batch_input")
            out += referenced_ids(obj, MAX_IDS_PER_UPLOAD)
    out = list(dict.fromkeys(out))
    if len({rid for _, rid in out}) > MAX_IDS_PER_UPLOAD:
        raise bad_request(f"The batch input names more than {MAX_IDS_PER_UPLOAD} resources; at most that many are "
                          "checked for a tenant key.", code="too_many_resource_ids")
    return out


class ResourceOwners:
    """id -> the customer that created it, from answers seen here and from the record. `store` returns the reads'
    client (None while the store is not reachable), or is None when nothing is recorded (only this process's
    answers then tell); `database` is storage.database."""

    def __init__(self, store: Callable[[], Any] | None, database: str = "",
                 clock: Callable[[], float] = time.monotonic, settle: float = 0.0,
                 granted: dict[str, str] | None = None,
                 announce: Callable[[list[tuple[str, str, float]]], None] | None = None) -> None:
        """`settle`: how long an id nobody owns is looked for again before a tenant key is refused it (another
        process of the gateway may have made it a moment ago and not stored its call yet); `granted`: ids the
        operator gave a tenant (tenants[].resources), id -> customer; `announce`: writes (id, customer, unix time)
        rows of what this process answered to the record ahead of their calls (blocking: run on a worker thread)."""
        self._store, self._database, self._clock, self._settle = store, database, clock, settle
        self._announce = announce
        self._announcing: deque[tuple[str, str, float]] = deque(maxlen=_MAX_ANNOUNCING)  # the oldest go first
        self._announcer: asyncio.TimerHandle | asyncio.Task | None = None
        self._announce_failing = False
        self._granted = dict(granted or {})
        self._owner: OrderedDict[str, str] = OrderedDict()  # least recently asked first
        self._unknown: OrderedDict[str, float] = OrderedDict()  # id -> until when "nobody's" is believed
        # ids waited for (settle): each one's future, resolved by one poll for all of them, and until when it waits
        self._settling: dict[str, tuple[asyncio.Future, float]] = {}
        self._polled_by: dict[str, int] = {}  # customer -> its ids polled now
        self._poller: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def made_known(self, ids: Iterable[str], customer: str) -> tuple[str, ...]:
        """An answer relayed to `customer` named `ids` as its own (a batch's output and error files): those not
        known here yet become its, and are returned for the call's record (the first owner stays)."""
        new = tuple(i for i in dict.fromkeys(ids) if i and i not in self._owner)
        for i in new:
            self.created(i, customer)
        return new

    def created(self, rid: str, customer: str) -> None:
        """An answer of this process with `rid` passed for `customer`: the first owner stays (an id is created
        once), and other workers are told soon (announce)."""
        if rid and rid not in self._owner and self._announce is not None:
            self._announcing.append((rid, customer, time.time()))  # past the cap the record tells the oldest
            self._schedule_announce()
        self._remember(rid, customer)

    def _remember(self, rid: str, customer: str) -> None:
        if rid and rid not in self._owner:
            self._owner[rid] = customer
            if len(self._owner) > _MAX_IDS:
                self._owner.popitem(last=False)
        self._unknown.pop(rid, None)

    def _schedule_announce(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here: the calls' record tells the others
            return
        if loop is not self._loop:  # a timer of a loop that is gone would never fire
            self._check_loop()
        if self._announcer is not None:
            return
        # while the store refuses, a try every few seconds (each may hold the recorder's client that long)
        delay = _ANNOUNCE_RETRY_SECONDS if self._announce_failing else _ANNOUNCE_SECONDS
        self._announcer = loop.call_later(delay, self._start_announcing, loop)

    def _start_announcing(self, loop: asyncio.AbstractEventLoop) -> None:
        self._announcer = loop.create_task(self._write_announced(loop))

    async def _write_announced(self, loop: asyncio.AbstractEventLoop) -> None:
        rows = list(self._announcing)
        self._announcing.clear()
        try:
            if rows and self._announce is not None:
                await loop.run_in_executor(None, self._announce, rows)
                if self._announce_failing:
                    self._announce_failing = False
                    log.info("new resource owners are written ahead of their calls again")
        except Exception as e:  # only sooner, never lost: the calls' spans write the same owners
            if not self._announce_failing:  # once a streak (a store outage would say it five times a second)
                self._announce_failing = True
                log.warning("could not write %d new resource owner(s) ahead of their calls (%s); other workers "
                            "learn them from the record, a batch window later", len(rows), e)
        finally:
            self._announcer = None
            if self._announcing:
                self._schedule_announce()

    async def foreign(self, ids: Iterable[str], customer: str) -> list[str]:
        """The ids among `ids` that are not `customer`'s: another customer's, or nobody's (made outside the
        gateway, by the admin key, or before it recorded owners), once looked for again for `settle` seconds.

        Any refusal is answered at one fixed time after the request came, whatever its kind (another tenant's id
        known in memory, a missing one looked up, found by a poll or not): `settle` with a ClickHouse server, a
        short floor on the embedded store. So the time of a 404 tells nothing either (a review measured both)."""
        self._check_loop()
        deadline = self._clock() + max(self._settle, _REFUSAL_FLOOR)
        owners = await self._owners(ids)
        if self._settle > 0 and any(who != customer for who in owners.values()):
            missing = [i for i, who in owners.items() if who is None]
            if missing:  # made by another worker a moment ago: known once its owner is written
                owners.update(await self._settled(missing, deadline, customer))
        theirs = [i for i, who in owners.items() if who != customer]
        if theirs and (left := deadline - self._clock()) > 0:
            await asyncio.sleep(left)
        return theirs

    async def _settled(self, ids: list[str], deadline: float, customer: str) -> dict[str, str | None]:
        """Each id's owner once the record has it, or None at `deadline` (each waiter's own: another request for
        the same id never makes this one wait longer). One poll serves every waiting request (one store query each
        _SETTLE_POLL for all their ids): a burst of requests naming unknown ids costs the store a query a tick, not
        a dozen each (a review measured 1,300 queries for 100 requests). A customer has at most _MAX_SETTLING_EACH
        ids polled at once: one tenant's made-up ids cannot crowd out another's fresh ones."""
        loop = asyncio.get_running_loop()
        polled = self._polled_by.get(customer, 0)
        waits: dict[str, asyncio.Future] = {}
        for i in ids:
            entry = self._settling.get(i)
            if entry is None:
                if polled + len(waits) >= _MAX_SETTLING_EACH:
                    continue  # past this customer's share: not polled (still answered at the deadline)
                fut = loop.create_future()
                fut.add_done_callback(_retrieved)
                entry = (fut, deadline)
            self._settling[i] = (entry[0], max(deadline, entry[1]))  # how long the poll keeps asking
            waits[i] = entry[0]
        if waits and (self._poller is None or self._poller.done()):
            self._poller = loop.create_task(self._poll())
        self._polled_by[customer] = polled + len(waits)
        out: dict[str, str | None] = dict.fromkeys(ids)
        try:
            for i, fut in waits.items():
                left = deadline - self._clock()
                if left <= 0:
                    break
                try:
                    out[i] = await asyncio.wait_for(asyncio.shield(fut), left)
                except asyncio.TimeoutError:
                    break  # the deadline: this one and the rest are nobody's
        finally:
            n = self._polled_by.get(customer, 0) - len(waits)
            if n > 0:
                self._polled_by[customer] = n
            else:
                self._polled_by.pop(customer, None)
        return out

    async def _poll(self) -> None:
        while self._settling:
            await asyncio.sleep(_SETTLE_POLL)
            ids = list(self._settling)
            try:
                found = await self._look_up(ids)
            except GatewayError:  # the record cannot answer: every waiter gets the 503, never a guess
                for i in ids:
                    fut, _ = self._settling.pop(i)
                    if not fut.done():
                        fut.set_exception(_unreachable())  # one of its own each (a raised error carries state)
                continue
            except Exception:  # never a dead poller: its waiters are bounded, but new ones need it
                log.exception("resource owner poll failed")
                continue
            now = self._clock()
            for i in ids:
                fut, until = self._settling[i]
                who = found.get(i) if i in found else self._owner.get(i)  # or this process made it meanwhile
                if who is not None:
                    self._remember(i, who)
                elif now < until:
                    continue
                del self._settling[i]
                if not fut.done():
                    fut.set_result(who)

    def _check_loop(self) -> None:
        """Waits and timers belong to the event loop that made them: an app started again on another loop (an
        in-process restart, a test client) starts these afresh instead of waiting on a closed one."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._settling.clear()
            self._polled_by.clear()
            self._poller = None
            self._announcer = None

    async def refuse_foreign(self, wanted: list[tuple[str, str]], customer: str) -> None:
        """A 404 for the first (field, id) of `wanted` that is not `customer`'s (another's, or nobody's), or that
        is of a kind the gateway never sees made (UNTRACKED_FIELDS: nobody here can own one)."""
        if wanted:
            for field, rid in wanted:
                if field in UNTRACKED_FIELDS:
                    raise not_found(rid, field)
            theirs = set(await self.foreign([rid for _, rid in wanted], customer))
            for field, rid in wanted:
                if rid in theirs:
                    raise not_found(rid, field)

    async def owned(self, ids: Iterable[str], customer: str) -> set[str]:
        """The ids among `ids` that `customer` created here (what a list shows a tenant)."""
        owners = await self._owners(ids)
        return {i for i, who in owners.items() if who and who == customer}

    async def _owners(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Each id's creator (the tenant the operator granted it to first), or None. A lookup the store cannot
        answer is a 503 (never a guess)."""
        ids = [i for i in dict.fromkeys(ids) if i]
        now = self._clock()
        out: dict[str, str | None] = {}
        ask = []
        granted = self._granted
        for i in ids:
            who = granted.get(i) if granted else None
            if who is None:
                who = self._owner.get(i)
                if who is not None:
                    self._owner.move_to_end(i)
            if who is not None:
                out[i] = who
            elif self._unknown.get(i, 0.0) > now:
                out[i] = None
            else:
                ask.append(i)
        if ask:
            found = await self._look_up(ask)
            for rid in ask:
                if rid in found:
                    self._remember(rid, found[rid])
                    out[rid] = found[rid]
                else:
                    self._unknown[rid] = now + _UNKNOWN_SECONDS
                    self._unknown.move_to_end(rid)
                    out[rid] = None
            while len(self._unknown) > _MAX_IDS:
                self._unknown.popitem(last=False)
        return out

    async def _look_up(self, ids: list[str]) -> dict[str, str]:
        if self._store is None:
            return {}
        store = self._store()
        if store is None:
            raise _unreachable()
        table = f"{self._database}.resource_owners" if self._database else "resource_owners"
        sql = (f"SELECT rid, argMin(customer, created) AS customer FROM {table} WHERE rid IN {{ids:Array(String)}} "
               "GROUP BY rid")  # by the primary key; the first creator stays
        params = {"ids": ids}
        loop = asyncio.get_running_loop()
        try:
            rows = await asyncio.wait_for(loop.run_in_executor(None, lambda: store.query(sql, params)),
                                          _LOOKUP_SECONDS)
        except Exception as e:
            log.warning("cannot look up resource owners (%s)", e)
            raise _unreachable() from None
        return {r["rid"]: r["customer"] for r in rows}


def _retrieved(fut: asyncio.Future) -> None:
    """A settle wait's outcome is read even when every request waiting for it has gone (no 'never retrieved')."""
    if not fut.cancelled():
        fut.exception()


def _unreachable() -> GatewayError:
    return GatewayError(503, "The gateway cannot tell whose this resource is right now (its record is not "
                        "reachable); retry shortly.", type_="server_error", code="resource_owner_unknown")
