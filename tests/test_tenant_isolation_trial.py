"""A tenant (globex) after another's (acme's) provider resources, through the real `tagway serve` (a subprocess on
an embedded store of its own), the real openai SDK and httpx, against an upstream on 127.0.0.1 that behaves as a
provider does: it knows the ids it made and answers any other with its own 404 (or, for a body's id, a 400 naming
it), and reads JSON keys case-insensitively, as Go relays do. Each test fails on the gateway before this trial:

- another tenant's id answered the gateway's 404 `resource_not_found`, a missing one the provider's 404 with its
  headers: a tenant could tell which ids exist for someone else;
- `Previous_Response_Id`, `previouſ_response_id`, `File_Id` passed unchecked (a relay reads them as the real key);
- conversations, vector stores and containers are made where the gateway does not see it, so nobody owned one and
  any tenant key could name any of them;
- a tenant key's `OpenAI-Organization`/`OpenAI-Project` pointed the operator's provider key at another organisation
  or project of the account, and tenants' `Idempotency-Key`s shared the account's one namespace.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from gateway.auth import hash_key
from tests.fake_clickhouse import ChdbClickHouse
from tests.gateway_process import GatewayProcess
from tests.upstream import Upstream

ACME, GLOBEX = "tw-iso-acme-0123456789abcdefghijklmnop", "tw-iso-globex-0123456789abcdefghijklmn"
PLATFORM, ADMIN = "tw-iso-platform-0123456789abcdefghijklm", "tw-iso-admin-0123456789abcdefghijklmnop"


def _fold(d: dict) -> dict:
    """Keys as a Go relay reads them (encoding/json matches field names case-insensitively, ſ as s)."""
    return {k.casefold(): v for k, v in d.items()} if isinstance(d, dict) else d


class ProviderLike(Upstream):
    """Knows what it made; anything else is its own 404 (path) or 400 naming the id (body)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[str] = set()
        self.batches: dict[str, dict] = {}
        self.objects: dict[str, dict] = {}  # conversations and vector stores
        self.parts: dict[tuple[str, str], dict[str, dict]] = {}  # (its id, items|files|file_batches) -> id -> part

    async def resource(self, request: web.Request) -> web.Response:
        rid = request.match_info.get("id")
        raw = await request.read()
        body = _fold(orjson.loads(raw)) if raw else {}
        missing = rid if rid and rid not in self.made else None
        if request.path == "/v1/batches" and body.get("input_file_id") not in self.made:
            missing = body.get("input_file_id")
        after = request.query.get("after")
        if request.method == "GET" and not rid and after and after not in self.made:
            missing = request.query["after"]  # a list's cursor that names nothing
        if missing is None and request.path.startswith("/v1/batches"):
            return await self.batch(request, rid, body)
        if missing is None:
            return await super().resource(request)
        self.requests.append({"path": request.path, "method": request.method, "headers": dict(request.headers),
                              "body": body, "raw": raw})
        status = 404 if rid else 400
        return web.json_response({"error": {"message": f"No such object: '{missing}'", "param": "id" if rid else
                                            "input_file_id", "type": "invalid_request_error", "code": None}},
                                 status=status)

    def routes(self, app: web.Application) -> None:
        super().routes(app)
        app.router.add_get("/v1/batches", self.resource)
        for kind, subs in (("conversations", ("items",)), ("vector_stores", ("files", "file_batches"))):
            base = f"/v1/{kind}"
            app.router.add_post(base, self.stores)
            app.router.add_get(base, self.stores)
            for path in (base + "/{id}", base + "/{id}/search", *(f"{base}/{{id}}/{sub}" for sub in subs),
                         *(f"{base}/{{id}}/{sub}/{{part}}" for sub in subs),
                         *(f"{base}/{{id}}/{sub}/{{part}}/{{more}}" for sub in subs)):
                for method in ("GET", "POST", "DELETE"):
                    app.router.add_route(method, path, self.stores)

    async def stores(self, request: web.Request) -> web.Response:
        """Conversations and vector stores as the provider keeps them, with their items, files and file batches;
        an id it did not make is its 404."""
        raw = await request.read()
        body = orjson.loads(raw) if raw else {}
        self.requests.append({"path": request.path, "method": request.method, "headers": dict(request.headers),
                              "body": body, "query": request.query_string})
        kind, *rest = request.path.split("/")[2:]
        conv = kind == "conversations"
        if not rest and request.method == "GET":  # the account's vector stores (conversations have no list)
            data = [o for o in reversed(self.objects.values()) if o["object"] == "vector_store"]
            return web.json_response({"object": "list", "data": data, "has_more": False,
                                      "first_id": data[0]["id"] if data else None,
                                      "last_id": data[-1]["id"] if data else None})
        if not rest:
            oid = f"{'conv' if conv else 'vs'}_{len(self.objects) + 1}"
            self.objects[oid] = {"id": oid, "object": "conversation" if conv else "vector_store",
                                 "created_at": 1700000000, "metadata": body.get("metadata") or {},
                                 **({} if conv else {"name": body.get("name"), "status": "completed",
                                                     "usage_bytes": 0, "file_counts": {}})}
            self.made.add(oid)
            for item in body.get("items") or []:
                self._part(oid, "items", item)
            for fid in body.get("file_ids") or []:
                self._part(oid, "files", {"id": fid})
            return web.json_response(self.objects[oid])
        oid = rest[0]
        if oid not in self.objects:
            return self._missing(oid)
        if len(rest) == 1:
            if request.method == "DELETE":
                del self.objects[oid]
                return web.json_response({"id": oid, "object": f"{'conversation' if conv else 'vector_store'}.deleted",
                                          "deleted": True})
            if request.method == "POST":
                self.objects[oid].update({k: v for k, v in body.items() if k in ("metadata", "name")})
            return web.json_response(self.objects[oid])
        sub = rest[1]
        if sub == "search":
            return web.json_response({"object": "vector_store.search_results.page", "search_query": [body["query"]],
                                      "data": [], "has_more": False, "next_page": None})
        parts = self.parts.setdefault((oid, sub), {})
        if len(rest) == 2 and request.method == "GET":
            data = list(parts.values())
            return web.json_response({"object": "list", "data": data, "has_more": False,
                                      "first_id": data[0]["id"] if data else None,
                                      "last_id": data[-1]["id"] if data else None})
        if len(rest) == 2:
            if sub == "items":
                made = [self._part(oid, sub, item) for item in body["items"]]
                return web.json_response({"object": "list", "data": made, "has_more": False,
                                          "first_id": made[0]["id"], "last_id": made[-1]["id"]})
            if sub == "files":
                if body["file_id"] not in self.made:  # a file the provider no longer has (deleted, expired)
                    return self._missing(body["file_id"])
                return web.json_response(self._part(oid, sub, {"id": body["file_id"]}))
            for fid in body.get("file_ids") or []:
                self._part(oid, "files", {"id": fid})
            return web.json_response(self._part(oid, sub, {"id": f"vsfb_{len(self.made)}",
                                                            "file_ids": body.get("file_ids") or []}))
        pid = rest[2]
        if pid not in parts:
            return self._missing(pid)
        if len(rest) == 4 and rest[3] == "content":
            return web.json_response({"object": "vector_store.file_content.page", "has_more": False,
                                      "next_page": None, "data": [{"type": "text", "text": "the handbook"}]})
        if len(rest) == 4 and rest[3] == "cancel":
            parts[pid]["status"] = "cancelled"
            return web.json_response(parts[pid])
        if len(rest) == 4:  # a file batch's files
            data = [self.parts[(oid, "files")][f] for f in parts[pid]["file_ids"]]
            return web.json_response({"object": "list", "data": data, "has_more": False})
        if request.method == "DELETE":
            del parts[pid]
            return web.json_response(self.objects[oid] if conv else {"id": pid, "deleted": True,
                                                                       "object": "vector_store.file.deleted"})
        if request.method == "POST":
            parts[pid]["attributes"] = body.get("attributes")
        return web.json_response(parts[pid])

    def _part(self, oid: str, sub: str, obj: dict) -> dict:
        if sub == "items":
            obj = {**obj, "id": f"msg_{len(self.made)}", "status": "completed"}
        else:
            obj = {**obj, "object": "vector_store.file" if sub == "files" else "vector_store.files_batch",
                   "vector_store_id": oid, "status": "completed", "created_at": 1700000000}
        self.made.add(obj["id"])
        self.parts.setdefault((oid, sub), {})[obj["id"]] = obj
        return obj

    @staticmethod
    def _missing(rid: str) -> web.Response:
        return web.json_response({"error": {"message": f"No such object: '{rid}'", "param": None,
                                            "type": "invalid_request_error", "code": None}}, status=404)

    async def batch(self, request: web.Request, rid: str | None, body: dict) -> web.Response:
        """Batches as the provider keeps them: made from an uploaded input file, and finished at once, with an
        output and an error file of the provider's making (named only in the batch object)."""
        self.requests.append({"path": request.path, "method": request.method, "headers": dict(request.headers),
                              "body": body, "query": request.query_string})
        if rid is None and request.method == "GET":  # the account's batches, newest first
            data = [self.batches[b] for b in reversed(self.batches)]
            return web.json_response({"object": "list", "data": data, "has_more": False,
                                      "first_id": data[0]["id"] if data else None,
                                      "last_id": data[-1]["id"] if data else None})
        if rid is None:
            n = len(self.batches) + 1
            rid = f"batch_{n}"
            self.batches[rid] = {"id": rid, "object": "batch", "endpoint": body.get("endpoint"),
                                 "input_file_id": body["input_file_id"], "completion_window": "24h",
                                 "created_at": 1700000000, "status": "validating", "output_file_id": None,
                                 "error_file_id": None}
            self.made.update({rid, f"file-out-{n}", f"file-err-{n}"})
            answer = dict(self.batches[rid])
            self.batches[rid].update(status="completed", output_file_id=f"file-out-{n}",
                                     error_file_id=f"file-err-{n}")
            return web.json_response(answer)
        if request.path.endswith("/cancel"):
            self.batches[rid]["status"] = "cancelling"
        return web.json_response(self.batches[rid])

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        rid = request.match_info["id"]
        if rid not in self.made:
            self.requests.append({"path": request.path, "method": "GET", "headers": dict(request.headers)})
            return web.json_response({"error": {"message": f"No such object: '{rid}'", "param": "id",
                                                "type": "invalid_request_error", "code": None}}, status=404)
        return await super().file_content(request)

    async def upload(self, request: web.Request) -> web.Response:
        answer = await super().upload(request)
        self.made.add(f"file-up-{self.uploads}")
        return answer

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = _fold(orjson.loads(await request.read()))
        prev = body.get("previous_response_id")
        conv = body.get("conversation")
        conv = conv.get("id") if isinstance(conv, dict) else conv
        stores = [v for t in body.get("tools") or [] for v in t.get("vector_store_ids") or []]
        for rid in [conv] * bool(conv) + stores:
            if rid not in self.made:
                self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
                return web.json_response({"error": {"message": f"No such object: '{rid}'", "param": None,
                                                    "type": "invalid_request_error", "code": None}}, status=404)
        if prev is not None and prev not in self.made:
            self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
            return web.json_response({"error": {
                "message": f"Previous response with id '{prev}' not found.", "type": "invalid_request_error",
                "param": "previous_response_id", "code": "previous_response_not_found"}}, status=400)
        answer = await super().responses(request)
        self.made.add(f"resp_{len(self.requests)}")
        return answer


