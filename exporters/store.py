"""One way to reach ClickHouse: `connect(dsn)` returns a `Store` over clickhouse-connect's `get_client`.

`chdb:///<dir>` runs the ClickHouse engine in-process (the embedded default); `http(s)://user:pass@host:8123/db`
talks to a server or cluster. The SQL is the same in both modes.

chDB facts that shape this module (see DESIGN.md): one process per data directory, one directory per process,
statements on a session run one at a time. So a process shares one client per DSN (reference counted), every
statement goes through a lock, and a second process gets a clear error from our own file lock instead of the
engine's opaque "Error initializing EmbeddedServer".
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from .dirlock import lock_dir

__all__ = ["Store", "StoreError", "StoreLockedError", "connect", "is_embedded", "chdb_path", "redact_dsn",
           "LOCK_FILE", "MIN_SERVER_VERSION", "ServerTooOldError", "dsn_database", "without_database", "quote_string"]

LOCK_FILE = "tagway.lock"  # in an embedded store's directory: held by the one process that opens it

# Inserts into the embedded store run on the calling thread alone. By default ClickHouse parses a big JSONEachRow
# body on a pool of threads and runs the views' pipeline on max_threads more; in the gateway those threads wake on
# the cores that serve calls, for every 5 s batch. Paired in bench/gateway_bench.py (wrk, the gateway on one core,
# 3-5 rounds, medians), recording's CPU a call against the default: 0.85-0.95x in four runs, 1.04x in a fifth;
# parsing alone single-threaded 0.96x, max_threads 1 alone 1.02x. One thread still stores ~33,000 spans a second
# with every view (11,000-span batches; the default's pool: ~31,000 on 2 cores), ten times what one gateway process
# serves. A ClickHouse server parses on cores of its own: inserts there keep its defaults.
EMBEDDED_INSERT_SETTINGS = {"input_format_parallel_parsing": 0, "max_threads": 1, "max_insert_threads": 1}

# Start-up options of the embedded engine (server settings, given as clickhouse-local arguments). With its defaults
# chDB polls each MergeTree table's background jobs every 0.1 s while they have nothing to do, and its memory worker
# wakes every 50 ms: with tagway's ~30 tables chDB's threads took ~50-60 ms of CPU a second with nothing to do (an
# idle `tagway serve` 54 -> 28 ms a second in all with these options; under load the saving is within the benches'
# spread, README "Performance"). An insert wakes its tables' merge selection itself, so the idle poll can be slow;
# the memory worker (the memory tracker's correction from RSS) once a second is soon enough for one embedded store.
EMBEDDED_ENGINE_OPTIONS = {
    "background_processing_pool_thread_sleep_seconds_if_nothing_to_do": "5",
    "background_streaming_processing_pool_thread_sleep_seconds_if_nothing_to_do": "5",
    "background_move_processing_pool_thread_sleep_seconds_if_nothing_to_do": "5",
    "memory_worker_period_ms": "1000",
}

# JSONEachRow parses into LowCardinality types ~2x slower than into their plain types (each value takes the
# dictionary's generic text path): the call span's SpanAttributes, a Map(LowCardinality(String), String) of 22
# entries, took 10.3 µs a row to parse, 4.6 as Map(String, String), 6.6 with the CAST back. So the embedded store
# reads an insert's rows as the plain types and INSERT ... SELECT converts them (the same values: a CAST to
# LowCardinality changes the storage, not the value). Measured in one process, alternating with the driver's insert,
# the gateway's schema with every view: 12,500-row inserts (a 5 s batch at 2,500 calls/s) 49.8-50.9 -> 32.0-33.8 µs
# a row (medians of 12-20), a 1-row insert +6% (the SELECT's planning); bench/recording_cost_bench.py `on`, 3
# alternating runs: 271-288 -> 246-266 µs a call in all. Only for tables without DEFAULT / MATERIALIZED / EPHEMERAL
# columns: file() would fill an omitted field with its type's default where a plain insert computes the expression.
_LOW_CARDINALITY = "LowCardinality("
_NO_PLAIN_READ = ("DEFAULT", "MATERIALIZED", "EPHEMERAL")

# The oldest ClickHouse server tagway's schema runs on: the llm_calls view (migration 2) reads its tags with
# mapFilter/mapApply, which came in 22.3 (the engine's own system.functions.introduced_in); the rest is older (Bool
# 21.12, insert_deduplication_token 22.2, quantileBFloat16 21.7, Map 21.1). 22.3 is an LTS release.
MIN_SERVER_VERSION = (22, 3)
# a refusal of our credentials: the server answered, but no query of ours ran (no version to ask about either)
_AUTH_CODES = frozenset({192, 193, 194, 195, 516, 720})

_CODE = re.compile(r"\bCode: (\d+)\b")
_COMMANDS = [0]  # commands run by any Store of this process: a table's columns are read again after one


def plain_type(t: str) -> str:
    """A ClickHouse type with every LowCardinality(...) wrapper removed: Map(LowCardinality(String), String) ->
    Map(String, String)."""
    while (i := t.find(_LOW_CARDINALITY)) >= 0:
        j = k = i + len(_LOW_CARDINALITY)
        depth = 1
        while depth:
            depth += {"(": 1, ")": -1}.get(t[k], 0)
            k += 1
        t = t[:i] + t[j:k - 1] + t[k:]
    return t


def plain_read(columns: Sequence[Sequence[str]]) -> tuple[str, str] | None:
    """From DESCRIBE TABLE's (name, type, default_type) rows: the insertable column list and the structure to read
    an insert's rows with (plain types), or None when the table should be inserted into as it is (no LowCardinality
    to gain on, or a column whose default is an expression)."""
    if any(c[2] in _NO_PLAIN_READ for c in columns):
        return None
    cols = [(c[0], c[1]) for c in columns if c[2] != "ALIAS"]
    if not any(_LOW_CARDINALITY in t for _, t in cols):
        return None
    names = ", ".join(_quote_identifier(n) for n, _ in cols)
    return names, ", ".join(f"{_quote_identifier(n)} {plain_type(t)}" for n, t in cols)


def _quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _settings_clause(settings: dict[str, Any]) -> str:
    """A SETTINGS clause as the driver would send the settings: names checked, booleans as 1/0, None left out."""
    out = []
    for k, v in settings.items():
        if not _SETTING_NAME.fullmatch(str(k)):
            raise StoreError(f"not a ClickHouse setting name: {k!r}")
        if v is None:
            continue
        value = int(v) if isinstance(v, bool) else v if isinstance(v, (int, float)) else quote_string(str(v))
        out.append(f"{k} = {value}")
    return ", ".join(out)


class StoreError(RuntimeError):
    """ClickHouse could not be reached or refused a statement. `code` is ClickHouse's error code when the server
    answered with one (it was reached, and said no), else None."""

    @property
    def code(self) -> int | None:
        m = _CODE.search(str(self))
        return int(m.group(1)) if m else None


class StoreLockedError(StoreError):
    """Another process holds the embedded data directory."""


class DsnError(StoreError):
    """The DSN itself cannot name a store (an unknown scheme): the user's input, not the server, is wrong."""


