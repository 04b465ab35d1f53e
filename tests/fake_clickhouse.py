"""Stand-ins for a ClickHouse server over HTTP (no modern ClickHouse server installs here: see DESIGN.md).

`WrongPasswordClickHouse` refuses our password, as a real one does: the wrong-password start-up and `tagway config
check`. `ChdbClickHouse` is a server that works: ClickHouse's HTTP interface (the part clickhouse-connect uses) in
front of the real engine (chDB) in a process of its own on 127.0.0.1, with users, passwords and the grants a test
needs to take away (DDL, INSERT, CREATE DATABASE) checked before the statement runs, as ClickHouse checks them
before `IF NOT EXISTS`. A process of its own because chDB opens one data path per process (tests/chdb_fixture.py),
and so that stopping it is a server going away.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib

from aiohttp import web

from tests.http_server import ThreadedServer, free_port

AUTH_FAILED = ("Code: 516. DB::Exception: tagway: Authentication failed: password is incorrect, or there is no user "
               "with such name. (AUTHENTICATION_FAILED) (version 25.8.1.1 (official build))\n")


class WrongPasswordClickHouse(ThreadedServer):
    """Answers every request with HTTP 516 and ClickHouse's AUTHENTICATION_FAILED text."""

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.deny)

    async def deny(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=516, text=AUTH_FAILED, headers={"X-ClickHouse-Exception-Code": "516"})

    def dsn(self, password: str = "wrong-password") -> str:
        return f"http://tagway:{password}@127.0.0.1:{self.port}/tagway"


_DDL = re.compile(r"\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE|ATTACH|DETACH|EXCHANGE)\b\s*(OR\s+REPLACE\s+)?"
                  r"(TEMPORARY\s+)?(MATERIALIZED\s+VIEW|VIEW|DATABASE|TABLE|DICTIONARY)?", re.I)
_INSERT = re.compile(r"\s*INSERT\b", re.I)
_CODE = re.compile(r"Code: (\d+)")
# ClickHouse's HTTP statuses for the codes a test meets (HTTPHandler's exceptionCodeToHTTPStatus); else 500
_STATUS = {516: 401, 192: 401, 194: 401, 497: 403, 81: 404, 60: 404, 62: 400, 47: 400, 46: 400, 27: 400, 117: 400}
_RESERVED = {"query", "database", "session_id", "session_timeout", "session_check", "query_id", "quota_key",
             "wait_end_of_query", "compress", "decompress", "enable_http_compression", "default_format", "user",
             "password", "client_protocol_version", "role", "buffer_size", "send_progress_in_http_headers",
             "http_headers_progress_interval_ms", "add_http_cors_header", "max_result_bytes"}


