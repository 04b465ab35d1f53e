"""`RemoteStore`: the `exporters.store.Store` interface over a running gateway's loopback store API.

While a gateway holds an embedded store, a CLI process cannot open it (one chDB process per data directory), so the
CLI sends each statement to the gateway (`gateway/store_api.py`), which runs it on clients of its own (niced,
without the dashboard's time limit) and sends the rows back. Queries, commands and JSONEachRow inserts carry exactly
what `Store` takes, and rows come back as the same Python values: JSON plus a few tagged types (`encode_value` /
`decode_value`) so a DateTime64 is still a zoned `datetime`, a Map a dict, a Decimal a Decimal.

Errors: a statement ClickHouse refused is `StoreError` with the engine's own one-line message (the same text as the
direct path); the gateway going away (refused, reset, stopped mid-answer) is `StoreGoneError`.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import ipaddress
import math
import uuid
from typing import Any, Sequence
from zoneinfo import ZoneInfo

import httpx
import orjson

from .discovery import Announcement
from .store import StoreError

__all__ = ["RemoteStore", "StoreGoneError", "GatewayStuckError", "StoreAccessDenied", "encode_value", "decode_value",
           "encode_rows", "decode_rows", "API_PREFIX"]

API_PREFIX = "/admin/store"
# identify() waits this long for the gateway's answer, which comes after it stored its pending calls (at most 4 s,
# gateway.app.FLUSH_SECONDS): longer than that is a gateway that is stuck, not busy
IDENTIFY_SECONDS = 8.0
# A statement may run as long as it takes (as on the store opened directly), and the gateway sends a space every 5 s
# while it runs (gateway/store_api.HEARTBEAT_SECONDS): this long without a byte is a gateway that is stuck or stopped
# (SIGSTOP, a debugger), said in one line instead of a command that hangs.
SILENCE_SECONDS = 20.0


class StoreGoneError(StoreError):
    """The gateway that serves the store stopped answering (stopped, killed, or its port refuses connections)."""


class GatewayStuckError(StoreGoneError):
    """The gateway's process is there but sends nothing (SIGSTOP, stuck): waiting for its lock would be in vain."""


class StoreAccessDenied(StoreError):
    """The gateway refused the local credential (a different gateway now answers on that port)."""


# -- values on the wire ------------------------------------------------------------------------------------------
_PLAIN = (str, bool, type(None))  # sent as they are (ints and floats are checked: 128-bit, NaN)
_PLAIN_BACK = (str, bool, int, float, type(None))
_I64_MIN, _U64_MAX = -(2 ** 63), 2 ** 64 - 1


def encode_value(v: Any) -> Any:
    """A query value as JSON-able data; types JSON has no word for become {"$<type>": ...}."""
    t = type(v)
    if t is str or t is bool or v is None:
        return v
    if t is int:
        return v if _I64_MIN <= v <= _U64_MAX else {"$int": str(v)}
    if t is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, dt.datetime):
        tz = v.tzinfo
        out: dict[str, Any] = {"$dt": v.isoformat()}
        if isinstance(tz, ZoneInfo):
            out["tz"] = tz.key
        return out
    if isinstance(v, dt.date):
        return {"$date": v.isoformat()}
    if isinstance(v, list):
        return [encode_value(x) for x in v]
    if isinstance(v, tuple):
        return {"$tuple": [encode_value(x) for x in v]}
    if isinstance(v, dict):
        return {"$map": [[encode_value(k), encode_value(x)] for k, x in v.items()]}
    if isinstance(v, decimal.Decimal):
        return {"$dec": str(v)}
    if isinstance(v, uuid.UUID):
        return {"$uuid": str(v)}
    if isinstance(v, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(v).decode()}
    if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return {"$ip": str(v)}
    if isinstance(v, int):  # int subclasses (e.g. IntEnum)
        return int(v)
    if isinstance(v, float):
        return encode_value(float(v))
    if isinstance(v, dt.time):
        return {"$time": v.isoformat()}
    if isinstance(v, dt.timedelta):
        return {"$td": v.total_seconds()}
    raise TypeError(f"cannot send a {t.__name__} value over the store API")


def decode_value(v: Any) -> Any:
    if type(v) in (str, int, float, bool) or v is None:
        return v
    if type(v) is list:
        return [decode_value(x) for x in v]
    if len(v) <= 2:
        if "$dt" in v:
            d = dt.datetime.fromisoformat(v["$dt"])
            return d.replace(tzinfo=ZoneInfo(v["tz"])) if "tz" in v else d
        if "$map" in v:
            return {decode_value(k): decode_value(x) for k, x in v["$map"]}
        if "$tuple" in v:
            return tuple(decode_value(x) for x in v["$tuple"])
        if "$date" in v:
            return dt.date.fromisoformat(v["$date"])
        if "$dec" in v:
            return decimal.Decimal(v["$dec"])
        if "$uuid" in v:
            return uuid.UUID(v["$uuid"])
        if "$int" in v:
            return int(v["$int"])
        if "$float" in v:
            return float(v["$float"])
        if "$bytes" in v:
            return base64.b64decode(v["$bytes"])
        if "$ip" in v:
            return ipaddress.ip_address(v["$ip"])
        if "$time" in v:
            return dt.time.fromisoformat(v["$time"])
        if "$td" in v:
            return dt.timedelta(seconds=v["$td"])
    raise ValueError(f"unknown value on the store API: {str(v)[:80]}")