class ServerTooOldError(StoreError):
    """The ClickHouse server is older than MIN_SERVER_VERSION (an upgrade fixes it, so it is retried like an
    outage)."""


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb:")


def chdb_path(dsn: str) -> str:
    """The data directory of an embedded DSN (absolute), or ':memory:'."""
    path = dsn[len("chdb://"):] if dsn.startswith("chdb://") else dsn[len("chdb:"):]
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return ":memory:"
    return os.path.realpath(path)


class Store:
    """A thread-safe handle on one ClickHouse client. Statements are serialised (chDB needs it; a server does not
    mind) and every driver error surfaces as `StoreError` with a one-line message."""

    def __init__(self, dsn: str, client: Any, lock_fd: int | None, *, key: str | None = None,
                 defaults: dict[str, Any] | None = None) -> None:
        self.dsn = dsn
        self._key = key or dsn
        self._client = client
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        self._refs = 1
        self.embedded = is_embedded(dsn)
        self._defaults = dict(defaults or {})
        self._plain_reads: dict[str, tuple[str, str] | None] = {}  # table -> plain_read(its columns)
        self._plain_epoch = -1  # _COMMANDS[0] when they were read

    def _settings(self, settings: dict | None) -> dict | None:
        return {**self._defaults, **(settings or {})} if self._defaults else settings

    # -- statements -------------------------------------------------------------------------------------------
    def command(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> Any:
        with self._lock, _driver_errors(self.embedded):
            # It may change a table's columns (a migration): every Store reads them again, after it too (another
            # client's insert may have read them while it ran)
            _COMMANDS[0] += 1
            try:
                return self._client.command(sql, parameters=parameters, settings=self._settings(settings))
            finally:
                _COMMANDS[0] += 1

    def query(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> list[dict]:
        """Rows as dicts (column name -> value)."""
        rows, cols = self.query_rows(sql, parameters, settings)
        return [dict(zip(cols, r)) for r in rows]

    def query_rows(self, sql: str, parameters: dict | None = None,
                   settings: dict | None = None) -> tuple[Sequence[Sequence[Any]], tuple[str, ...]]:
        with self._lock, _driver_errors(self.embedded):
            res = self._client.query(sql, parameters=parameters, settings=self._settings(settings))
        return res.result_rows, tuple(res.column_names)

    def insert_json_rows(self, table: str, body: bytes | Sequence[bytes],
                         settings: dict[str, Any] | None = None) -> None:
        """Insert newline-separated JSON objects (JSONEachRow): bytes, or parts to be sent in order (a batch's
        chunks). The exporter builds these bytes once and either sends them here or writes the very same bytes to
        the spool. `settings` are per-insert ClickHouse settings (the exporter passes `insert_deduplication_token`
        so a re-sent batch is not stored twice)."""
        if not isinstance(body, (bytes, bytearray)):
            # the embedded driver writes parts to its INFILE one by one; over HTTP one body keeps the driver's
            # retry of a request the server closed early (it re-sends bytes, never a generator)
            body = list(body) if self.embedded else b"".join(body)
        if not body:
            return
        if self.embedded:
            settings = {**EMBEDDED_INSERT_SETTINGS, **(settings or {})}
        with self._lock, _driver_errors(self.embedded):
            read = self._plain_read(table) if self.embedded else None
            if read is None:
                self._client.raw_insert(table, insert_block=body, fmt="JSONEachRow", settings=settings)
                return
            try:
                self._insert_plain(table, read, body, settings or {})
            except Exception:
                self._plain_reads.pop(table, None)  # read the table's columns again next time (a schema change?)
                raise

    def _plain_read(self, table: str) -> tuple[str, str] | None:
        """Caller holds the lock."""
        if self._plain_epoch != _COMMANDS[0]:
            self._plain_reads.clear()
            self._plain_epoch = _COMMANDS[0]
        if table not in self._plain_reads:
            rows = self._client.query(f"DESCRIBE TABLE {table}").result_rows
            self._plain_reads[table] = plain_read(rows)
        return self._plain_reads[table]

    def _insert_plain(self, table: str, read: tuple[str, str], body: bytes | Sequence[bytes],
                      settings: dict[str, Any]) -> None:
        names, structure = read
        f = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False)  # noqa: SIM115 - unlinked below
        try:
            with f:
                for part in ([body] if isinstance(body, (bytes, bytearray)) else body):
                    f.write(part)
            clause = _settings_clause(settings)
            clause = f" SETTINGS {clause}" if clause else ""
            self._client.command(f"INSERT INTO {table} ({names}){clause} SELECT {names} FROM "
                                 f"file({quote_string(f.name)}, 'JSONEachRow', {quote_string(structure)})")
        finally:
            os.unlink(f.name)

    def ping(self) -> bool:
        with self._lock:
            try:
                return bool(self._client.ping())
            except Exception:
                return False

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        with _REGISTRY_LOCK:
            self._refs -= 1
            if self._refs > 0:
                return
            _REGISTRY.pop(self._key, None)
        with self._lock:
            try:
                self._client.close()
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[str, Store] = {}
_REGISTRY_LOCK = threading.Lock()


def connect(dsn: str, *, settings: dict[str, Any] | None = None, connect_timeout: float = 5,
            send_receive_timeout: float = 30, role: str = "", defaults: dict[str, Any] | None = None) -> Store:
    """Open (or share) the client for `dsn`. Raises StoreError with a clear message when it cannot.

    `role` opens a client of its own (shared by that role): reads that must not queue behind the span inserts, or
    hold them up, use one (chDB runs statements of different clients side by side; each client runs one at a
    time). An embedded role shares this process's hold on the data directory, so open the primary client first.
    `defaults` are ClickHouse settings added to each of its queries and commands (limits, threads)."""
    key = f"{dsn}#{role}" if role else dsn
    with _REGISTRY_LOCK:
        store = _REGISTRY.get(key)
        if store is not None:
            store._refs += 1
            return store
        lock_fd = None
        try:
            if is_embedded(dsn):
                path = chdb_path(dsn)
                if path != ":memory:" and not role:
                    os.makedirs(path, mode=0o700, exist_ok=True)  # every tenant's captured content is in it
                    lock_fd = lock_dir(path, LOCK_FILE, StoreLockedError(
                        f"the embedded store {path} is in use by another process (chDB allows one process per data"
                        " directory); stop the other tagway process, choose another data directory, or use a"
                        " ClickHouse server DSN"))
                client = clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=settings,
                                                       chdb_options=dict(EMBEDDED_ENGINE_OPTIONS))
            else:
                # clickhouse-connect takes host, port, user and database from the DSN but not its scheme (TLS only
                # on ports 443/8443): the scheme is checked here, and https:// asks for TLS whatever the port
                client = clickhouse_connect.get_client(dsn=dsn, interface=_interface(dsn), settings=settings,
                                                       connect_timeout=connect_timeout,
                                                       send_receive_timeout=send_receive_timeout)
                try:  # the driver asked version() as it connected: a server too old is refused here, once
                    _check_version(client.server_version)
                except StoreError:
                    client.close()
                    raise
        except StoreError:
            raise
        except Exception as e:  # the driver raises several types for "cannot connect"
            if lock_fd is not None:
                os.close(lock_fd)
            reason = "" if is_embedded(dsn) else _unreachable(e)  # the embedded store's errors are the disk's
            err = StoreError(f"cannot reach ClickHouse at {redact_dsn(dsn)} ({reason})" if reason else
                             f"cannot open ClickHouse at {redact_dsn(dsn)}: {_one_line(e)}")
            if not reason and not is_embedded(dsn) and err.code not in _AUTH_CODES:
                # The server answered, and refused what the driver asks as it connects: a server older than the
                # driver (18.16 has no system.settings.readonly) is told as too old, not as the driver's query.
                _check_version(_ask_version(dsn, connect_timeout))
            raise err from e
        store = Store(dsn, client, lock_fd, key=key, defaults=defaults)
        _REGISTRY[key] = store
        return store