@pytest.fixture(scope="module")
def provider():
    up = ProviderLike().start()
    yield up
    up.stop()


def _config(provider) -> dict:
    model = {"provider": "openai", "base_url": provider.base_url, "api_key_env": "ISO_UPSTREAM_KEY"}
    return {"models": [{"name": "gpt-test", "model": "ok-model", **model}, {"name": "*", **model}],
            "tenants": [{"customer": "acme", "keys": [{"id": "acme-1", "hash": hash_key(ACME)}],
                         "resources": ["file-granted-acme"]},  # made outside the gateway, given to acme
                        {"customer": "globex", "keys": [{"id": "globex-1", "hash": hash_key(GLOBEX)}]},
                        {"customer": "platform", "may_set_customer": True,
                         "keys": [{"id": "platform-1", "hash": hash_key(PLATFORM)}]}],
            "admin_key_hash": hash_key(ADMIN)}


_ENV = {"ISO_UPSTREAM_KEY": "sk-iso-upstream-key"}


@pytest.fixture(scope="module")
def gw(provider, tmp_path_factory):
    with GatewayProcess(tmp_path_factory.mktemp("iso"), _config(provider), env=_ENV) as g:
        yield g


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def not_found(call) -> tuple[dict, list[str]]:
    """The 404's error body, its id aside, and the names of its headers but for the per-call ones."""
    with pytest.raises(openai.NotFoundError) as e:
        call()
    err = dict(e.value.response.json()["error"])
    err["message"] = err["message"].replace(err["message"].split(": ", 1)[-1], "<id>")
    return err, sorted(h for h in e.value.response.headers if h not in ("date", "content-length"))


