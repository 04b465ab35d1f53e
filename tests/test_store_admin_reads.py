"""The admin key on the loopback store API (`/admin/store/*`) reads the store and nothing else: it used to run any
statement, so `SELECT file('/etc/...')` read the gateway host's files and url()/remote() made it a network client.
Against the real `tagway serve` (embedded store); the local credential (the CLIs') keeps its statements."""
from __future__ import annotations

import socket
import threading

import httpx
import pytest

from exporters import discovery
from exporters.store import StoreError
from gateway.auth import hash_key
from gateway.store_api import _LOCAL_TABLE_FUNCTIONS, admin_read_refusal
from tests.gateway_process import GatewayProcess

ADMIN = "tw-storeadmin-admin-0123456789abcdefghijk"
SECRET = "host-secret-4b1d9e"


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it (and closes each at once)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storeadmin")
    (tmp / "secret.csv").write_text(f"{SECRET},x\n1,2\n")
    config = {"admin_key_hash": hash_key(ADMIN), "models": [{"name": "echo", "provider": "mock"}]}
    listener = Listener()
    with GatewayProcess(tmp, config) as g:
        g.secret, g.listener, g.tmp = str(tmp / "secret.csv"), listener, tmp
        yield g
    listener.sock.close()


def post(gw, op: str, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(f"{gw.url}/admin/store/{op}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def refused(r: httpx.Response, code: str = "statement_not_allowed") -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] in ("invalid_request_error", code), error
    assert SECRET not in r.text
    return error["message"]


@pytest.mark.parametrize("sql, name", [
    ("SELECT file('{f}')", "file"),
    ("SELECT * FROM file('{f}', 'LineAsString')", "file"),
    ("select * from FiLe('{f}', 'LineAsString')", "FiLe"),
    ("SELECT * FROM `fi\\x6ce`('{f}', 'LineAsString')", "file"),  # an escape in a quoted name
    ('SELECT * FROM "file" /* a /* nested */ comment */ (\'{f}\', \'LineAsString\')', "file"),
    ("SELECT 1 -- a comment\nUNION ALL SELECT length(file('{f}'))", "file"),
    ("DESCRIBE file('{f}', 'CSVWithNames')", "file"),  # schema inference names the columns from the first line
    ("WITH x AS (SELECT * FROM file('{f}', 'LineAsString')) SELECT * FROM x", "file"),
    ("SELECT * FROM url('http://127.0.0.1:{port}/x', 'LineAsString')", "url"),
    ("SELECT * FROM remote('127.0.0.1:{port}', system.one)", "remote"),
    ("SELECT * FROM mysql('127.0.0.1:{port}', 'db', 't', 'u', 'p')", "mysql"),
    ("SELECT * FROM s3('http://127.0.0.1:{port}/bucket/x.csv', 'CSV', 'a String')", "s3"),
    ("SELECT * FROM executable('cat {f}', 'LineAsString', 'x String')", "executable"),
])
def test_the_admin_key_cannot_read_host_files_or_reach_the_network(gw, sql, name):
    r = post(gw, "query", {"sql": sql.format(f=gw.secret, port=gw.listener.port)})
    assert refused(r).startswith(f"{name}() is not allowed with the admin key"), r.text
    assert gw.listener.connections == 0


def test_the_admin_key_cannot_write_a_file_or_step_around_the_check(gw):
    out = gw.tmp / "written.txt"
    assert "INTO OUTFILE" in refused(post(gw, "query", {"sql": f"SELECT 1 INTO OUTFILE '{out}'"}))
    assert not out.exists()
    # a second statement after the first (chDB runs them all), settings that would turn on what readonly keeps off
    # (eval() runs a string as a query), statements that change the pooled session or stop others' statements
    r = post(gw, "query", {"sql": f"SELECT 1; SELECT file('{gw.secret}')"})
    assert "Multi-statements are not allowed" in refused(r, "store_error")
    r = post(gw, "query", {"sql": "SELECT 1", "settings": {"allow_experimental_eval_table_function": 1}})
    assert "take no settings" in refused(r)
    for sql in ("USE system", "KILL QUERY WHERE 1", "SET max_threads = 64"):
        assert "The admin key reads the store" in refused(post(gw, "query", {"sql": sql})), sql
    # commands and inserts take the local credential: the admin key's never ran
    for op, body in (("command", {"sql": "CREATE TABLE pwned (x String) ENGINE = Memory"}),
                     ("insert?table=llm_calls", {"not": "used"})):
        r = post(gw, op, body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "local_credential_required", r.text
    assert gw.query("EXISTS TABLE pwned", ADMIN) == [{"result": 0}]


def test_admin_reads_and_the_clis_credential_still_work(gw):
    assert gw.query("SELECT {n:UInt8} + 1 AS n, 'file(x) INTO OUTFILE' AS s", ADMIN, n=1) == \
        [{"n": 2, "s": "file(x) INTO OUTFILE"}]  # the names inside a string are data
    assert {"table": "llm_calls"} in [{"table": r["name"]} for r in gw.query("SHOW TABLES", ADMIN)]
    assert gw.query("SELECT count() AS n FROM numbers(10)", ADMIN) == [{"n": 10}]
    ann = discovery.read(str(gw.tmp / "data" / "clickhouse"))
    r = post(gw, "command", {"sql": "CREATE TABLE IF NOT EXISTS local_ok (x UInt8) ENGINE = Memory"}, ann.credential)
    assert r.status_code == 200, r.text
    assert gw.query("EXISTS TABLE local_ok", ADMIN) == [{"result": 1}]
    cli = gw.cli("stats", "--since", "1h", "--json")
    assert cli.returncode == 0, cli.stderr


def test_every_table_function_the_engine_has_is_refused_unless_it_stays_in_the_store(chdb_store):
    """The table functions come from the engine's own list (a server's may have ones chDB lacks: arrowFlight, hive):
    each is refused unless it is known to stay inside the store."""
    names = [r[0] for r in chdb_store.query_rows("SELECT name FROM system.table_functions")[0]]
    assert "file" in names and "numbers" in names
    for name in names:
        for args in ("'x'", "SELECT 1", "SELECT 1 ELSE null('x UInt8')"):  # view() and its kind take a query
            try:
                why = admin_read_refusal(chdb_store, f"SELECT * FROM {name}({args})")
                break
            except StoreError:
                continue
        else:
            raise AssertionError(f"{name}: no statement the engine parses")
        if name.lower() in _LOCAL_TABLE_FUNCTIONS:
            assert why is None, (name, why)
        else:
            assert why and why.startswith(f"{name}() is not allowed with the admin key"), (name, why)
    assert admin_read_refusal(chdb_store, "SELECT count() FROM numbers(3)") is None
