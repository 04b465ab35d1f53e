"""The local store API: lets `tagway stats|errors|show|replay|db` work while this gateway holds the embedded store.

chDB allows one process per data directory, so the gateway runs the CLI's statements on clients of its own (niced, with
the reads' memory and thread limits but no time limit, as on the store opened directly; a statement whose command
left, or still running when the gateway stops, is killed) and sends rows back (`exporters.remote_store` is the
client). Who may use it:
- only connections from this host (loopback, or the gateway's own address): anything else gets a 404;
- only with the per-start local credential that `exporters.discovery` writes 0600 into the store directory (or the
  admin key). A tenant key never reaches a statement: 403.
- the admin key reads, and only the store: one statement, read-only in the engine, no settings of its own, no
  function that reads files, reaches the network or runs programs (`admin_read_refusal`). Commands and inserts take
  the credential, which only the gateway's own OS user can read (the CLIs' statements migrate, write and may do as
  that user could anyway).
Statements run on the thread pool, never on the event loop, so a heavy CLI query does not stall the proxy.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import itertools
import logging
import os
import re
import sys
import uuid
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from exporters import discovery
from exporters.remote_store import API_PREFIX, decode_params, encode_rows, encode_value
from exporters.store import StoreError

from .auth import CREDENTIAL_HEADERS, KeyRing
from .errors import GatewayError, error_body

__all__ = ["LocalAccess", "build_store_router", "serve"]

log = logging.getLogger("tagway")

KEEP_TICKS = 20  # every 2 s the gateway checks that its discovery file is still there (LocalAccess.keep)
# at most this many CLI statements wait for the store at once; the rest get a 503 instead of piling up threads
MAX_PENDING = 8
# A statement still running after this long answers in a stream that sends a space this often until its JSON: the
# CLI waits as long as the statement takes (no time limit, as on the store opened directly) yet tells a stuck or
# stopped gateway by the silence (exporters/remote_store.SILENCE_SECONDS). TAGWAY_STORE_HEARTBEAT_SECONDS is an
# internal knob for the tests (a test gateway beats every second, so its statements need not last 6 s); not documented
# for users: it must stay well under SILENCE_SECONDS.
HEARTBEAT_SECONDS = float(os.environ.get("TAGWAY_STORE_HEARTBEAT_SECONDS") or 5.0)
# Each statement of a local command carries this comment and its own id, so it can be found and killed
# (`KILL QUERY WHERE query LIKE ...`: chDB does not keep a query_id given in the settings).
LOCAL_MARK = "tagway-local:"


class LocalAccess:
    """This start's announcement (discovery file + credential) and whether the store API still accepts work."""

    def __init__(self) -> None:
        self.announcement: discovery.Announcement | None = None
        self.closed = False
        self.stopping = False  # the server is stopping: statements still streaming are killed, so it need not wait

    def announce(self, dsn: str, url: str, spool: str = "") -> discovery.Announcement | None:
        directory = discovery.store_dir(dsn)
        if directory is None:  # a server DSN: every CLI opens it directly
            return None
        self.announcement = discovery.announce(directory, url, spool=spool)
        return self.announcement

    def keep(self) -> bool:
        """Write the discovery file again if it went missing or was damaged while this gateway serves (it holds the
        store's lock, so the file can only be ours): without it no local CLI could reach the store until a restart.
        Same credential and instance, so a CLI mid-command is not cut off. True when it was rewritten."""
        ann = self.announcement
        if ann is None or self.closed:
            return False
        try:
            current = discovery.read(ann.store)
        except discovery.DiscoveryError:
            current = None
        if current is not None and dataclasses.replace(current, path="") == dataclasses.replace(ann, path=""):
            return False
        self.announcement = discovery.write(ann)
        log.warning("the discovery file %s was missing or not ours: written again", ann.path)
        return True

    def close(self) -> None:
        """Stop accepting statements and remove the discovery file (idempotent)."""
        self.closed = True
        ann, self.announcement = self.announcement, None
        if ann is not None:
            try:
                discovery.withdraw(ann)
            except OSError as e:  # shutdown must go on
                log.warning("could not remove %s: %s", ann.path, e)

    def credential_ok(self, token: str) -> bool:
        ann = self.announcement
        return ann is not None and hmac.compare_digest(token.encode(), ann.credential.encode())


def _is_local(request: Request) -> bool:
    client, server = request.scope.get("client"), request.scope.get("server")
    if not client:
        return False
    try:
        addr = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    return addr.is_loopback or bool(server and server[0] == client[0])


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error") -> Response:
    return Response(error_body(message, type_, code), status_code=status, media_type="application/json")


class NotAllowed(ValueError):
    """A statement the admin key may not run (400 statement_not_allowed)."""