def test_another_tenants_id_and_a_missing_one_get_the_same_404(gw, provider):
    file_id = sdk(gw, ACME).files.create(file=("a.jsonl", b'{"secret": 1}\n', "application/jsonl"),
                                         purpose="batch").id
    resp_id = sdk(gw, ACME).responses.create(model="gpt-test", input="the code is 7").id
    g = sdk(gw, GLOBEX)
    pairs = [  # (another tenant's, nobody's): each pair must be answered alike
        (lambda: g.files.retrieve(file_id), lambda: g.files.retrieve("file-none")),
        (lambda: g.files.content(file_id), lambda: g.files.content("file-none")),
        (lambda: g.files.delete(file_id), lambda: g.files.delete("file-none")),
        (lambda: g.files.retrieve(file_id), lambda: g.files.retrieve(file_id.upper())),  # a case variant too
        (lambda: g.responses.retrieve(resp_id), lambda: g.responses.retrieve("resp_none")),
        (lambda: g.responses.delete(resp_id), lambda: g.responses.delete("resp_none")),
        (lambda: g.responses.create(model="gpt-test", input="and?", previous_response_id=resp_id),
         lambda: g.responses.create(model="gpt-test", input="and?", previous_response_id="resp_none")),
        (lambda: g.files.list(after=file_id), lambda: g.files.list(after="file-none")),  # a list's cursor
        (lambda: g.batches.create(input_file_id=file_id, endpoint="/v1/responses", completion_window="24h"),
         lambda: g.batches.create(input_file_id="file-none", endpoint="/v1/responses", completion_window="24h")),
    ]
    for theirs, missing in pairs:
        a, b = not_found(theirs), not_found(missing)
        assert a == b, (a, b)
        assert a[0]["code"] == "resource_not_found" and "x-request-id" not in a[1], a
    # the owner still reaches its own; the provider's other answers are relayed as before
    assert sdk(gw, ACME).files.retrieve(file_id).id == file_id
    sdk(gw, ACME).files.list(after=file_id)  # its own cursor passes
    # a list inside its own resource pages by the ids of its parts, which nobody owns: they pass
    assert sdk(gw, ACME).responses.input_items.list(resp_id, after="msg_1").data
    assert sdk(gw, ACME).responses.create(model="gpt-test", input="and?", previous_response_id=resp_id).id
    with pytest.raises(openai.BadRequestError) as e:  # an admin key's miss is the provider's answer, as it was
        sdk(gw, ADMIN).responses.create(model="gpt-test", input="and?", previous_response_id="resp_none")
    assert e.value.response.json()["error"]["code"] == "previous_response_not_found"


