"""The OpenAI routes tagway carries besides the hot ones (chat, completions, embeddings, responses, messages): each
route's method and path, the operation its span records, where its model is (if it has one) and which path segment
is a resource id. `gateway/passthrough.py` serves them; anything else under /v1 is an OpenAI-shaped 404 naming it.

Operations follow the GenAI semantic conventions where a predefined value applies (`generate_content` for images and
audio, with `gen_ai.output.type`), and OpenAI's own resource names otherwise (`moderations`, `files.create`, ...);
`tagway.api` on the span always names the exact API. Pure.
"""
from __future__ import annotations

import dataclasses
import re

from .errors import bad_request

__all__ = ["Route", "ROUTES", "PART_PARAMS", "match", "allowed_methods", "strip_version", "check_resource_id"]

# What an upstream's resource ids look like (file-abc, batch_abc, resp_..., chatcmpl-..., ft:gpt-4o:org:x:id). The
# ASGI path is percent-decoded: an id of %2e%2e or with %3F would reach other upstream paths (POST {base}/cancel)
# or add a query, with the gateway's provider key.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,255}\Z")


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # under /v1, with {name} segments
    api: str  # the exact API, e.g. "chat.completions.retrieve" (span attribute tagway.api)
    operation: str  # gen_ai.operation.name
    body: str = "none"  # none | json | multipart: where the model may be
    output_type: str = ""  # gen_ai.output.type when it says something (image, speech, text)
    pattern: re.Pattern = dataclasses.field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        rx = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path)
        object.__setattr__(self, "pattern", re.compile(rx + r"\Z"))


def _r(method: str, path: str, api: str, operation: str | None = None, body: str = "none", output: str = "") -> Route:
    return Route(method, path, api, operation or api, body, output)


ROUTES: tuple[Route, ...] = (
    # the Responses API beyond `POST /responses` (which the proxy serves)
    _r("GET", "/responses/{id}", "responses.retrieve"),
    _r("DELETE", "/responses/{id}", "responses.delete"),
    _r("POST", "/responses/{id}/cancel", "responses.cancel"),
    _r("GET", "/responses/{id}/input_items", "responses.input_items.list"),
    _r("POST", "/responses/input_tokens", "responses.input_tokens", body="json"),
    _r("POST", "/responses/compact", "responses.compact", body="json"),
    # stored chat completions
    _r("GET", "/chat/completions", "chat.completions.list"),
    _r("GET", "/chat/completions/{id}", "chat.completions.retrieve"),
    _r("POST", "/chat/completions/{id}", "chat.completions.update", body="json"),
    _r("DELETE", "/chat/completions/{id}", "chat.completions.delete"),
    _r("GET", "/chat/completions/{id}/messages", "chat.completions.messages.list"),
    # models: listing and retrieving are tagway's own (app.py); deleting a fine-tuned model is the upstream's
    _r("DELETE", "/models/{model_id}", "models.delete"),  # the name FastAPI's GET of the same path uses
    _r("POST", "/moderations", "moderations", body="json"),
    _r("POST", "/images/generations", "images.generate", "generate_content", "json", "image"),
    _r("POST", "/images/edits", "images.edit", "generate_content", "multipart", "image"),
    _r("POST", "/images/variations", "images.create_variation", "generate_content", "multipart", "image"),
    _r("POST", "/audio/speech", "audio.speech", "generate_content", "json", "speech"),
    _r("POST", "/audio/transcriptions", "audio.transcriptions", "generate_content", "multipart", "text"),
    _r("POST", "/audio/translations", "audio.translations", "generate_content", "multipart", "text"),
    _r("POST", "/files", "files.create", body="multipart"),
    _r("GET", "/files", "files.list"),
    _r("GET", "/files/{id}", "files.retrieve"),
    _r("DELETE", "/files/{id}", "files.delete"),
    _r("GET", "/files/{id}/content", "files.content"),
    _r("POST", "/batches", "batches.create", body="json"),
    _r("GET", "/batches", "batches.list"),
    _r("GET", "/batches/{id}", "batches.retrieve"),
    _r("POST", "/batches/{id}/cancel", "batches.cancel"),
    # conversations (the Responses API's state) and their items
    _r("POST", "/conversations", "conversations.create", body="json"),
    _r("GET", "/conversations/{id}", "conversations.retrieve"),
    _r("POST", "/conversations/{id}", "conversations.update", body="json"),
    _r("DELETE", "/conversations/{id}", "conversations.delete"),
    _r("POST", "/conversations/{id}/items", "conversations.items.create", body="json"),
    _r("GET", "/conversations/{id}/items", "conversations.items.list"),
    _r("GET", "/conversations/{id}/items/{item_id}", "conversations.items.retrieve"),
    _r("DELETE", "/conversations/{id}/items/{item_id}", "conversations.items.delete"),
    # vector stores (file_search), their files and file batches
    _r("POST", "/vector_stores", "vector_stores.create", body="json"),
    _r("GET", "/vector_stores", "vector_stores.list"),
    _r("GET", "/vector_stores/{id}", "vector_stores.retrieve"),
    _r("POST", "/vector_stores/{id}", "vector_stores.update", body="json"),
    _r("DELETE", "/vector_stores/{id}", "vector_stores.delete"),
    _r("POST", "/vector_stores/{id}/search", "vector_stores.search", body="json"),
    _r("POST", "/vector_stores/{id}/files", "vector_stores.files.create", body="json"),
    _r("GET", "/vector_stores/{id}/files", "vector_stores.files.list"),
    _r("GET", "/vector_stores/{id}/files/{file_id}", "vector_stores.files.retrieve"),
    _r("POST", "/vector_stores/{id}/files/{file_id}", "vector_stores.files.update", body="json"),
    _r("DELETE", "/vector_stores/{id}/files/{file_id}", "vector_stores.files.delete"),
    _r("GET", "/vector_stores/{id}/files/{file_id}/content", "vector_stores.files.content"),
    _r("POST", "/vector_stores/{id}/file_batches", "vector_stores.file_batches.create", body="json"),
    _r("GET", "/vector_stores/{id}/file_batches/{batch_id}", "vector_stores.file_batches.retrieve"),
    _r("POST", "/vector_stores/{id}/file_batches/{batch_id}/cancel", "vector_stores.file_batches.cancel"),
    _r("GET", "/vector_stores/{id}/file_batches/{batch_id}/files", "vector_stores.file_batches.list_files"),
)

# path parameters that name a part of the resource before them (a conversation's item, a vector store's file or
# file batch): the provider finds them only inside that resource, so whose they are is the resource's owner's
PART_PARAMS = frozenset({"item_id", "file_id", "batch_id"})


def check_resource_id(name: str, value: str) -> None:
    if not _RESOURCE_ID.match(value):
        raise bad_request(f"{value[:64]!r} is not a resource id (letters, digits, '_', '-', '.', ':').",
                          code="invalid_resource_id", param=name)


def strip_version(path: str) -> str:
    """/v1/files -> /files; clients configured without /v1 send /files already."""
    return path[3:] if path.startswith("/v1/") else path


def match(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route for a request (path with or without /v1) and its path parameters."""
    p = strip_version(path)
    for r in ROUTES:
        if r.method == method:
            m = r.pattern.match(p)
            if m:
                return r, m.groupdict()
    return None


def allowed_methods(path: str) -> list[str]:
    """The methods carried on this path (for a 405 that says which), empty when the path is not carried."""
    p = strip_version(path)
    return sorted({r.method for r in ROUTES if r.pattern.match(p)})
