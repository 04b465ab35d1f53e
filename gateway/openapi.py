"""The OpenAPI document (/openapi.json, rendered at /docs): FastAPI's own routes (models, health, the admin and stats
API) plus the `/v1` LLM routes, which the raw-ASGI proxy serves and FastAPI never sees, described here from
pydantic models. The models are documentation only: the hot path parses bodies with orjson and passes them on
unvalidated (unknown fields reach the provider as they are, which `extra="allow"` says).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from .routes_table import ROUTES

__all__ = ["install_openapi"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Message(_Open):
    role: str = Field(examples=["user"])
    content: Any = Field(None, description="Text, or an array of content parts.")


class StreamOptions(_Open):
    include_usage: bool | None = None


class _Tagged(_Open):
    model: str = Field(description="A model name from the gateway's config (GET /v1/models).")
    metadata: dict[str, str] | None = Field(
        None, description="Tags for this call (customer, intent, prompt_version, any taxonomy key); removed before "
                          "the request reaches the provider. Headers and key-bound tags take precedence.")
    user: str | None = Field(None, description="End-user id; the customer too when nothing else names one.")


class ChatCompletionRequest(_Tagged):
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Tagged):
    prompt: str | list[Any]
    stream: bool | None = False
    max_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Tagged):
    input: str | list[Any]


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class EmbeddingList(_Open):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    model: str
    usage: Usage | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_TAG_HEADERS = (
    ("x-tagway-customer", "The customer (tenant) this call is for; only keys that may set their customer."),
    ("x-tagway-intent", "Why the call is made, e.g. refund."),
    ("x-tagway-prompt-version", "The prompt version, e.g. refund-v4."),
    ("x-tagway-tags", "More tags: k=v,k2=v2 (keys and values are normalised to [a-z0-9_.-])."),
)
_ERRORS = {"400": "Bad input (invalid JSON, missing model, a tag the taxonomy rejects)",
           "401": "No or unknown key", "403": "The key may not use this model or set this customer",
           "404": "Unknown model", "413": "Body over server.max_body_bytes",
           "429": "The provider's rate limit, relayed after fallbacks", "502": "The provider failed (after fallbacks)",
           "504": "The provider timed out (after fallbacks)"}
_V1 = (
    ("/v1/chat/completions", "Create a chat completion", ChatCompletionRequest, ChatCompletion, True),
    ("/v1/completions", "Create a (legacy) text completion", CompletionRequest, Completion, True),
    ("/v1/embeddings", "Create embeddings", EmbeddingRequest, EmbeddingList, False),
)


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _v1_operation(summary: str, request: type[BaseModel], response: type[BaseModel], streams: bool) -> dict:
    ok: dict[str, Any] = {"application/json": {"schema": _ref(response)}}
    if streams:
        ok["text/event-stream"] = {"schema": {"type": "string", "description": "Server-sent events, one chunk per "
                                              "event, ending with `data: [DONE]` (when `stream` is true)."}}
    headers = {"x-tagway-trace-id": {"description": "The trace id this call is recorded under "
                                                    "(`tagway show TRACE_ID`).", "schema": {"type": "string"}},
               "x-tagway-cost-usd": {"description": "Cost of the call (non-streamed calls).",
                                     "schema": {"type": "string"}}}
    responses: dict[str, Any] = {"200": {"description": "The provider's answer, passed through", "content": ok,
                                         "headers": headers}}
    for status, text in _ERRORS.items():
        responses[status] = {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return {"post": {
        "tags": ["llm"], "summary": summary, "operationId": summary.lower().replace(" ", "_").replace("(", "")
        .replace(")", ""),
        "description": "OpenAI-compatible; served by tagway's proxy, which forwards the body to the configured "
                       "provider (with fallbacks) and records the call.",
        "security": [{"tagwayKey": []}],
        "parameters": [{"name": name, "in": "header", "required": False, "description": text,
                        "schema": {"type": "string"}} for name, text in _TAG_HEADERS],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": responses}}


def _carried_operation(summary: str, op_id: str, body: str) -> dict:
    """The routes whose bodies are the provider API's own (Responses, Anthropic messages, files, batches, ...):
    tagway passes them through as they are, so the document names them without restating the providers' schemas."""
    op: dict[str, Any] = {
        "tags": ["llm"], "summary": summary, "operationId": op_id,
        "description": "Passed through to the provider as it is, authorised, tagged and recorded (README: what is "
                       "carried, and how it is recorded).",
        "security": [{"tagwayKey": []}],
        "responses": {"200": {"description": "The provider's answer, passed through"},
                      **{status: {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
                         for status, text in _ERRORS.items()}}}
    if body != "none":
        media = "multipart/form-data" if body == "multipart" else "application/json"
        op["requestBody"] = {"required": True, "content": {media: {"schema": {"type": "object"}}}}
    return op


def _carried_paths() -> dict[str, dict]:
    paths: dict[str, dict] = {
        "/v1/responses": {"post": _carried_operation("Create a response (OpenAI Responses API)", "responses_create",
                                                     "json")},
        "/v1/messages": {"post": _carried_operation("Create a message (Anthropic Messages API)", "messages_create",
                                                    "json")}}
    for r in ROUTES:
        paths.setdefault("/v1" + r.path, {})[r.method.lower()] = _carried_operation(
            r.api, f"{r.api.replace('.', '_')}_{r.method.lower()}", r.body)
    return paths


def install_openapi(api: FastAPI, version: str) -> None:
    """Make `api.openapi()` (and so /openapi.json and /docs) describe everything the gateway serves."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        schema = get_openapi(
            title="tagway", version=version, routes=api.routes,
            description="OpenAI-compatible LLM gateway: every call is stamped with who asked (customer) and why "
                        "(intent, prompt version, tags) and recorded in ClickHouse. `/v1/*` takes a tagway key, "
                        "`/admin/*` the admin key, both as `Authorization: Bearer <key>`.")
        paths = {path: _v1_operation(summary, req, resp, streams) for path, summary, req, resp, streams in _V1}
        for path, item in [*_carried_paths().items(), *schema["paths"].items()]:  # a path served two ways (GET
            paths[path] = {**paths.get(path, {}), **item}  # and POST /v1/chat/completions) keeps every method
        schema["paths"] = paths
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ChatCompletion, Completion,
                      EmbeddingList, ErrorResponse):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(js.pop("$defs", {}))
            schemas[model.__name__] = js
        components["securitySchemes"] = {
            "tagwayKey": {"type": "http", "scheme": "bearer", "description": "A tagway virtual key (tw-...)."},
            "adminKey": {"type": "http", "scheme": "bearer", "description": "The admin key ($TAGWAY_ADMIN_KEY)."}}
        for path, item in schema["paths"].items():
            templated = re.findall(r"{(\w+)}", path)
            for op in item.values():
                # routes that read request.path_params themselves declare no parameter: name each one
                declared = {p.get("name") for p in op.get("parameters", []) if p.get("in") == "path"}
                op.setdefault("parameters", []).extend(
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in templated if n not in declared)
                if not op["parameters"]:
                    del op["parameters"]
                if path.startswith("/admin/"):
                    op["security"] = [{"adminKey": []}]
                elif path.startswith("/v1/") and "security" not in op:
                    op["security"] = [{"tagwayKey": []}]
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