def test_keys_an_upstream_reads_case_insensitively_are_checked(gw, provider):
    file_id = sdk(gw, ACME).files.create(file=("a.jsonl", b"{}\n", "application/jsonl"), purpose="user_data").id
    resp_id = sdk(gw, ACME).responses.create(model="gpt-test", input="mine").id
    g = sdk(gw, GLOBEX)
    provider.clear()
    spellings = [{"Previous_Response_Id": resp_id}, {"PREVIOUS_RESPONSE_ID": resp_id},
                 {"previou\u017f_response_id": resp_id},  # a long s: Go's case folding reads it as s
                 {"input": [{"role": "user", "content": [{"type": "input_file", "File_Id": file_id}]}]}]
    for extra in spellings:
        with pytest.raises(openai.NotFoundError) as e:
            g.responses.create(model="gpt-test", input="x", extra_body=extra)
        assert e.value.response.json()["error"]["code"] == "resource_not_found", extra
    line = {"custom_id": "1", "method": "POST", "url": "/v1/responses",
            "body": {"model": "gpt-test", "input": "x", "Previous_Response_ID": resp_id}}
    with pytest.raises(openai.NotFoundError):
        g.files.create(file=("in.jsonl", orjson.dumps(line) + b"\n", "application/jsonl"), purpose="batch")
    assert provider.requests == [], "none of them reached the provider"
    # acme's own, spelled any way, still passes
    assert sdk(gw, ACME).responses.create(model="gpt-test", input="x", extra_body={"Previous_Response_Id": resp_id}).id


def test_resources_made_out_of_the_gateways_sight_are_no_tenants(gw, provider):
    """Conversations, vector stores and containers: the gateway never sees one made, so no tenant owns one."""
    g = sdk(gw, GLOBEX)
    provider.clear()
    asks = [({"conversation": "conv_acme1"}, "conversation"), ({"conversation": {"id": "conv_acme1"}}, "conversation"),
            ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_acme1"]}]}, "vector_store_ids"),
            ({"tools": [{"type": "code_interpreter", "container": "cntr_acme1"}]}, "container")]
    shapes = set()
    for extra, param in asks:
        with pytest.raises(openai.NotFoundError) as e:
            g.responses.create(model="gpt-test", input="x", extra_body=extra)
        err = e.value.response.json()["error"]
        assert (err["code"], err["param"]) == ("resource_not_found", param), err
        shapes.add(err["type"])
    assert provider.requests == [] and shapes == {"invalid_request_error"}
    # a container the provider makes for the call is fine; a platform key reaches the account's resources
    assert g.responses.create(model="gpt-test", input="x", tools=[{"type": "code_interpreter",
                                                                    "container": {"type": "auto"}}]).id
    provider.made.add("conv_p")  # made straight at the provider
    assert sdk(gw, PLATFORM).responses.create(model="gpt-test", input="x", extra_body={"conversation": "conv_p"}).id


def test_account_headers_stay_behind_and_idempotency_keys_are_the_tenants(gw, provider):
    def sent(key: str, path: str = "/v1/responses") -> dict:
        headers = {"OpenAI-Organization": "org-other", "OpenAI-Project": "proj_other", "Idempotency-Key": "order-42"}
        provider.clear()
        if path == "/v1/responses":
            sdk(gw, key).responses.create(model="gpt-test", input="x", extra_headers=headers)
        else:
            r = httpx.post(gw.url + "/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"},
                           headers={"Authorization": f"Bearer {key}", **headers})
            assert r.status_code == 200, r.text
        return {k.lower(): v for k, v in provider.requests[-1]["headers"].items()}

    for path in ("/v1/responses", "/v1/files"):
        a, again, b, p = sent(ACME, path), sent(ACME, path), sent(GLOBEX, path), sent(PLATFORM, path)
        assert "openai-organization" not in a and "openai-project" not in a, a
        assert (p["openai-organization"], p["openai-project"]) == ("org-other", "proj_other")
        keys = [h["idempotency-key"] for h in (a, again, b, p)]
        assert all(k.endswith("-order-42") for k in keys), keys
        assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3, keys  # one namespace per tenant
        assert not any(name in k for k in keys for name in ("acme", "globex", "platform"))  # names no tenant