def _outcome(task: asyncio.Future) -> tuple[int, bytes]:
    """A finished statement's HTTP status and JSON body."""
    try:
        return 200, task.result()
    except StoreError as e:
        message = str(e)
        if "MEMORY_LIMIT_EXCEEDED" in message:
            message += (" (statements for local commands run in the gateway's process under its "
                        "storage.query_max_memory_bytes: raise it, or narrow the command)")
        return 400, error_body(message, "store_error", "store_error")
    except NotAllowed as e:
        return 400, error_body(str(e), "invalid_request_error", "statement_not_allowed")
    except (ValueError, TypeError, KeyError) as e:
        return 400, error_body(f"bad store request: {e}", "invalid_request_error", "invalid_request")
    except Exception as e:  # a bug of ours: said as such, not as a gateway that stopped mid-answer
        log.exception("a local command's statement failed")
        return 500, error_body(f"internal error running the statement: {type(e).__name__}", "server_error",
                               "internal_error")


# What the admin key may call as a table function: those that stay inside the store (lower-cased). Every other table
# function the engine itself lists (system.table_functions, asked once per store) is refused, so a server with table
# functions chDB lacks (arrowFlight, hive, a later release's) refuses them too. Besides, by name (the scalar file(),
# eval(), and names an engine may not list): _REFUSED_FUNCTIONS, and any name that starts with one of
# _REFUSED_FAMILIES (s3Cluster, icebergS3, deltaLakeAzureCluster, ...).
_LOCAL_TABLE_FUNCTIONS = frozenset({
    "numbers", "numbers_mt", "zeros", "zeros_mt", "primes", "values", "sqlstandardvalues", "null", "generaterandom",
    "generateseries", "generate_series", "view", "viewifpermitted", "viewexplain", "merge", "loop", "format",
    "fuzzjson", "fuzzquery", "cluster", "clusterallreplicas", "mergetreeindex", "mergetreeprojection",
    "mergetreecodecblockcounts", "mergetreetextindex", "mergetreeanalyzeindexes", "mergetreeanalyzeindexesuuid"})
_TABLE_FUNCTIONS: dict[str, frozenset[str]] = {}  # by store dsn: the engine's own table functions
_REFUSED_FUNCTIONS = frozenset({
    "file", "filecluster", "filesystem", "url", "urlcluster", "remote", "remotesecure", "gcs", "oss", "cosn",
    "executable", "python", "mysql", "postgresql", "sqlite", "mongodb", "redis", "odbc", "jdbc", "bigquery",
    "ytsaurus", "arrowstream", "dictionary", "input", "eval"})
_REFUSED_FAMILIES = ("s3", "hdfs", "azureblobstorage", "iceberg", "deltalake", "hudi", "paimon")
_READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "EXISTS", "EXPLAIN"})
# formatQuery's output: '...' strings and `...` identifiers with backslash escapes, words, anything else
_CANONICAL_TOKEN = re.compile(r"'(?:[^'\\]|\\.)*'|`((?:[^`\\]|\\.)*)`|([A-Za-z_][A-Za-z0-9_]*)|(\S)", re.DOTALL)


def admin_read_refusal(store: Any, sql: str) -> str | None:
    """Why the admin key may not run `sql` (None: it may). The statement is checked as the engine parses it: the
    engine's formatQuery() gives it back canonical (comments gone, one statement or a syntax error, identifiers
    unquoted and unescaped: `fi\\x6ce` is file), so case, spacing, comments and quoting cannot hide a name. It runs
    with readonly=1 as well (the engine refuses writes, DDL, changing readonly and most settings, and every table
    function that reaches outside in a SELECT; but not the scalar file(), INTO OUTFILE, KILL, USE, nor schema
    inference in DESCRIBE).
    Limits: what is expanded at run time is not seen (a view or dictionary over an outside source: the admin key
    cannot create one); a function that is not a table function but reaches outside must be named above."""
    rows, _ = store.query_rows("SELECT formatQuery({q:String})", {"q": sql}, {"readonly": 1})
    outside = _outside_table_functions(store)
    tokens = [(quoted, word, other) for quoted, word, other in _CANONICAL_TOKEN.findall(rows[0][0])
              if quoted or word or other]  # strings are left out: they are data
    if not tokens or tokens[0][1].upper() not in _READ_STATEMENTS:
        return ("The admin key reads the store: SELECT, WITH, SHOW, DESCRIBE, EXISTS or EXPLAIN (commands take the "
                "gateway's local credential).")
    for (quoted, word, _), nxt in zip(tokens, tokens[1:] + [("", "", "")]):
        name = (word or re.sub(r"\\(.)", r"\1", quoted)).lower()
        if nxt[2] == "(" and (name in _REFUSED_FUNCTIONS or name.startswith(_REFUSED_FAMILIES) or name in outside):
            return (f"{word or quoted}() is not allowed with the admin key: it reaches outside the store (the "
                    "gateway host's files, its network, programs).")
    words = [w.upper() for _, w, _ in tokens]
    if any(a == "INTO" and b == "OUTFILE" for a, b in itertools.pairwise(words)):
        return "INTO OUTFILE is not allowed with the admin key: it writes a file on the gateway's host."
    return None


