"""Bad and stale discovery state (issue 17): one clear line and the right exit code, never a traceback; the store API
refuses strangers and tenant keys before any statement runs; values survive the wire with their Python types."""
from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import uuid
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
import typer
from aiohttp import web
from typer.testing import CliRunner

from exporters import discovery
from exporters.store import StoreLockedError
from exporters.store_access import open_store
from exporters.remote_store import decode_params, decode_rows, encode_params, encode_rows
from gateway import stats_cli
from gateway.app import TagwayApp
from gateway.config import GatewayConfig
from replay.cli import replay_app
from tests.gateway_fixture import ADMIN_KEY, KEYS, MemoryRecorder, gateway_config
from tests.http_server import ThreadedServer


def _stats_app() -> typer.Typer:
    app = typer.Typer()
    stats_cli.register(app)
    return app


def _store_dir(tmp_path) -> str:
    d = tmp_path / "data" / "clickhouse"
    d.mkdir(parents=True)
    return str(d.resolve())


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("TAGWAY_DSN", "TAGWAY_CONFIG", "TAGWAY_VERBOSE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("content, says", [
    (b"{not json", "not JSON"),
    (b'{"hello": "world"}', "is not a tagway gateway discovery file"),
    (b'{"kind": "tagway-gateway", "version": 99}', "another tagway version"),
    (b'{"kind": "tagway-gateway", "version": 1, "pid": "x"}', "damaged"),
])
def test_a_corrupt_or_foreign_discovery_file_is_one_line_naming_it(tmp_path, content, says):
    d = _store_dir(tmp_path)
    path = discovery.discovery_path(d)
    with open(path, "wb") as f:
        f.write(content)
    for app, argv in ((_stats_app(), ["stats", "--dsn", f"chdb://{d}"]),
                      (replay_app, ["report", "some-run", "--dsn", f"chdb://{d}"])):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and path in lines[0] and says in lines[0], lines
        assert "Traceback" not in res.output