def test_every_spelling_and_kind_of_reference_is_found():
    """What the hot path checks: a walk of the parsed body (JSON escapes already resolved), keys case-folded."""
    from gateway.resources import referenced_ids  # noqa: PLC0415

    body = {"model": "m", "Input": [{"role": "user", "content": [{"type": "input_file", "FILE_ID": "f1"}]}],
            "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]},
                      {"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f2"]}}],
            "metadata": {"conversation": "not-a-request"}, "conversation": {"ID": "conv_1"}}
    assert sorted(referenced_ids(body)) == [("conversation", "conv_1"), ("file_id", "f1"), ("file_ids", "f2"),
                                            ("vector_store_ids", "vs_1")]


_LINE = orjson.dumps({"custom_id": "1", "method": "POST", "url": "/v1/responses",
                      "body": {"model": "gpt-test", "input": "x"}}) + b"\n"


def _batch(client: openai.OpenAI) -> str:
    inp = client.files.create(file=("in.jsonl", _LINE, "application/jsonl"), purpose="batch").id
    b = client.batches.create(input_file_id=inp, endpoint="/v1/responses", completion_window="24h")
    assert b.output_file_id is None  # the provider makes them as the batch runs
    return b.id


def _refused_files(client: openai.OpenAI, *ids: str) -> None:
    for fid in ids:
        for call in (lambda: client.files.content(fid), lambda: client.files.retrieve(fid)):
            err, _ = not_found(call)
            assert err["code"] == "resource_not_found", err


def test_a_batchs_output_and_error_files_are_its_owners(gw, provider):
    """A batch's output and error files are the provider's making, named only in the batch object: nobody owned
    them, so any tenant key that learnt the id read another tenant's batch results (security trial). They are the
    owner's once a batch object naming them is relayed to it: retrieved, listed or cancelled."""
    a, g = sdk(gw, ACME), sdk(gw, GLOBEX)
    done = a.batches.retrieve(_batch(a))
    listed_id, cancelled_id = _batch(a), _batch(a)
    listed = next(b for b in a.batches.list() if b.id == listed_id)  # learnt from a list only
    cancelled = a.batches.cancel(cancelled_id)
    files = [x for b in (done, listed, cancelled) for x in (b.output_file_id, b.error_file_id)]
    assert all(files) and len(set(files)) == 6, files
    provider.clear()
    _refused_files(g, *files)
    assert provider.requests == [], "another tenant's batch files never reach the provider"
    for fid in files:
        assert a.files.content(fid).read() and a.files.retrieve(fid).id == fid
    assert sdk(gw, PLATFORM).files.retrieve(files[0]).id == files[0]
    assert not [b for b in g.batches.list() if b.id in (done.id, listed_id, cancelled_id)]


def test_a_batchs_files_stay_its_owners_after_a_restart(provider, tmp_path):
    """Recorded, not only remembered: a restarted gateway (nothing in memory) still knows whose they are."""
    gw = GatewayProcess(tmp_path, _config(provider), env=_ENV)
    with gw:
        b = sdk(gw, ACME).batches.retrieve(_batch(sdk(gw, ACME)))
        conv, vs = sdk(gw, ACME).conversations.create().id, sdk(gw, ACME).vector_stores.create(name="kb").id
    with gw:
        _refused_files(sdk(gw, GLOBEX), b.output_file_id, b.error_file_id)
        assert sdk(gw, ACME).files.content(b.output_file_id).read()
        assert sdk(gw, ACME).responses.create(model="gpt-test", input="x", conversation=conv).id
        assert sdk(gw, ACME).vector_stores.retrieve(vs).id == vs
        not_found(lambda: sdk(gw, GLOBEX).conversations.retrieve(conv))
        not_found(lambda: sdk(gw, GLOBEX).vector_stores.retrieve(vs))


