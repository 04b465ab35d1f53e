"""Tenants share the provider account behind the gateway, so the files, batches, responses and stored completions
one tenant creates were any other tenant's to read, list and delete (security trial: globex read, then deleted,
acme's uploaded file, and continued acme's response). With `api.tenant_resources: isolated`, the default, a tenant
key may not reach what another customer created through the gateway, and lists only its own; ownership comes from
the record, so it holds after a restart. Real gateway recording into chDB, the test upstream, the openai SDK."""
from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.gateway_fixture import ADMIN_KEY, KEYS, UPSTREAM_KEY, recorded_gateway


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def refused(call, param: str = "id") -> dict:
    with pytest.raises(openai.NotFoundError) as e:
        call()
    err = e.value.response.json()["error"]
    assert (err["code"], err["param"]) == ("resource_not_found", param), err
    return err


@pytest.fixture()
def gateways(upstream, chdb_store, tmp_path):
    """A recording gateway, and a way to start another on the same store (a restart: nothing in memory)."""
    star = [{"name": "*", "provider": "openai", "base_url": upstream.base_url, "api_key_env": "TEST_UPSTREAM_KEY"}]
    return lambda name: recorded_gateway(upstream, chdb_store, str(tmp_path / name), models=star)


def test_a_tenant_reaches_and_lists_only_its_own_files_and_responses(gateways, upstream):
    acme, globex, platform = KEYS["acme"], KEYS["globex"], KEYS["platform"]
    with gateways("spool-1") as gw:
        mine = sdk(gw, acme).files.create(file=("a.jsonl", b'{"secret": 1}\n', "application/jsonl"), purpose="batch")
        theirs = sdk(gw, globex).files.create(file=("g.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
        upstream.clear()
        refused(lambda: sdk(gw, globex).files.retrieve(mine.id))
        refused(lambda: sdk(gw, globex).files.content(mine.id))
        refused(lambda: sdk(gw, globex).files.delete(mine.id))
        err = refused(lambda: sdk(gw, globex).batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions",
                                                               completion_window="24h"), "input_file_id")
        assert mine.id in err["message"]
        assert upstream.requests == [], "nothing of another tenant's reaches the provider"
        assert sdk(gw, acme).files.retrieve(mine.id).id == mine.id
        assert sdk(gw, platform).files.retrieve(mine.id).id == mine.id  # platform and admin keys reach everything
        # lists: the account's files, each tenant's page filtered to its own
        assert [f.id for f in sdk(gw, acme).files.list()] == [mine.id]
        assert [f.id for f in sdk(gw, globex).files.list()] == [theirs.id]
        every = [f.id for f in sdk(gw, platform).files.list()]
        assert {mine.id, theirs.id, "listed-1"} <= set(every)
        # the hot path: another tenant's response can be neither continued nor read
        r = sdk(gw, acme).responses.create(model="gpt-test", input="remember: the code is 7")
        refused(lambda: sdk(gw, globex).responses.create(model="gpt-test", input="and the code?",
                                                         previous_response_id=r.id), "previous_response_id")
        refused(lambda: sdk(gw, globex).responses.retrieve(r.id))
        follow = sdk(gw, acme).responses.create(model="gpt-test", input="and the code?", previous_response_id=r.id)
        assert follow.id != r.id
        assert sdk(gw, acme).responses.retrieve(r.id).id == r.id
        assert gw.recorder.force_flush()
    # a restart knows nothing in memory: the record says whose each id is
    with gateways("spool-2") as gw:
        assert sdk(gw, acme).files.retrieve(mine.id).id == mine.id
        refused(lambda: sdk(gw, globex).files.retrieve(mine.id))
        # an id nobody created here (a file uploaded straight to the provider) is no tenant's: refused too
        refused(lambda: sdk(gw, acme).files.retrieve("file-direct-1"))
        assert sdk(gw, platform).files.retrieve("file-direct-1").id == "file-direct-1"
        assert sdk(gw, acme).responses.retrieve(r.id).id == r.id
        refused(lambda: sdk(gw, globex).responses.retrieve(r.id))


def test_shared_resources_are_the_accounts_as_before(upstream, chdb_store, tmp_path, monkeypatch):
    """`api.tenant_resources: shared`: any key reaches any id, as the provider account's own keys do."""
    import os  # noqa: PLC0415

    from gateway.app import TagwayApp  # noqa: PLC0415
    from gateway.config import GatewayConfig  # noqa: PLC0415
    from tests.gateway_fixture import GatewayServer, MemoryRecorder, gateway_config  # noqa: PLC0415

    os.environ["TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    cfg = gateway_config(upstream.base_url, api={"tenant_resources": "shared"})
    cfg["models"] = [*cfg["models"], {"name": "*", "provider": "openai", "base_url": upstream.base_url,
                                      "api_key_env": "TEST_UPSTREAM_KEY"}]
    server = GatewayServer(TagwayApp(GatewayConfig(**cfg), recorder=MemoryRecorder())).start()
    try:
        f = sdk(server, KEYS["acme"]).files.create(file=("a.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
        assert sdk(server, KEYS["globex"]).files.retrieve(f.id).id == f.id
    finally:
        server.stop()


def test_every_way_a_body_names_another_tenants_resource_is_refused(gateways, upstream):
    """Review of the first version: a key written with a JSON escape (`previous\\u005fresponse_id`) passed the
    byte pre-check; file ids in tools (code interpreter), in prompt variables and in the JSON form of images.edits
    were never looked at. A citation in a model's own output (re-sent by a stateless loop) is no request."""
    acme, globex = KEYS["acme"], KEYS["globex"]
    with gateways("spool-refs") as gw:
        f = sdk(gw, acme).files.create(file=("a.jsonl", b"{}\n", "application/jsonl"), purpose="user_data").id
        r = sdk(gw, acme).responses.create(model="gpt-test", input="mine").id
        h = {"authorization": f"Bearer {globex}", "content-type": "application/json"}

        def post(path: str, raw: bytes) -> httpx.Response:
            return httpx.post(gw.url + path, content=raw, headers=h, timeout=10)

        bodies = [
            ("/v1/responses", b'{"model": "gpt-test", "input": "x", "previous\\u005fresponse_id": "%s"}' % r.encode()),
            ("/v1/responses", orjson.dumps({"model": "gpt-test", "input": "x", "tools": [
                {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [f]}}]})),
            ("/v1/responses", orjson.dumps({"model": "gpt-test", "input": "x", "prompt": {
                "id": "pmpt_1", "variables": {"doc": {"type": "input_file", "file_id": f}}}})),
            ("/v1/responses", b'{"model": "gpt-test", "input": [{"role": "user", "content": [{"type": '
                              b'"input_file", "file\\u005fid": "%s"}]}]}' % f.encode()),
            ("/v1/images/edits", orjson.dumps({"model": "gpt-image-1", "prompt": "x", "images": [{"file_id": f}]})),
            ("/v1/chat/completions", orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": [
                {"type": "file", "file": {"file_id": f}}]}]})),
        ]
        upstream.clear()
        for path, raw in bodies:
            got = post(path, raw)
            assert got.status_code == 404 and got.json()["error"]["code"] == "resource_not_found", (path, got.text)
        # a batch's input file: each line a request the provider runs, and whose output globex could read
        line = {"custom_id": "1", "method": "POST", "url": "/v1/responses",
                "body": {"model": "gpt-test", "input": "x", "previous_response_id": r}}
        with pytest.raises(openai.NotFoundError) as e:
            sdk(gw, globex).files.create(file=("in.jsonl", orjson.dumps(line) + b"\n", "application/jsonl"),
                                         purpose="batch")
        assert e.value.response.json()["error"]["param"] == "previous_response_id"
        assert upstream.requests == []
        theirs = sdk(gw, globex).responses.create(model="gpt-test", input="globex's").id
        own = {**line, "body": {**line["body"], "previous_response_id": theirs}}
        assert sdk(gw, globex).files.create(file=("in.jsonl", orjson.dumps(own) + b"\r\n", "application/jsonl"),
                                            purpose="batch").id
        # a bare CR inside a line is JSON whitespace, not a line break (the first version split there and skipped
        # both halves); a line that is not one JSON object is refused, not skipped; so is a transfer-encoded part
        split = orjson.dumps(line).replace(b',"body"', b',\r"body"') + b"\n"
        with pytest.raises(openai.NotFoundError) as e:
            sdk(gw, globex).files.create(file=("in.jsonl", split, "application/jsonl"), purpose="batch")
        assert e.value.response.json()["error"]["param"] == "previous_response_id"
        with pytest.raises(openai.BadRequestError) as e:
            sdk(gw, globex).files.create(file=("in.jsonl", orjson.dumps(line)[:-1] + b"\n", "application/jsonl"),
                                         purpose="batch")
        assert e.value.response.json()["error"]["code"] == "invalid_batch_input"
        b64 = (b"--b\r\ncontent-disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n"
               b"content-disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
               b"content-transfer-encoding: base64\r\n\r\n" + __import__("base64").b64encode(orjson.dumps(line))
               + b"\r\n--b--\r\n")
        sent = httpx.post(gw.url + "/v1/files", content=b64, headers={
            "authorization": f"Bearer {globex}", "content-type": "multipart/form-data; boundary=b"})
        assert sent.status_code == 400 and sent.json()["error"]["code"] == "invalid_upload", sent.text
        # the model's own citations, re-sent: not a request for the file they cite
        cited = orjson.dumps({"model": "gpt-test", "input": [
            {"role": "assistant", "content": [{"type": "output_text", "text": "see",
                                               "annotations": [{"type": "file_citation", "file_id": f}]}]},
            {"role": "user", "content": "and?"}]})
        assert post("/v1/responses", cited).status_code == 200
        # a tenant key does not delete the account's models; too many ids in one body is a clear 400
        gone = httpx.delete(gw.url + "/v1/models/ft:gpt-4o:acme:x:1", headers=h)
        assert gone.status_code == 403 and gone.json()["error"]["param"] == "model"
        many = orjson.dumps({"model": "gpt-test", "input": "x", "tools": [
            {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [f"file-{i}" for i in range(65)]}}]})
        assert post("/v1/responses", many).json()["error"]["code"] == "too_many_resource_ids"
        # the same id named 65 times is one resource; a model's own tool call re-sent is no request
        g_file = sdk(gw, globex).files.create(file=("g.txt", b"g", "text/plain"), purpose="user_data").id
        again = orjson.dumps({"model": "gpt-test", "input": "x", "tools": [
            {"type": "code_interpreter", "container": {"type": "auto", "file_ids": [g_file] * 65}}]})
        assert post("/v1/responses", again).status_code == 200
        # what the admin key made with no customer is nobody's: no tenant key's
        admin_file = sdk(gw, ADMIN_KEY).files.create(file=("x.jsonl", b"{}\n", "application/jsonl"),
                                                     purpose="batch").id
        refused(lambda: sdk(gw, globex).files.retrieve(admin_file))
        assert sdk(gw, ADMIN_KEY).files.retrieve(admin_file).id == admin_file