def _outside_table_functions(store: Any) -> frozenset[str]:
    """The engine's table functions that are not known to stay in the store, lower-cased (asked once per store)."""
    key = str(getattr(store, "dsn", id(store)))
    names = _TABLE_FUNCTIONS.get(key)
    if names is None:
        rows, _ = store.query_rows("SELECT lower(name) FROM system.table_functions", None, {"readonly": 1})
        names = _TABLE_FUNCTIONS[key] = frozenset(r[0] for r in rows) - _LOCAL_TABLE_FUNCTIONS
    return names


def marked(sql: str, mark: str) -> str:
    return f"/* {LOCAL_MARK}{mark} */ {sql}"


def build_store_router(keyring: KeyRing, get_store: Callable[[], Any], access: LocalAccess,
                       flush: Callable[[], Any] | None = None,
                       kill: Callable[[str], Any] | None = None,
                       get_local: Callable[[], Any] | None = None) -> APIRouter:
    """`get_store`: where statements sent with the admin key run (the reads' clients, with their limits);
    `get_local`: where a local command's run, sent with the per-start credential (no time limit, as on the store
    opened directly; default `get_store`). `flush`: stores the calls this gateway has answered but not inserted yet
    (its recorder's force_flush); a CLI asks for it once, when it connects, so it counts every call answered before
    it ran. `kill(mark)`: stops the statement marked so (`marked`), when its command has left."""
    get_local = get_local or get_store
    router = APIRouter(include_in_schema=False)
    pending = asyncio.Semaphore(MAX_PENDING)

    def check(request: Request) -> Response | None:
        if not _is_local(request):
            return _error(404, "Not found.", "not_found")
        if any(len(request.headers.getlist(h)) > 1 for h in CREDENTIAL_HEADERS):
            return _error(400, "A credential header is sent more than once; send it once.", "duplicate_header")
        auth = request.headers.get("authorization") or ""
        if not _by_credential(request):
            try:
                p = keyring.authenticate(auth or None, request.headers.get("api-key"))
            except GatewayError:
                return _error(401, "The store API needs the gateway's local credential (from its discovery file) "
                                   "or the admin key.", "local_credential_required", "authentication_error")
            if not p.is_admin:
                return _error(403, "Tenant keys cannot use the store API.", "admin_key_required",
                              "permission_error")
        if access.closed or get_store() is None:
            return _error(503, "The store is not available (the gateway is starting, stopping, or not recording).",
                          "store_unavailable", "server_error")
        return None

    async def run(fn: Callable[[], Any], mark: str = "") -> Response:
        if pending.locked():
            return _error(503, f"Too many store statements in flight (max {MAX_PENDING}); retry.", "store_busy",
                          "server_error")
        await pending.acquire()
        task = asyncio.ensure_future(run_in_threadpool(fn))
        task.add_done_callback(_finished)  # when the statement ends, even if the caller left
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS)
        if done:
            status, body = _outcome(task)
            return Response(body, status_code=status, media_type="application/json")
        return StreamingResponse(_beats(task, mark), media_type="application/json")

    def _finished(task: asyncio.Future) -> None:
        pending.release()
        if not task.cancelled():
            task.exception()  # retrieved (an error whose caller left is not "never retrieved")

    async def _beats(task: asyncio.Future, mark: str) -> Any:
        try:
            while not (await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS))[0]:
                if access.stopping or access.closed:  # said as the 503 a new statement gets; finally kills it
                    yield error_body("The gateway is stopping: the statement was stopped.", "server_error",
                                     "store_unavailable")
                    return
                yield b" "  # JSON allows leading white space
            yield _outcome(task)[1]  # a refusal is its error object, the status being sent already
        finally:
            if not task.done() and mark and kill is not None:  # the command left: its statement goes too
                asyncio.ensure_future(run_in_threadpool(kill, mark))

    async def statement(request: Request) -> tuple[str, Any, Any] | Response:
        try:
            data = orjson.loads(await request.body())
            sql, settings = data["sql"], data.get("settings")
            params = decode_params(data.get("parameters"))
            if not isinstance(sql, str) or not (settings is None or isinstance(settings, dict)):
                raise ValueError("sql must be a string, settings an object")
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            return _error(400, f"bad store request: {e}", "invalid_request")
        return sql, params, settings

    @router.get(API_PREFIX + "/ping")
    async def ping(request: Request) -> Response:
        denied = check(request)
        if denied is not None:
            return denied
        ann = access.announcement
        flushed = None
        if flush is not None and request.query_params.get("flush") == "1":
            try:
                flushed = bool(await run_in_threadpool(flush))
            except Exception as e:  # the answer still stands, only less fresh
                log.warning("could not store the pending calls for a local command: %s", e)
                flushed = False
        return Response(orjson.dumps({"instance": ann.instance if ann else "", "pid": os.getpid(),
                                      "flushed": flushed}),
                        media_type="application/json")

    async def run_statement(request: Request, execute: Callable[[Any, str, Any, Any], bytes]) -> Response:
        """Check the caller, read the statement, run `execute(store, sql, params, settings)` off the loop."""
        denied = check(request)
        if denied is not None:
            return denied
        local = _by_credential(request)
        if not local and execute is not query_rows:
            return _admin_reads_only()
        st = await statement(request)
        if isinstance(st, Response):
            return st
        sql, params, settings = st
        mark = uuid.uuid4().hex
        if local:
            return await run(lambda: execute(get_local(), marked(sql, mark), params, settings), mark)
        if settings:  # they are applied before readonly takes hold: one could turn on what readonly keeps off
            return _error(400, "Statements sent with the admin key take no settings: they run read-only under the "
                               "gateway's limits.", "statement_not_allowed")

        def admin_read() -> bytes:
            store = get_store()
            refusal = admin_read_refusal(store, sql)
            if refusal:
                raise NotAllowed(refusal)
            return query_rows(store, marked(sql, mark), params, {"readonly": 1})

        return await run(admin_read, mark)

    def _admin_reads_only() -> Response:
        return _error(403, "The admin key may only read the store (/admin/store/query); commands and inserts take the "
                           "gateway's local credential.", "local_credential_required", "permission_error")

    def _by_credential(request: Request) -> bool:
        auth = request.headers.get("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        return bool(token) and access.credential_ok(token)

    def query_rows(store: Any, sql: str, params: Any, settings: Any) -> bytes:
        rows, cols = store.query_rows(sql, params, settings)
        return orjson.dumps({"columns": list(cols), "rows": encode_rows(rows)})

    def command_result(store: Any, sql: str, params: Any, settings: Any) -> bytes:
        result = store.command(sql, params, settings)
        if not isinstance(result, (str, int, float, list, tuple, type(None))):
            result = None  # a QuerySummary: the callers never read it
        return orjson.dumps({"result": encode_value(result)})

    @router.post(API_PREFIX + "/query")
    async def query(request: Request) -> Response:
        return await run_statement(request, query_rows)

    @router.post(API_PREFIX + "/command")
    async def command(request: Request) -> Response:
        return await run_statement(request, command_result)

    @router.post(API_PREFIX + "/insert")
    async def insert(request: Request) -> Response:
        denied = check(request)
        if denied is not None:
            return denied
        if not _by_credential(request):
            return _admin_reads_only()
        table = request.query_params.get("table") or ""
        try:
            settings = orjson.loads(request.query_params["settings"]) if "settings" in request.query_params else None
        except orjson.JSONDecodeError:
            return _error(400, "settings must be JSON", "invalid_request")
        if not table or not all(c.isalnum() or c in "._`" for c in table):
            return _error(400, "table: a table name is required", "invalid_request")
        body = await request.body()

        def work() -> bytes:
            get_store().insert_json_rows(table, body, settings=settings)
            return b'{"ok":true}'
        return await run(work)

    return router


# -- serving with an announcement ---------------------------------------------------------------------------------
def local_url(host: str, port: int) -> str:
    """The URL a CLI on this host uses to reach a server bound to (host, port)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app: Any, *, sockets: list | None = None, **kwargs: Any) -> None:
    """uvicorn.run(app, **kwargs) (on already bound `sockets` if given), announcing the store to local CLIs once the socket is bound (not before: a CLI
    must never find an address that is not listening yet) and withdrawing it at shutdown."""
    import uvicorn  # noqa: PLC0415

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started and not self.should_exit and self.servers:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                try:
                    app.announce(local_url(host, port))
                except OSError as e:  # the gateway still serves traffic; CLIs get the lock error
                    log.warning("could not write the discovery file: %s", e)

        async def shutdown(self, sockets: Any = None) -> None:
            app.local.stopping = True  # before uvicorn waits for open requests: a long statement's stream ends now
            await super().shutdown(sockets)

        async def on_tick(self, counter: int) -> bool:
            if counter % KEEP_TICKS == 0:  # uvicorn ticks every 0.1 s
                try:
                    app.local.keep()
                except OSError as e:
                    log.warning("could not write the discovery file again: %s", e)
            return await super().on_tick(counter)

    server = AnnouncingServer(uvicorn.Config(app, **kwargs))
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        app.local.close()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