def test_ids_no_tenant_owns_are_refused_to_tenant_keys(gw, provider):
    """An id nobody created here passed for any tenant key (security trial): a file uploaded straight to the
    provider, the admin key's own upload and response, anything made before owners were recorded. It now fails
    closed: the same 404 as another tenant's, before the provider is asked; platform and admin keys reach them."""
    provider.made.update({"file-direct", "file-granted-acme"})  # uploaded straight to the provider
    admin_file = sdk(gw, ADMIN).files.create(file=("x.jsonl", _LINE, "application/jsonl"), purpose="batch").id
    admin_resp = sdk(gw, ADMIN).responses.create(model="gpt-test", input="the admin's").id
    acmes = sdk(gw, ACME).files.create(file=("a.jsonl", _LINE, "application/jsonl"), purpose="batch").id
    g = sdk(gw, GLOBEX)
    another = not_found(lambda: g.files.retrieve(acmes))
    provider.clear()
    for key in (ACME, GLOBEX):
        c = sdk(gw, key)
        for fid in ("file-direct", admin_file):
            assert not_found(lambda: c.files.retrieve(fid)) == another
            assert not_found(lambda: c.files.content(fid))[0]["code"] == "resource_not_found"
            assert not_found(lambda: c.batches.create(input_file_id=fid, endpoint="/v1/responses",
                                                      completion_window="24h"))[0]["param"] == "input_file_id"
        err, _ = not_found(lambda: c.responses.create(model="gpt-test", input="and?", previous_response_id=admin_resp))
        assert err["param"] == "previous_response_id"
    assert provider.requests == [], "nothing nobody owns reaches the provider for a tenant key"
    for key in (PLATFORM, ADMIN):
        assert sdk(gw, key).files.retrieve("file-direct").id == "file-direct"
        assert sdk(gw, key).responses.create(model="gpt-test", input="and?", previous_response_id=admin_resp).id
    # what the operator granted a tenant (tenants[].resources) is that tenant's alone
    assert sdk(gw, ACME).files.retrieve("file-granted-acme").id == "file-granted-acme"
    assert not_found(lambda: g.files.retrieve("file-granted-acme")) == another


def test_a_resource_is_granted_to_one_tenant():
    from gateway.config import GatewayConfig  # noqa: PLC0415

    cfg = {"tenants": [{"customer": "acme", "resources": ["file-1"]}, {"customer": "globex", "resources": ["file-1"]}]}
    with pytest.raises(Exception, match="'file-1' is granted to 'acme' too"):
        GatewayConfig(**cfg)


_UNRECORD = """
import sys
from exporters.dsn import embedded_dsn
from exporters.store import connect
st = connect(embedded_dsn(sys.argv[1]))
# the record of a version that did not say whose: no owner attributes on the call spans, no resource_owners rows
st.command("ALTER TABLE otel_traces UPDATE SpanAttributes = mapFilter((k, v) -> k NOT IN "
           "('tagway.creates_resource', 'tagway.owns_resources'), SpanAttributes) WHERE 1 SETTINGS mutations_sync = 2")
st.command("TRUNCATE TABLE resource_owners")
st.command("ALTER TABLE tagway_schema_migrations DELETE WHERE version >= 15 SETTINGS mutations_sync = 2")
"""


