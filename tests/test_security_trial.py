"""A hostile tenant against the real gateway (uvicorn on 127.0.0.1, the real openai SDK, raw sockets): what one key,
or no key at all, can make the gateway hold or do for everyone else."""
from __future__ import annotations

import socket
import threading
import time
import uuid

import httpx
import openai
import orjson
import pytest

from tests.gateway_fixture import ADMIN_KEY, KEYS

MSG = [{"role": "user", "content": "hi"}]
HUGE = 100 * 1024 * 1024  # announced, never sent


def _partial_post(url: str, path: str, key: str | None, *, chunked: bool = False, timeout: float = 5.0) -> bytes:
    """POST `path` announcing a HUGE body (by Content-Length, or chunked without an end) and sending only 256 KiB of
    it, then read the answer: a route that waits for the whole body before answering never answers."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    head += [f"Authorization: Bearer {key}"] if key else []
    head += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {HUGE}"]
    piece = b'{"target": "' + b"x" * (256 * 1024)
    if chunked:
        piece = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + piece)
        try:
            return s.recv(4096)
        except socket.timeout:
            return b"(no answer: the route waits for the rest of the body)"


def _status(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


@pytest.mark.parametrize("path", ["/admin/tags", "/v1/tagway/tags", "/admin/datasets/anything/labels"])
def test_a_caller_without_a_key_gets_401_before_its_body_is_read(gateway, path):
    # the body used to be read whole (and parsed) before the key was looked at: a caller with no key at all could
    # make the gateway hold any number of bytes
    assert " 401 " in _status(_partial_post(gateway.url, path, None)), path
    r = httpx.post(gateway.url + path, content=b"{not json")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


@pytest.mark.parametrize("path,key", [("/v1/tagway/tags", KEYS["acme"]), ("/admin/tags", ADMIN_KEY),
                                      ("/admin/datasets/anything/labels", ADMIN_KEY),
                                      ("/v1/tagway/feedback", KEYS["acme"])])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_refused_as_it_arrives(gateway, path, key, chunked):
    answer = _partial_post(gateway.url, path, key, chunked=chunked)
    assert " 413 " in _status(answer), (path, answer[:300])
    assert b"body_too_large" in answer


def test_tag_bodies_still_say_what_is_wrong(gateway):
    h = {"authorization": f"Bearer {KEYS['acme']}"}
    r = httpx.post(gateway.url + "/v1/tagway/tags", json={"target": "abc"}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("tag: ")
    r = httpx.post(gateway.url + "/v1/tagway/tags", json={"target": "abc", "tag": "x", "who": 1}, headers=h)
    assert r.status_code == 400 and "who" in r.json()["error"]["message"]
    r = httpx.post(gateway.url + "/admin/tags", json={"target": "abc", "tag": "x"}, headers=h)
    assert r.status_code == 403  # a tenant key on the admin route: refused before the body matters
    spec = httpx.get(gateway.url + "/openapi.json").json()
    body = spec["paths"]["/v1/tagway/tags"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert set(body["properties"]) == {"target", "tag"}


def test_a_tags_header_of_many_entries_is_refused_before_it_is_read(gateway):
    # 100,000 entries naming one tag were all read (about 0.1 s of the event loop, every tenant's calls waiting,
    # and read again to record the call) and answered 200; 300,000 different ones held it for seconds per request
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEYS["acme"], max_retries=0)
    for header in (",".join(["team=a"] * 100_000), ",".join(f"k{i}=v" for i in range(300_000))):
        t0 = time.perf_counter()
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="gpt-test", messages=MSG, extra_headers={"x-tagway-tags": header})
        assert e.value.code == "too_many_tags" and "entries" in e.value.message
        assert time.perf_counter() - t0 < 5
    # what a client really sends still works: up to 64 tags, repeated keys and empty entries included
    ok = ",".join(f"k{i}=v" for i in range(64)) + ",k0=w,,"
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG,
                                                           extra_headers={"x-tagway-tags": ok})
    tags = {k: v for k, v in gateway.recorder.call(raw.headers["x-tagway-trace-id"]).attributes.items()
            if k.startswith("tagway.tag.")}
    assert len(tags) == 64 and tags["tagway.tag.k0"] == "w"


def test_feedback_per_segment_reads_the_configured_database(chdb_store):
    """With storage.database set, stats filtered by applied_tag counted complaints against the tag tables of the
    client's default database (another deployment's, or none): the wrong calls' feedback, silently."""
    from exporters import queries as q
    from exporters import tagstate as ts
    from exporters.feedback import insert_feedback
    from exporters.schema import SchemaSettings, migrate
    from tests.calls_seed import call_row

    db = "sectrial"
    migrate(chdb_store, SchemaSettings(database=db))
    run = "st" + uuid.uuid4().hex[:10]
    rows = [call_row(run, f"{run}-c", i) for i in range(2)]
    chdb_store.insert_json_rows(f"{db}.llm_calls", b"\n".join(orjson.dumps(r) for r in rows),
                                settings={"date_time_input_format": "best_effort"})
    flagged, other = rows[0]["trace_id"], rows[1]["trace_id"]
    ts.human_change(chdb_store, ts.Target(ts.MESSAGE, flagged), "flagged", "apply", "human:t", f"{run}-c",
                    database=db)
    insert_feedback(chdb_store, [{"Timestamp": time.time(), "feedback_id": uuid.uuid4().hex[:16], "trace_id": t,
                                  "customer": f"{run}-c", "score": None, "thumbs": "down", "complaint": True,
                                  "comment": "", "source": "app", "key_id": "k", "by_admin": False}
                                 for t in (flagged, other)], db)
    sel = q.make_selection([f"tag.run={run}", "applied_tag=flagged"], since="2h")
    report = q.segment_stats(chdb_store, sel, ("customer",), min_calls=0, database=db)
    assert [(s.calls, s.complaints) for s in report.segments] == [(1, 1)]
    assert report.total.complaints == 1
    # the coverage map's production counts had the same default-database join (review)
    from exporters.coverage import production_counts
    assert production_counts(chdb_store, sel, db) == {"calls": 1, "errors": 0, "complaints": 1}


