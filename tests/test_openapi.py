"""/openapi.json describes what the gateway serves (the /v1 routes the proxy handles, the admin API, the key
schemes) and is a valid OpenAPI document; real requests and answers match its schemas; /docs renders it."""
from __future__ import annotations

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.gateway_fixture import ADMIN_KEY, KEYS


@pytest.fixture(scope="module")
def spec(gateway) -> dict:
    r = httpx.get(gateway.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def conforms(spec: dict, name: str, instance: object) -> None:
    """Validate `instance` against components/schemas/<name>, references resolved inside the document."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_document_is_valid_openapi(spec):
    validate(spec)
    assert spec["info"]["title"] == "tagway"


def test_v1_routes_are_documented(spec):
    paths = spec["paths"]
    for path, request in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                          ("/v1/embeddings", "EmbeddingRequest")):
        op = paths[path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{request}"}
        assert op["security"] == [{"tagwayKey": []}]
        assert {p["name"] for p in op["parameters"]} >= {"x-tagway-customer", "x-tagway-intent", "x-tagway-tags"}
        assert "x-tagway-trace-id" in op["responses"]["200"]["headers"]
        assert op["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in paths


def test_admin_api_is_documented_with_the_admin_key(spec):
    admin = [p for p in spec["paths"] if p.startswith("/admin/")]
    assert {"/admin/stats", "/admin/errors", "/admin/calls/{trace_id}", "/admin/timeseries"} <= set(admin)
    for path in admin:
        for op in spec["paths"][path].values():
            assert op["security"] == [{"adminKey": []}], path
    assert not [p for p in spec["paths"] if p.startswith("/admin/store")]  # the local CLIs' channel stays private
    assert spec["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"


def test_real_requests_and_answers_match_the_schemas(spec, gateway):
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2,
            "metadata": {"intent": "refund"}, "user": "u-1"}
    conforms(spec, "ChatCompletionRequest", body)
    r = httpx.post(gateway.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 200
    conforms(spec, "ChatCompletion", r.json())
    emb = {"model": "embed", "input": ["a", "b"]}
    conforms(spec, "EmbeddingRequest", emb)
    r = httpx.post(gateway.url + "/v1/embeddings", json=emb, headers={"authorization": f"Bearer {KEYS['acme']}"})
    conforms(spec, "EmbeddingList", r.json())
    bad = httpx.post(gateway.url + "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user"}]},
                     headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 404
    conforms(spec, "ErrorResponse", bad.json())
    with pytest.raises(jsonschema.ValidationError):
        conforms(spec, "ChatCompletionRequest", {"model": "gpt-test", "messages": []})  # the proxy says 400 too


def test_docs_page_renders_the_document(gateway):
    r = httpx.get(gateway.url + "/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/openapi.json" in r.text and "swagger" in r.text.lower()


def test_carried_routes_are_documented(spec):
    """The Responses and Anthropic messages routes and every pass-through route (gateway/routes_table.py)."""
    from gateway.routes_table import ROUTES  # noqa: PLC0415

    paths = spec["paths"]
    assert paths["/v1/responses"]["post"]["security"] == [{"tagwayKey": []}]
    assert "post" in paths["/v1/messages"]
    for r in ROUTES:
        assert r.method.lower() in paths["/v1" + r.path], (r.method, r.path)
    assert set(paths["/v1/models/{model_id}"]) == {"get", "delete"}  # tagway's own GET beside the upstream's DELETE
    assert "multipart/form-data" in paths["/v1/files"]["post"]["requestBody"]["content"]