def test_an_upgrade_keeps_what_tenants_made_before_owners_were_recorded(provider, tmp_path):
    """A store from before owner tracking has the creating calls but no owners: refusing nobody's ids would take
    their own files and responses from every tenant. The migration fills resource_owners from those calls."""
    gw = GatewayProcess(tmp_path, _config(provider), env=_ENV)
    with gw:
        a = sdk(gw, ACME)
        fid = a.files.create(file=("a.jsonl", _LINE, "application/jsonl"), purpose="batch").id
        rid = a.responses.create(model="gpt-test", input="remember 7").id
        cid = a.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], store=True).id
        provider.made.add(cid)
        unstored = sdk(gw, GLOBEX).responses.create(model="gpt-test", input="x", store=False).id
    done = subprocess.run([sys.executable, "-c", _UNRECORD, str(tmp_path / "data")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert done.returncode == 0, done.stderr
    with gw:  # the upgraded gateway migrates its store as it starts
        a, g = sdk(gw, ACME), sdk(gw, GLOBEX)
        assert a.files.retrieve(fid).id == fid
        assert a.responses.create(model="gpt-test", input="and?", previous_response_id=rid).id
        assert a.chat.completions.retrieve(cid).id == cid
        _refused_files(g, fid)
        not_found(lambda: g.responses.retrieve(rid))
        not_found(lambda: g.chat.completions.retrieve(cid))
        not_found(lambda: g.responses.retrieve(unstored))  # `store: false`: nothing to own


def test_conversations_and_vector_stores_are_carried_and_their_creators(gw, provider):
    """The Conversations and Vector Stores APIs were not carried, so the gateway never saw one made and refused every
    tenant key's `conversation` and `vector_store_ids` (security trial: tenants lost the Responses API's state and
    file_search). Carried, what a tenant creates is its own: it uses, lists and changes it; another tenant's, like
    nobody's, is the 404, in the path or the body, before the provider is asked."""
    a, g = sdk(gw, ACME), sdk(gw, GLOBEX)
    conv = a.conversations.create(items=[{"type": "message", "role": "user", "content": "my code is 7"}],
                                  metadata={"topic": "codes"})
    item = a.conversations.items.list(conv.id).data[0].id
    assert a.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "ok"}]).data
    assert a.conversations.items.retrieve(item, conversation_id=conv.id).id == item
    assert a.conversations.update(conv.id, metadata={"topic": "other"}).metadata == {"topic": "other"}
    assert a.responses.create(model="gpt-test", input="and the code?", conversation=conv.id).id
    assert a.responses.create(model="gpt-test", input="again?", conversation={"id": conv.id}).id
    f1, f2 = (a.files.create(file=(f"{n}.txt", b"handbook", "text/plain"), purpose="assistants").id for n in "ab")
    vs = a.vector_stores.create(name="kb", file_ids=[f1])
    assert a.vector_stores.files.create(vector_store_id=vs.id, file_id=f2).id == f2
    assert {f.id for f in a.vector_stores.files.list(vs.id)} == {f1, f2}
    assert a.vector_stores.files.retrieve(f1, vector_store_id=vs.id).id == f1
    assert a.vector_stores.files.update(f1, vector_store_id=vs.id, attributes={"k": "v"}).attributes == {"k": "v"}
    assert [c.text for c in a.vector_stores.files.content(f1, vector_store_id=vs.id)] == ["the handbook"]
    fb = a.vector_stores.file_batches.create(vs.id, file_ids=[f1])
    assert a.vector_stores.file_batches.retrieve(fb.id, vector_store_id=vs.id).id == fb.id
    assert [f.id for f in a.vector_stores.file_batches.list_files(fb.id, vector_store_id=vs.id)] == [f1]
    a.vector_stores.file_batches.cancel(fb.id, vector_store_id=vs.id)
    assert a.vector_stores.search(vs.id, query="refunds").search_query == ["refunds"]
    assert a.vector_stores.update(vs.id, name="kb2").name == "kb2"
    assert a.responses.create(model="gpt-test", input="x", tools=[{"type": "file_search",
                                                                    "vector_store_ids": [vs.id]}]).id
    theirs = g.vector_stores.create(name="globex kb")
    assert vs.id in [v.id for v in a.vector_stores.list()] and theirs.id not in [v.id for v in a.vector_stores.list()]
    assert [v.id for v in g.vector_stores.list()] == [theirs.id]
    provider.clear()
    pairs = [  # (acme's, nobody's): globex gets the same 404 for each
        (lambda: g.conversations.retrieve(conv.id), lambda: g.conversations.retrieve("conv_none")),
        (lambda: g.conversations.items.list(conv.id), lambda: g.conversations.items.list("conv_none")),
        (lambda: g.conversations.items.retrieve(item, conversation_id=conv.id),
         lambda: g.conversations.items.retrieve(item, conversation_id="conv_none")),
        (lambda: g.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}]),
         lambda: g.conversations.items.create("conv_none", items=[{"type": "message", "role": "user",
                                                                     "content": "x"}])),
        (lambda: g.conversations.delete(conv.id), lambda: g.conversations.delete("conv_none")),
        (lambda: g.responses.create(model="gpt-test", input="the code?", conversation=conv.id),
         lambda: g.responses.create(model="gpt-test", input="the code?", conversation="conv_none")),
        (lambda: g.vector_stores.retrieve(vs.id), lambda: g.vector_stores.retrieve("vs_none")),
        (lambda: g.vector_stores.search(vs.id, query="x"), lambda: g.vector_stores.search("vs_none", query="x")),
        (lambda: g.vector_stores.files.list(vs.id), lambda: g.vector_stores.files.list("vs_none")),
        (lambda: g.vector_stores.files.content(f1, vector_store_id=vs.id),
         lambda: g.vector_stores.files.content(f1, vector_store_id="vs_none")),
        (lambda: g.vector_stores.file_batches.retrieve(fb.id, vector_store_id=vs.id),
         lambda: g.vector_stores.file_batches.retrieve(fb.id, vector_store_id="vs_none")),
        (lambda: g.vector_stores.delete(vs.id), lambda: g.vector_stores.delete("vs_none")),
        (lambda: g.responses.create(model="gpt-test", input="x", tools=[{"type": "file_search",
                                                                         "vector_store_ids": [vs.id]}]),
         lambda: g.responses.create(model="gpt-test", input="x", tools=[{"type": "file_search",
                                                                         "vector_store_ids": ["vs_none"]}])),
        (lambda: g.vector_stores.list(after=vs.id), lambda: g.vector_stores.list(after="vs_none")),
        # acme's files into globex's own store, or a new one
        (lambda: g.vector_stores.files.create(vector_store_id=theirs.id, file_id=f1),
         lambda: g.vector_stores.files.create(vector_store_id=theirs.id, file_id="file-none")),
        (lambda: g.vector_stores.create(name="x", file_ids=[f1]),
         lambda: g.vector_stores.create(name="x", file_ids=["file-none"])),
    ]
    for n, (mine, missing) in enumerate(pairs):
        x, y = not_found(mine), not_found(missing)
        assert x == y and x[0]["code"] == "resource_not_found", (n, x, y)
    assert provider.requests == [], "nothing of acme's reached the provider for globex"
    assert sdk(gw, PLATFORM).conversations.retrieve(conv.id).id == conv.id  # platform and admin keys reach all
    assert sdk(gw, ADMIN).vector_stores.retrieve(vs.id).id == vs.id
    # a part the provider does not have, inside the tenant's own: the gateway's 404 naming the part
    with pytest.raises(openai.NotFoundError) as e:
        a.conversations.items.retrieve("msg_none", conversation_id=conv.id)
    err = e.value.response.json()["error"]
    assert "msg_none" in err["message"] and err["param"] == "item_id", err
    a.conversations.items.delete(item, conversation_id=conv.id)
    a.vector_stores.files.delete(f2, vector_store_id=vs.id)
    assert a.vector_stores.delete(vs.id).deleted and a.conversations.delete(conv.id).deleted