def test_a_discovery_file_for_another_store_is_refused(tmp_path):
    d = _store_dir(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    discovery.announce(str(other), "http://127.0.0.1:9")
    shutil.copy(discovery.discovery_path(str(other)), discovery.discovery_path(d))
    res = CliRunner().invoke(_stats_app(), ["stats", "--dsn", f"chdb://{d}"])
    assert res.exit_code == 2 and "announces a gateway for another store" in res.stderr


@pytest.mark.parametrize("url", ["http://10.255.1.2:4713", "http://example.com:4000", "http://[2001:db8::1]:4000"])
def test_a_discovery_file_naming_another_host_is_refused(tmp_path, url):
    """The CLI sends the local credential to the announced address: one that is not this machine's (a tampered
    file) is a damaged file, named in one line, and nothing is sent."""
    d = _store_dir(tmp_path)
    discovery.announce(d, url, pid=os.getpid())
    res = CliRunner().invoke(_stats_app(), ["stats", "--dsn", f"chdb://{d}"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and discovery.discovery_path(d) in lines[0] and "not an address of this host" in lines[0]


def test_a_dead_gateways_file_naming_an_address_gone_since_is_stale(tmp_path):
    """A gateway killed on an address this host no longer has (a DHCP or VPN change): its file is stale like any
    dead gateway's, not damaged. The command says the gateway is gone, opens the store directly and answers, the
    file is removed, and nothing is sent to the address. (Subprocesses: a store of its own, one chDB path a
    process.)"""
    d = _store_dir(tmp_path)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cli = [sys.executable, "-m", "gateway.cli"]
    subprocess.run([*cli, "db", "migrate", "--dsn", f"chdb://{d}"], check=True, capture_output=True, timeout=120,
                   env=env)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    discovery.announce(d, "http://10.255.1.2:4713", pid=dead.pid)
    assert discovery.read(d).url == "http://10.255.1.2:4713"  # returned as it is, for the caller to find it dead
    r = subprocess.run([*cli, "stats", "--dsn", f"chdb://{d}", "--by", "customer"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "10.255.1.2" in lines[0], lines
    assert "is gone (process not running); opening the store directly" in lines[0]
    assert not os.path.exists(discovery.discovery_path(d))


def _ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_a_gateway_on_a_local_address_is_announced_as_this_host(tmp_path):
    d = _store_dir(tmp_path)
    for url in ("http://127.0.0.1:4000", "http://127.0.0.5:4000") + (("http://[::1]:4000",) if _ipv6() else ()):
        discovery.announce(d, url, pid=os.getpid())
        assert discovery.read(d).url == url


@pytest.mark.parametrize("argv", [["dataset", "list"], ["coverage", "--by", "customer"], ["replay", "report", "r1"],
                                  ["db", "rollup-tags"], ["tags", "audit", "0123456789abcdef" * 2], ["stats"]])
def test_a_command_on_a_store_that_is_not_there_creates_none(tmp_path, argv):
    """Only `tagway db migrate` (and the gateway) create an embedded store: any other command on a missing one (the
    config not named, a mistyped --dsn) says so in one line and leaves nothing behind, rather than answering from an
    empty store it made in the wrong place."""
    from click.testing import CliRunner as ClickRunner

    from gateway.cli import command
    app = command()  # the `tagway` command with every plugin (replay, dataset, ...) registered
    where = tmp_path / "nowhere" / "clickhouse"
    res = ClickRunner().invoke(app, [*argv, "--dsn", f"chdb://{where}"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no tagway store at {where}" in lines[0] and "db migrate" in lines[0], lines
    assert not where.exists() and "Traceback" not in res.output  # `db migrate` creates it: tests/test_dsn.py


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_user_who_cannot_read_the_credential_gets_a_permission_error(tmp_path):
    """Root reads everything, so the CLI runs as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: for a 0600 file
    owned by another user that is exactly what a different user sees."""
    d = _store_dir(tmp_path)
    ann = discovery.announce(d, "http://127.0.0.1:9", pid=os.getpid())
    os.chown(ann.path, 65534, 65534)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                        "gateway.cli", "stats", "--dsn", f"chdb://{d}"], capture_output=True, text=True, timeout=60,
                       env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "permission denied" in lines[0] and ann.path in lines[0] and "401" not in lines[0]


class VanishingGateway(ThreadedServer):
    """Answers the ping as the announced gateway, then drops the connection in the middle of every statement:
    what a CLI sees when the gateway stops (or is killed) while it queries."""

    def __init__(self, instance: str) -> None:
        super().__init__()
        self.instance = instance

    def routes(self, app: web.Application) -> None:
        async def ping(request: web.Request) -> web.Response:
            return web.json_response({"instance": self.instance, "pid": os.getpid()})

        async def vanish(request: web.Request) -> web.Response:
            await request.read()
            request.transport.close()
            return web.Response()

        app.router.add_get("/admin/store/ping", ping)
        app.router.add_post("/admin/store/{op}", vanish)


def test_the_gateway_stopping_mid_query_is_one_line_and_exit_3(tmp_path):
    d = _store_dir(tmp_path)
    server = VanishingGateway("")
    with server:
        ann = discovery.announce(d, server.url, pid=os.getpid())
        server.instance = ann.instance
        for app, argv in ((_stats_app(), ["stats", "--dsn", f"chdb://{d}"]),
                          (_stats_app(), ["show", "0af7651916cd43dd8448eb211c80319c", "--dsn", f"chdb://{d}"]),
                          (replay_app, ["report", "some-run", "--dsn", f"chdb://{d}"])):
            res = CliRunner().invoke(app, argv)
            assert res.exit_code == 3, res.output
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "stopped before it answered" in lines[0], lines
            assert "Traceback" not in res.output
        # replay says how to finish the run it was on (and names none when no run had started)
        spec = tmp_path / "spec.yaml"
        spec.write_text("slice: {customer: [acme], since: 1h}\ncandidates: [{name: c, model: m}]\n"
                        "evaluators: [{type: contains, value: ok}]\n")
        for argv, finish in ((["run", "--spec", str(spec), "--run-id", "gone-run"], ""),
                             (["resume", "gone-run"], ": `tagway replay resume gone-run` finishes the run")):
            res = CliRunner().invoke(replay_app, [*argv, "--dsn", f"chdb://{d}", "--gateway", server.url,
                                                  "--api-key", "k", "--no-progress"])
            assert res.exit_code == 3, res.output
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].endswith(f"what was stored is kept{finish}"), lines

class SilentGateway(ThreadedServer):
    """A gateway that is there but sends nothing (stopped with SIGSTOP, stuck): on its ping (`stuck_at="ping"`) or
    mid-statement (`"query"`), after which it answers a ping as itself."""

    def __init__(self, instance: str, stuck_at: str) -> None:
        super().__init__()
        self.instance, self.stuck_at = instance, stuck_at
        self.released: asyncio.Event | None = None  # set when the server stops: the silent requests end then

    def routes(self, app: web.Application) -> None:
        self.released = asyncio.Event()

        async def silent(request: web.Request) -> web.Response:
            await request.read()
            try:  # silent until the server stops, well past the silence the test allows (at most 30 s: no hang)
                await asyncio.wait_for(self.released.wait(), 30)
            except asyncio.TimeoutError:
                pass
            return web.Response()

        async def ping(request: web.Request) -> web.Response:
            if self.stuck_at == "ping":
                return await silent(request)
            return web.json_response({"instance": self.instance, "pid": os.getpid()})

        app.router.add_get("/admin/store/ping", ping)
        app.router.add_post("/admin/store/{op}", silent)

    def stop(self) -> None:
        if self._loop and self.released:
            self._loop.call_soon_threadsafe(self.released.set)
        super().stop()


@pytest.mark.parametrize("stuck_at, says", [("ping", "sent nothing for 1 s"), ("query", "sent nothing for 2 s")])
def test_a_gateway_that_is_there_but_silent_is_one_line_and_exit_3(tmp_path, monkeypatch, stuck_at, says):
    """Its process lives and holds the store's lock, so waiting for the lock would be in vain (it waited 13 s, then
    said the gateway 'has not announced itself'); a statement that gets no byte, not even the gateway's heartbeat
    spaces, for the silence interval is given up on (it hung for up to 600 s)."""
    import fcntl
    import time

    from exporters import remote_store

    monkeypatch.setattr(remote_store, "IDENTIFY_SECONDS", 1.0)
    monkeypatch.setattr(remote_store, "SILENCE_SECONDS", 2.0)
    d = _store_dir(tmp_path)
    server = SilentGateway("", stuck_at)
    with server:
        ann = discovery.announce(d, server.url, pid=os.getpid())
        server.instance = ann.instance
        fd = os.open(os.path.join(d, "tagway.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held, as the gateway's process holds it
        try:
            t0 = time.monotonic()
            res = CliRunner().invoke(_stats_app(), ["stats", "--dsn", f"chdb://{d}"])
            took = time.monotonic() - t0
            others = []
            if stuck_at == "ping":  # silent before anything ran: no "what was stored is kept", no "partly applied"
                from gateway.cli import app as tagway_app
                others = [CliRunner().invoke(replay_app, ["report", "some-run", "--dsn", f"chdb://{d}"]),
                          CliRunner().invoke(tagway_app, ["db", "migrate", "--dsn", f"chdb://{d}"])]
        finally:
            os.close(fd)
    assert res.exit_code == 3, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and f"pid {os.getpid()}" in lines[0], lines
    assert "Traceback" not in res.output and took < 8, took
    for other in others:
        lines = other.stderr.strip().splitlines()
        assert other.exit_code == 3 and len(lines) == 1 and says in lines[0], other.output
        assert "kept" not in lines[0] and "partly" not in lines[0], lines


def test_a_refusal_sent_inside_a_long_statements_stream_is_a_store_error(tmp_path):
    """A statement that outlasts the heartbeat interval answers 200 and streams spaces; if ClickHouse then refuses
    it, the error object follows the spaces: the command says ClickHouse's message, as on the direct path."""
    from exporters.remote_store import RemoteStore
    from exporters.store import StoreError

    class StreamingGateway(ThreadedServer):
        def routes(self, app: web.Application) -> None:
            async def query(request: web.Request) -> web.StreamResponse:
                await request.read()
                resp = web.StreamResponse(status=200, headers={"content-type": "application/json"})
                await resp.prepare(request)
                await resp.write(b"   ")
                await resp.write(orjson.dumps({"error": {"message": "Code: 395. DB::Exception: six rows",
                                                         "type": "store_error", "code": "store_error"}}))
                await resp.write_eof()
                return resp

            app.router.add_post("/admin/store/query", query)

    d = _store_dir(tmp_path)
    with StreamingGateway() as server:
        ann = discovery.announce(d, server.url, pid=os.getpid())
        with RemoteStore(f"chdb://{d}", ann) as store, pytest.raises(StoreError) as e:
            store.query_rows("SELECT 1")
    assert str(e.value) == "Code: 395. DB::Exception: six rows" and type(e.value) is StoreError


def test_a_port_now_used_by_someone_else_makes_the_file_stale(tmp_path):
    """The announced pid is alive (ours) but the port answers with another identity: the store would be opened
    directly; here another holder of the lock keeps it (and no new announcement comes), so the reason is said once
    and the lock error follows."""
    import fcntl

    d = _store_dir(tmp_path)
    server = VanishingGateway("someone-else")
    with server:
        discovery.announce(d, server.url, pid=os.getpid())
        fd = os.open(os.path.join(d, "tagway.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines: list[str] = []
        try:
            with pytest.raises(StoreLockedError) as e:
                open_store(f"chdb://{d}", lock_wait=0.3, say=lines.append)
        finally:
            os.close(fd)
    assert "in use by another process" in str(e.value)
    assert len(lines) == 1 and "does not answer as the gateway" in lines[0], lines  # no "opening directly" here


def test_a_gateway_that_refuses_while_its_process_lives_is_said_to_be_stopping_before_the_wait(tmp_path):
    """During a SIGTERM drain the gateway's process lives but no longer accepts connections: a command said nothing
    while it waited for the store, then called the file stale (an on-call trial). It says at once that the gateway
    is stopping and how long it waits; here another holder keeps the lock, so the lock error follows."""
    import fcntl

    from tests.http_server import free_port

    d = _store_dir(tmp_path)
    discovery.announce(d, f"http://127.0.0.1:{free_port()}", pid=os.getpid())  # alive, and nothing listens there
    fd = os.open(os.path.join(d, "tagway.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    lines: list[str] = []
    try:
        with pytest.raises(StoreLockedError):
            open_store(f"chdb://{d}", lock_wait=0.3, say=lines.append)
    finally:
        os.close(fd)
    assert len(lines) == 1 and lines[0].endswith("refused the connection: it is stopping; waiting up to 0.3 s for it "
                                                 "to release the store"), lines
    assert "stale" not in lines[0]


# -- the store API's guard (the in-process app: no store is touched) ---------------------------------------------
@pytest.fixture()
def app(upstream):
    return TagwayApp(GatewayConfig.model_validate(gateway_config(upstream.base_url)), recorder=MemoryRecorder())


async def _post(app, path, client=("127.0.0.1", 5555), **kw):
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:4000") as h:
        return await h.post(path, **kw)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_store_api_refuses_strangers_and_tenant_keys(app, anyio_backend):
    app.local.announcement = ann = discovery.Announcement(1, "http://127.0.0.1:4000", 0.0, "cred-" + "x" * 40,
                                                          "inst", "/nowhere")
    body = {"json": {"sql": "SELECT 1"}}
    # from another host, even with the credential: the route does not exist
    r = await _post(app, "/admin/store/query", client=("10.1.2.3", 5555),
                    headers={"authorization": f"Bearer {ann.credential}"}, **body)
    assert r.status_code == 404
    r = await _post(app, "/admin/store/query", **body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "local_credential_required"
    r = await _post(app, "/admin/store/query", headers={"authorization": "Bearer tw-not-a-key"}, **body)
    assert r.status_code == 401
    r = await _post(app, "/admin/store/query", headers={"authorization": f"Bearer {KEYS['acme']}"}, **body)
    assert r.status_code == 403 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    # the credential and the admin key pass the guard (then: no store in this app, so 503)
    for key in (ann.credential, ADMIN_KEY):
        r = await _post(app, "/admin/store/query", headers={"authorization": f"Bearer {key}"}, **body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"


def test_values_keep_their_python_types_over_the_wire():
    utc, paris = ZoneInfo("UTC"), ZoneInfo("Europe/Paris")
    row = ("text", 1, -(2 ** 63), 2 ** 64 - 1, 2 ** 70, 1.5, float("nan"), float("inf"), True, None,
           dt.datetime(2026, 12, 3, 16, 0, 1, 123456, tzinfo=utc), dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=paris),
           dt.datetime(2026, 1, 2, 3, 4, 5), dt.date(2026, 12, 3), decimal.Decimal("12.3400"), uuid.uuid4(),
           b"\x00\xff", ipaddress.ip_address("10.0.0.1"), ["a", "b"], ("x", 2), {"k": "v", "$dt": "not a tag"},
           {1: [1.0, 2.0]}, [{"nested": (1, dt.date(2026, 1, 1))}], dt.timedelta(seconds=3.5))
    back = decode_rows(orjson.loads(orjson.dumps(encode_rows([row]))))[0]
    assert len(back) == len(row)
    for a, b in zip(row, back):
        if isinstance(a, float) and a != a:
            assert b != b
            continue
        assert a == b and type(a) is type(b), (a, b)
        if isinstance(a, dt.datetime):
            assert a.tzinfo == b.tzinfo
    params = {"run_id": "r1", "since": dt.datetime(2026, 1, 1, tzinfo=utc), "ids": ["a", "b"], "n": 5}
    assert decode_params(orjson.loads(orjson.dumps(encode_params(params)))) == params