def encode_rows(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    return [[v if type(v) in _PLAIN else encode_value(v) for v in r] for r in rows]


def decode_rows(rows: list[list[Any]]) -> list[tuple[Any, ...]]:
    return [tuple(v if type(v) in _PLAIN_BACK else decode_value(v) for v in r) for r in rows]


def encode_params(parameters: Any) -> Any:
    if parameters is None:
        return None
    if isinstance(parameters, dict):
        return {str(k): encode_value(v) for k, v in parameters.items()}
    return {"$seq": [encode_value(v) for v in parameters]}


def decode_params(data: Any) -> Any:
    if data is None:
        return None
    if isinstance(data, dict) and set(data) == {"$seq"}:
        return [decode_value(v) for v in data["$seq"]]
    if not isinstance(data, dict):
        raise ValueError("parameters must be an object")
    return {k: decode_value(v) for k, v in data.items()}


# -- the client ---------------------------------------------------------------------------------------------------
class RemoteStore:
    """`Store`'s statement methods, sent to the gateway that announced `ann`. `dsn` is the DSN the command resolved
    (messages name the same store as on the direct path); `via` says which gateway answers."""

    embedded = True

    def __init__(self, dsn: str, ann: Announcement, *, silence: float | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.dsn = dsn
        self.announcement = ann
        self.via = ann.url
        # connect fast (a dead port must not hang the CLI); a heavy statement may take as long as it takes directly,
        # its answer streaming a space every few seconds meanwhile: only silence means the gateway is stuck
        self._silence = silence if silence is not None else SILENCE_SECONDS
        self._http = httpx.Client(base_url=ann.url + API_PREFIX, transport=transport,
                                  timeout=httpx.Timeout(self._silence, connect=3.0),
                                  headers={"authorization": f"Bearer {ann.credential}"}, trust_env=False)

    # -- statements -------------------------------------------------------------------------------------------
    def query_rows(self, sql: str, parameters: dict | None = None,
                   settings: dict | None = None) -> tuple[Sequence[Sequence[Any]], tuple[str, ...]]:
        data = self._post("/query", json_body={"sql": sql, "parameters": encode_params(parameters),
                                               "settings": settings})
        return decode_rows(data["rows"]), tuple(data["columns"])

    def query(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> list[dict]:
        rows, cols = self.query_rows(sql, parameters, settings)
        return [dict(zip(cols, r)) for r in rows]

    def command(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> Any:
        data = self._post("/command", json_body={"sql": sql, "parameters": encode_params(parameters),
                                                 "settings": settings})
        return decode_value(data["result"])

    def insert_json_rows(self, table: str, body: bytes, settings: dict[str, Any] | None = None) -> None:
        if not body:
            return
        params = {"table": table}
        if settings:
            params["settings"] = orjson.dumps(settings).decode()
        self._post("/insert", content=body, params=params)

    def ping(self) -> bool:
        try:
            r = self._http.get("/ping")
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and _json(r).get("instance") == self.announcement.instance

    def identify(self) -> None:
        """Check that the gateway that announced itself answers (raises StoreGoneError / StoreAccessDenied), and
        have it store the calls it answered but has not inserted yet (its batch window): a command counts every
        call answered before it ran, as it would on the store opened directly after the gateway stopped."""
        try:
            r = self._http.get("/ping", params={"flush": "1"}, timeout=httpx.Timeout(IDENTIFY_SECONDS, connect=2.0))
        except httpx.HTTPError as e:
            raise self._gone(e, IDENTIFY_SECONDS) from None
        if r.status_code in (401, 403, 404) or (r.status_code == 200
                                                and _json(r).get("instance") != self.announcement.instance):
            raise StoreAccessDenied(f"{self.via} does not answer as the gateway ({self.announcement.describe()}) "
                                    f"that announced itself in {self.announcement.path}")
        if r.status_code != 200:
            raise StoreGoneError(f"the gateway ({self.announcement.describe()}) answered {r.status_code} to a ping")

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RemoteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------------------
    def _post(self, path: str, *, json_body: Any = None, content: bytes | None = None,
              params: dict[str, str] | None = None) -> dict:
        try:
            if json_body is not None:
                content = orjson.dumps(json_body)
            r = self._http.post(path, content=content, params=params,
                                headers={"content-type": "application/json" if json_body is not None
                                         else "application/x-ndjson"})
        except httpx.HTTPError as e:
            raise self._gone(e, self._silence) from None
        except TypeError as e:  # a parameter value that has no wire form: a programming error, said plainly
            raise StoreError(str(e)) from None
        data = _json(r)
        err = data.get("error") or {}
        if r.status_code == 200 and not err:
            return data
        message = err.get("message") or f"the gateway answered {r.status_code}"
        if r.status_code in (401, 403):
            raise StoreAccessDenied(f"the gateway ({self.announcement.describe()}) refused the local credential "
                                    f"from {self.announcement.path}: {message}")
        if err.get("code") == "store_unavailable":  # a 503, or said inside a long statement's stream
            raise StoreGoneError(f"the gateway ({self.announcement.describe()}) is shutting down: {message}")
        raise StoreError(message)  # a refusal (400), or one sent inside a long statement's 200 stream

    def _gone(self, e: httpx.HTTPError, waited: float) -> StoreGoneError:
        who = f"the gateway announced for this store ({self.announcement.describe()})"
        if isinstance(e, httpx.ReadTimeout):
            return GatewayStuckError(f"{who} is running but sent nothing for {waited:.0f} s (stopped with SIGSTOP, or "
                                     "stuck): check it, or restart it")
        what = "refused the connection" if isinstance(e, httpx.ConnectError) else \
            "stopped before it answered" if isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)) else \
            f"did not answer ({type(e).__name__})"
        return StoreGoneError(f"{who} {what}")


def _json(r: httpx.Response) -> dict:
    try:
        data = orjson.loads(r.content)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