class ChdbClickHouse:
    """A ClickHouse server for a test (see the module's docstring): `with ChdbClickHouse(tmp_path) as ch:`, then
    `ch.dsn("tagway")`. Users and passwords are `users`; those in `ddl` may run DDL (CREATE, ALTER, DROP, ...),
    those in `insert` may INSERT. `version` is what version() answers; `old=True` answers as Debian's 18.16 does
    (no `readonly` column in system.settings). `set(...)` changes any of them while it runs; `stats()` counts the
    statements it refused and ran, by user."""

    def __init__(self, path, *, users: dict[str, str] | None = None, ddl=("admin",), insert=None,
                 version: str | None = None, old: bool = False) -> None:
        self.path = str(path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = {"users": dict(users or {"tagway": "tagway-pw", "admin": "admin-pw"}), "ddl": list(ddl),
                      "insert": list(insert) if insert is not None else None, "version": version, "old": old}
        self._proc: subprocess.Popen | None = None

    def dsn(self, user: str = "tagway", database: str | None = "tagway", password: str | None = None) -> str:
        pw = self.state["users"][user] if password is None else password
        return f"http://{user}:{pw}@127.0.0.1:{self.port}/{database or ''}"

    def start(self) -> "ChdbClickHouse":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": root}
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.fake_clickhouse", "--port", str(self.port),
                                       "--path", self.path, "--state", json.dumps(self.state)],
                                      cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self._proc.poll() is not None:
                raise RuntimeError(f"ChdbClickHouse exited: {self._proc.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "ChdbClickHouse did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def _control(self, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + "/_shim", data=json.dumps(body or {}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def set(self, **changes) -> None:
        self.state.update(changes)
        self._control({"set": changes})

    def stats(self) -> dict:
        return self._control()["stats"]

    def __enter__(self) -> "ChdbClickHouse":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server:
    """The server process of ChdbClickHouse: one chDB session, statements one at a time."""

    def __init__(self, path: str, state: dict) -> None:
        import chdb.session  # noqa: PLC0415 - only in the server's own process

        self.sess = chdb.session.Session(path)
        self.state = state
        self.lock = threading.Lock()
        self.defaults = {name: value for name, value in self._rows("SELECT name, value FROM system.settings")}
        self.counts: dict[str, int] = {}

    def _rows(self, sql: str) -> list:
        return json.loads(bytes(self.sess.query(sql, "JSONCompact").bytes()))["data"]

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def refusal(self, user: str, sql: str, database: str) -> str | None:
        """ClickHouse's answer to a statement this user may not run (checked before anything else, IF NOT EXISTS
        included), or None."""
        m = _DDL.match(sql)
        if m and user not in self.state["ddl"]:
            self.count(f"{user}:ddl_refused")
            what = " ".join(w for w in (m.group(1).upper(), (m.group(4) or "TABLE").upper()) if w)
            on = "*.*" if "DATABASE" in what else f"{database}.*"
            return (f"Code: 497. DB::Exception: {user}: Not enough privileges. To execute this query, it's necessary "
                    f"to have the grant {what} ON {on}. (ACCESS_DENIED) (version 25.8.1.1 (official build))")
        if m:
            self.count(f"{user}:ddl")
        if _INSERT.match(sql):
            if self.state["insert"] is not None and user not in self.state["insert"]:
                self.count(f"{user}:insert_refused")
                return (f"Code: 497. DB::Exception: {user}: Not enough privileges. To execute this query, it's "
                        f"necessary to have the grant INSERT ON {database}.*. (ACCESS_DENIED) (version 25.8.1.1 "
                        "(official build))")
            self.count(f"{user}:insert")
        return None

    def run(self, sql: str, database: str, settings: dict, fmt: str, params: dict) -> bytes:
        if self.state["old"] and "readonly" in sql and "system.settings" in sql:
            raise RuntimeError("Code: 47, e.displayText() = DB::Exception: Unknown identifier: readonly, e.what() = "
                               "DB::Exception")
        if self.state["version"] or self.state["old"]:
            sql = re.sub(r"\bversion\(\)", "'" + (self.state["version"] or "18.16.1") + "'", sql)
        with self.lock:
            applied = []
            try:
                self.sess.query(f"USE `{database}`")
                for k, v in settings.items():
                    if k in self.defaults:  # what this engine does not know is left out, as a server of another
                        self.sess.query(f"SET {k} = {_quote(v)}")  # version would refuse it
                        applied.append(k)
                res = self.sess.query(sql, fmt, params=params or None)
                return bytes(res.bytes()) if res is not None else b""
            finally:
                for k in applied:
                    try:
                        self.sess.query(f"SET {k} = {_quote(self.defaults[k])}")
                    except Exception:  # noqa: BLE001
                        pass

    async def handle(self, request: web.Request) -> web.Response:
        import asyncio  # noqa: PLC0415

        if request.path.rstrip("/") == "/ping":
            return web.Response(text="Ok.\n")
        if request.path == "/_shim":
            body = await request.json()
            self.state.update(body.get("set", {}))
            return web.json_response({"stats": self.counts, "state": self.state})
        q = dict(request.query)
        user, pw = q.get("user", "default"), q.get("password", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
        if "X-ClickHouse-User" in request.headers:
            user, pw = request.headers["X-ClickHouse-User"], request.headers.get("X-ClickHouse-Key", "")
        if self.state["users"].get(user) != pw:
            self.count(f"{user}:auth_refused")
            return _error(516, f"Code: 516. DB::Exception: {user}: Authentication failed: password is incorrect, or "
                               "there is no user with such name. (AUTHENTICATION_FAILED) (version 25.8.1.1 (official "
                               "build))")
        body = await request.read()
        if body and request.headers.get("Content-Encoding"):
            body = _decode(body, request.headers["Content-Encoding"])
        sql = q["query"] + ("\n" + body.decode() if body else "") if "query" in q else body.decode()
        database = q.get("database") or "default"
        refused = self.refusal(user, sql, database)
        if refused:
            return _error(497, refused)
        fmt = q.get("default_format", "TabSeparated")
        params = {k[6:]: v for k, v in q.items() if k.startswith("param_")}
        settings = {k: v for k, v in q.items() if k not in _RESERVED and not k.startswith("param_")}
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, self.run, sql, database, settings, fmt,
                                                                    params)
        except Exception as e:  # noqa: BLE001 - the engine's error, as the server says it
            msg = str(e).strip()
            m = _CODE.search(msg)
            return _error(int(m.group(1)) if m else 1002, msg if m else f"Code: 1002. DB::Exception: {msg}")
        return web.Response(body=data, headers={
            "X-ClickHouse-Query-Id": q.get("query_id") or str(uuid.uuid4()), "X-ClickHouse-Timezone": "UTC",
            "X-ClickHouse-Format": fmt, "X-ClickHouse-Summary": json.dumps({"read_rows": "0", "written_rows": "0"}),
            "Content-Type": "text/plain; charset=UTF-8"})


def _quote(v: object) -> str:
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "lz4":
        import lz4.frame  # noqa: PLC0415

        return lz4.frame.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding}")


def _error(code: int, message: str) -> web.Response:
    return web.Response(status=_STATUS.get(code, 500), text=message + "\n",
                        headers={"X-ClickHouse-Exception-Code": str(code)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--state", required=True)
    a = ap.parse_args()
    server = _Server(a.path, json.loads(a.state))
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", server.handle)
    web.run_app(app, host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