def _check_version(version: str | None) -> None:
    """Raise ServerTooOldError for a server before MIN_SERVER_VERSION; a version that cannot be read passes."""
    parts = re.match(r"(\d+)\.(\d+)", version or "")
    if parts and (int(parts.group(1)), int(parts.group(2))) < MIN_SERVER_VERSION:
        need = ".".join(map(str, MIN_SERVER_VERSION))
        raise ServerTooOldError(f"ClickHouse {parts.group(1)}.{parts.group(2)} is too old: tagway needs >= {need}")


def _ask_version(dsn: str, timeout: float) -> str | None:
    """version() over ClickHouse's plain HTTP interface, without the driver (which failed before it said it) and
    without the DSN's database (which may be what failed); None when that fails too."""
    u = urlsplit(dsn)
    secure = u.scheme == "https" or (u.scheme == "http" and u.port in (443, 8443))
    port = u.port or (8443 if secure else 8123)
    host = f"[{u.hostname}]" if ":" in (u.hostname or "") else u.hostname  # an IPv6 address
    import httpx  # noqa: PLC0415 - only on this rare path

    verify = parse_qs(u.query).get("verify", ["true"])[0].lower() not in ("false", "0")  # as the DSN asks the driver
    try:
        r = httpx.get(f"{'https' if secure else 'http'}://{host}:{port}/", params={"query": "SELECT version()"},
                      auth=(unquote(u.username or "default"), unquote(u.password or "")), timeout=timeout,
                      verify=verify, trust_env=False)
    except Exception:  # noqa: BLE001 - the driver's error is the one to tell
        return None
    return r.text[:64].strip() if r.status_code == 200 else None