def test_no_key_can_take_the_admin_keys_id(upstream, tmp_path, caplog):
    """Calls are recorded with their key's id and a platform key reads the calls recorded with its own: a platform
    key given the id `admin` read every call the admin key made, for every customer, content included."""
    from gateway.app import TagwayApp
    from gateway.auth import KeysFileError, add_key_to_file, hash_key, read_keys
    from gateway.config import GatewayConfig
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config

    ops_key = "tw-test-ops-admin-id-0123456789abcdefghij"
    cfg = gateway_config(upstream.base_url)
    cfg["tenants"] = [*cfg["tenants"], {"customer": "ops", "may_set_customer": True,
                                        "keys": [{"id": "admin", "hash": hash_key(ops_key)}]}]
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=MemoryRecorder())).start()
    try:
        r = httpx.get(server.url + "/v1/tagway/whoami", headers={"authorization": f"Bearer {ops_key}"})
        assert r.status_code == 401, r.text  # was 200 {"key_id": "admin", "may_mark_replay": true}
        r = httpx.get(server.url + "/v1/tagway/whoami", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert r.json()["admin"] is True and r.json()["key_id"] == "admin"
    finally:
        server.stop()
    assert "tenants[4].keys[0]: key 'admin' is not used" in caplog.text
    # the keys file: `tagway keys create --id admin` is refused, and so is such an entry written by hand
    keys_file = str(tmp_path / "tagway.keys.yaml")
    for bad in ("admin", "  "):
        with pytest.raises(ValueError, match="admin key's id|blank"):
            add_key_to_file(keys_file, "platform", bad)
    with open(keys_file, "w") as f:
        f.write(f'- {{id: admin, customer: platform, hash: "{hash_key(ops_key)}"}}\n')
    with pytest.raises(KeysFileError, match="key #1: id: 'admin' is the admin key's id"):
        read_keys(GatewayConfig(**{**cfg, "keys_file": keys_file}))


def test_a_huge_user_field_is_not_redacted_whole_on_the_event_loop(upstream):
    """A key that may set its customer names it with the body's `user` unless redaction changes it; the whole `user`
    was redacted on the event loop to find out: 7 MB of e-mail addresses held every call (and /healthz) for ~5 s."""
    from exporters import semconv as sc
    from gateway.app import TagwayApp
    from gateway.config import GatewayConfig
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config

    recorder = MemoryRecorder()
    cfg = gateway_config(upstream.base_url, server={"max_body_bytes": 16 * 1024 * 1024})
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=recorder)).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["platform"], max_retries=0, timeout=60)
        waits: list[float] = []
        done = threading.Event()

        def ping() -> None:  # how long another caller waits while the big call is worked on
            with httpx.Client(base_url=server.url, timeout=30) as h:
                while not done.is_set():
                    t0 = time.perf_counter()
                    h.get("/healthz")
                    waits.append(time.perf_counter() - t0)
                    time.sleep(0.005)

        pinger = threading.Thread(target=ping)
        pinger.start()
        try:  # the test upstream refuses a body this big (413): the gateway's own work is what is timed
            client.chat.completions.create(model="gpt-test", messages=MSG, user="jane@example.com " * 400_000)
        except openai.APIStatusError:
            pass
        finally:
            done.set()
            pinger.join()
        assert max(waits) < 1.0, max(waits)  # was ~2.5-5 s
        # what `user` says is still read as before
        for user, customer in (("Globex", "globex"), ("jane@example.com", "platform"),
                               ("jane@example.com " + "x" * 5000, "platform")):
            raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=MSG, user=user)
            assert recorder.call(raw.headers["x-tagway-trace-id"]).attributes[sc.CUSTOMER] == customer, user
    finally:
        server.stop()


def test_a_key_that_may_not_mark_replays_cannot_hold_the_replay_lane(upstream):
    """The replay lane (server.replay_concurrency slots) was entered on the `x-tagway-source: replay` header alone,
    before the key was checked: a tenant whose key may not mark replays held every slot with requests whose bodies
    never finish, and the replay runner's calls waited behind them. Such a request now bypasses the lane (and is
    refused, 403, once its body is in)."""
    import socket

    from gateway.app import TagwayApp
    from gateway.config import GatewayConfig
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config

    cfg = gateway_config(upstream.base_url)
    cfg["server"] = {**cfg["server"], "replay_concurrency": 1}
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=MemoryRecorder())).start()
    stalls = []
    try:
        for _ in range(3):  # a tenant's replay-marked requests, their bodies never finished
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"authorization: Bearer " + KEYS["acme"].encode() + b"\r\nx-tagway-source: replay\r\n"
                      b"content-length: 1000\r\n\r\n{\"model\": ")
            stalls.append(s)
        time.sleep(0.3)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=5,
                       json={"model": "gpt-test", "messages": [{"role": "user", "content": "replayed"}]},
                       headers={"authorization": f"Bearer {KEYS['platform']}", "x-tagway-source": "replay",
                                "x-tagway-customer": "acme"})
        assert r.status_code == 200, r.text  # the old code: a ReadTimeout, the lane's slot held by acme
    finally:
        for s in stalls:
            s.close()
        server.stop()