def test_a_tenants_list_reads_past_other_tenants_pages(gateways, upstream):
    """Filtered lists left a page of other tenants' items empty, and the SDKs stop paging at an empty page: a tenant
    saw none of its files once a page's worth of newer foreign ones existed (review). The gateway reads on, up to 5
    upstream pages, for the tenant's own; the SDK's paging then walks them all."""
    acme, globex = KEYS["acme"], KEYS["globex"]
    with gateways("spool-pages") as gw:
        theirs = [sdk(gw, globex).files.create(file=("g.jsonl", b"{}\n", "application/jsonl"), purpose="batch").id
                  for _ in range(5)]
        mine = sdk(gw, acme).files.create(file=("a.jsonl", b"{}\n", "application/jsonl"), purpose="batch").id
        seen = [f.id for f in sdk(gw, acme).files.list(limit=2)]  # the SDK pages on while has_more
        assert mine in seen and not set(theirs) & set(seen), seen
        page = sdk(gw, globex).files.list(limit=2)
        assert len(page.data) == 2 and mine not in {x.id for x in page.data}


def test_requests_naming_ids_a_key_may_not_use_count_against_its_rate(upstream, chdb_store, tmp_path):
    """The owner check runs after the key's limits: a stream of requests naming ids the tenant may not use costs the
    record a lookup each, so each counts as a request (it was free of the key's rpm: a review)."""
    from gateway.auth import hash_key  # noqa: PLC0415

    key = "tw-rate-probe-0123456789abcdefghijklmnop"
    tenants = [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(KEYS["acme"])}]},
               {"customer": "prober", "limits": {"rpm": 3}, "keys": [{"id": "p-1", "hash": hash_key(key)}]}]
    with recorded_gateway(upstream, chdb_store, str(tmp_path / "spool-rate"), config={"tenants": tenants}) as gw:
        theirs = sdk(gw, KEYS["acme"]).responses.create(model="gpt-test", input="mine").id
        probe = sdk(gw, key)
        for _ in range(3):
            refused(lambda: probe.responses.create(model="gpt-test", input="x", previous_response_id=theirs),
                    "previous_response_id")
        with pytest.raises(openai.RateLimitError):
            probe.responses.create(model="gpt-test", input="x", previous_response_id=theirs)