def dsn_database(dsn: str) -> str:
    """The database a server DSN names (its path, as clickhouse-connect reads it); "" for none."""
    return unquote(urlsplit(dsn).path[1:].split("/")[0]) if "://" in dsn and not is_embedded(dsn) else ""


def without_database(dsn: str) -> str:
    """The same server DSN without its database: the user's default database."""
    u = urlsplit(dsn)
    return urlunsplit((u.scheme, u.netloc, "", u.query, u.fragment))


def _interface(dsn: str) -> str | None:
    """https:// means TLS on any port; http:// leaves it to the driver (TLS on 443/8443, as before)."""
    scheme = dsn.partition("://")[0].lower() if "://" in dsn else ""
    if scheme not in ("http", "https"):
        raise DsnError(f"{redact_dsn(dsn)}: unsupported DSN; use chdb:///path/to/dir (embedded), "
                       "http://user:password@host:8123/database or https://... (a ClickHouse server)")
    return "https" if scheme == "https" else None


def redact_dsn(dsn: str) -> str:
    """Hide the password in a DSN for messages."""
    if "://" not in dsn or "@" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@contextlib.contextmanager
def _driver_errors(embedded: bool = False) -> Iterator[None]:
    """Driver errors of a statement as StoreError with a one-line message (a server's, with why it could not be
    reached; the embedded engine's as it says them)."""
    try:
        yield
    except ClickHouseError as e:
        reason = "" if embedded else _unreachable(e)
        raise StoreError(f"ClickHouse unreachable ({reason})" if reason else _one_line(e)) from e
    except OSError as e:
        raise StoreError(f"ClickHouse unreachable: {e}") from e


def _unreachable(e: BaseException) -> str:
    """Why the server could not be reached ("connection refused", "name or service not known", "timed out"), from
    the socket error under the driver's and urllib3's wrappers (whose text repeats a URL with a query id); "" when
    the server answered."""
    seen = 0
    x: BaseException | None = e
    while x is not None and seen < 10:  # __context__ too: urllib3 raises its wrappers inside `except`
        if _CODE.search(str(x)):
            return ""  # the server answered with an error code: it was reached
        if isinstance(x, TimeoutError):
            return "timed out"
        if isinstance(x, OSError) and x.strerror:
            return x.strerror[:1].lower() + x.strerror[1:]
        x, seen = x.__cause__ or x.__context__, seen + 1
    return ""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), type(e).__name__)
    return first[:500]