@contextlib.contextmanager
def _two_gateways(provider, tmp_path, database: str, *, batch_seconds: float):
    """Two `tagway serve` processes (workers or replicas) on one ClickHouse server, with this batch window."""
    with ChdbClickHouse(tmp_path / "ch") as ch:
        config = {**_config(provider), "storage": {"dsn": ch.dsn("admin", database)},
                  "recording": {"batch_max_seconds": batch_seconds}}
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with GatewayProcess(tmp_path / "a", config, env=_ENV) as a, \
                GatewayProcess(tmp_path / "b", config, env=_ENV) as b:
            yield a, b


def test_an_id_another_gateway_made_a_moment_ago_is_found_before_the_refusal(provider, tmp_path):
    """Two gateways (or workers) on one ClickHouse server: an id one made is known to the other once its call is
    stored, a batch window later. Refusing nobody's ids at once refused the tenant its own fresh file there; the
    other gateway looks again for recording.batch_max_seconds + 1 s first. Another tenant's is refused after as long
    (an immediate refusal told it from a missing one by timing)."""
    with _two_gateways(provider, tmp_path, "tw_settle", batch_seconds=2.0) as (a, b):
        fid = sdk(a, ACME).files.create(file=("a.jsonl", _LINE, "application/jsonl"), purpose="batch").id
        assert sdk(b, ACME).files.retrieve(fid).id == fid  # found within the window (its length: below)
        t = time.monotonic()
        theirs = not_found(lambda: sdk(b, GLOBEX).files.retrieve(fid))
        theirs_took = time.monotonic() - t
        t = time.monotonic()
        missing = not_found(lambda: sdk(b, ACME).files.retrieve("file-nobodys"))
        missing_took = time.monotonic() - t
        assert theirs[0]["code"] == missing[0]["code"] == "resource_not_found"
        # refused once the window (2 + 1 s) has passed, another tenant's as a missing one: not told by timing
        assert 2.5 < theirs_took < 10 and 2.5 < missing_took < 10, (theirs_took, missing_took)


def test_a_missing_file_added_to_a_tenants_own_vector_store_is_named_as_the_file(gw, provider):
    """The provider's 404 names the body's file, not the tenant's own vector store in the path (a review: the gateway
    answered 'No such resource: vs_...', sending the tenant to look for the wrong thing)."""
    a = sdk(gw, ACME)
    fid = a.files.create(file=("h.txt", b"the handbook", "text/plain"), purpose="assistants").id
    vs = a.vector_stores.create(name="kb")
    provider.made.discard(fid)  # the provider no longer has it (deleted there, or expired)
    with pytest.raises(openai.NotFoundError) as e:
        a.vector_stores.files.create(vector_store_id=vs.id, file_id=fid)
    err = e.value.response.json()["error"]
    assert (err["code"], err["param"]) == ("resource_not_found", "file_id") and fid in err["message"], err
    assert a.vector_stores.retrieve(vs.id).id == vs.id  # the vector store is there all along


def test_a_fresh_id_is_known_to_other_gateways_before_its_calls_batch_is_stored(provider, tmp_path):
    """With a ClickHouse server a follow-up turn may land on another worker or replica the moment the answer is out.
    Its owner was known there only once the creating call's batch was stored (up to recording.batch_max_seconds,
    5 s by default, which the turn waited for): the owners of what a gateway answers are written ahead now, within
    a poll or two. Here the batch window is 20 s: found well inside it."""
    with _two_gateways(provider, tmp_path, "tw_ahead", batch_seconds=20.0) as (a, b):
        fid = sdk(a, ACME).files.create(file=("a.jsonl", _LINE, "application/jsonl"), purpose="batch").id
        rid = sdk(a, ACME).responses.create(model="gpt-test", input="the code is 7").id
        t = time.monotonic()
        assert sdk(b, ACME).files.retrieve(fid).id == fid
        assert sdk(b, ACME).responses.create(model="gpt-test", input="and?", previous_response_id=rid).id
        assert time.monotonic() - t < 8, "found by the owners written ahead, not the 20 s batch"
