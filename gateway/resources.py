"""Whose a provider resource is: the files, batches, responses and stored chat completions tenants create through
the gateway live on the provider account its deployments share, where any key of that account reaches any of them.
With `api.tenant_resources: isolated` (the default) a tenant key reaches only those its tenant created here.

The owner of an id is the customer recorded on the call that created it (a `files.create`, `batches.create`,
`responses` or `chat.completions` call answered with that id): remembered in memory as the answer passes, and
otherwise looked up in the record (`otel_traces`, whose bloom filter over span attribute values finds an id's
granules), so ownership survives a restart and is shared by workers. Looked-up answers are cached: an owner for
good, "nobody" for a few seconds (a resource created on another worker is in the record within a batch window).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from exporters import semconv as sc

from .errors import GatewayError

log = logging.getLogger("tagway")

__all__ = ["CREATING_APIS", "ResourceOwners", "not_found", "referenced_ids"]

# the APIs whose answer's id is a resource later reached by id (tagway.api of the creating call)
CREATING_APIS = ("files.create", "batches.create", "responses", "chat.completions")
_MAX_IDS = 100_000
_NOBODY_SECONDS = 5.0
_LOOKUP_SECONDS = 5.0


def not_found(rid: str, param: str = "id") -> GatewayError:
    return GatewayError(404, f"No resource `{rid[:100]}` for this key: a tenant key reaches the files, batches, "
                        "responses and stored completions its tenant created through the gateway "
                        "(api.tenant_resources).", code="resource_not_found", param=param)


def referenced_ids(payload: Any) -> list[tuple[str, str]]:
    """(parameter, id) of the resources a request body names: a batch's input file, a response's predecessor, and
    file parts (`file_id`) anywhere in its messages or input."""
    out: list[tuple[str, str]] = []
    if not isinstance(payload, dict):
        return out
    for param in ("input_file_id", "previous_response_id"):
        v = payload.get(param)
        if isinstance(v, str) and v:
            out.append((param, v))
    _file_ids(payload.get("messages"), out)
    _file_ids(payload.get("input"), out)
    return out


def _file_ids(value: Any, out: list[tuple[str, str]], depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "file_id" and isinstance(v, str) and v:
                out.append(("file_id", v))
            elif isinstance(v, (dict, list)):
                _file_ids(v, out, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _file_ids(v, out, depth + 1)


class ResourceOwners:
    """id -> owning customer, from answers seen here and from the record. `store` returns the reads' client (None
    when the store is not reachable yet), or is None when nothing is recorded (only this process's answers then
    tell); `database` is storage.database."""

    def __init__(self, store: Callable[[], Any] | None, database: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store, self._database, self._clock = store, database, clock
        self._owner: OrderedDict[str, str] = OrderedDict()
        self._nobody: dict[str, float] = {}  # id -> until when "no owner on record" is believed

    def created(self, rid: str, customer: str) -> None:
        """An answer that created `rid` for `customer` passed (the first owner stays: an id is created once)."""
        if rid and rid not in self._owner:
            self._owner[rid] = customer
            if len(self._owner) > _MAX_IDS:
                self._owner.popitem(last=False)
        self._nobody.pop(rid, None)

    async def owned(self, ids: Iterable[str], customer: str) -> set[str]:
        """The ids among `ids` that `customer` owns. A lookup the store cannot answer is a 503 (never a guess)."""
        ids = [i for i in dict.fromkeys(ids) if i]
        now = self._clock()
        unknown = [i for i in ids if i not in self._owner and self._nobody.get(i, 0.0) <= now]
        if unknown:
            found = await self._look_up(unknown)
            for rid in unknown:
                if rid in found:
                    self.created(rid, found[rid])
                else:
                    self._nobody[rid] = now + _NOBODY_SECONDS
            if len(self._nobody) > _MAX_IDS:
                self._nobody = {k: t for k, t in self._nobody.items() if t > now}
        return {i for i in ids if self._owner.get(i) == customer}

    async def _look_up(self, ids: list[str]) -> dict[str, str]:
        if self._store is None:
            return {}
        store = self._store()
        if store is None:
            raise _unreachable()
        table = f"{self._database}.otel_traces" if self._database else "otel_traces"
        sql = (f"SELECT SpanAttributes[{{rid_key:String}}] AS rid, "
               f"argMin(SpanAttributes[{{customer_key:String}}], Timestamp) AS customer FROM {table} "
               "WHERE hasAny(mapValues(SpanAttributes), {ids:Array(String)}) "
               "AND SpanAttributes[{rid_key:String}] IN {ids:Array(String)} "
               "AND SpanAttributes[{kind_key:String}] = 'call' AND StatusCode != 'Error' "
               "AND SpanAttributes[{api_key:String}] IN {apis:Array(String)} GROUP BY rid")
        params = {"ids": ids, "apis": list(CREATING_APIS), "rid_key": sc.RESPONSE_ID, "customer_key": sc.CUSTOMER,
                  "kind_key": sc.KIND, "api_key": sc.API}
        loop = asyncio.get_running_loop()
        try:
            rows = await asyncio.wait_for(loop.run_in_executor(None, lambda: store.query(sql, params)),
                                          _LOOKUP_SECONDS)
        except Exception as e:
            log.warning("cannot look up resource owners (%s)", e)
            raise _unreachable() from None
        return {r["rid"]: r["customer"] for r in rows}


def _unreachable() -> GatewayError:
    return GatewayError(503, "The gateway cannot tell whose this resource is right now (its record is not "
                        "reachable); retry shortly.", type_="server_error", code="resource_owner_unknown")
