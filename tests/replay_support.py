"""Helpers for the replay tests (no tests here): a small real OpenAI-compatible HTTP server that can play the
gateway (it answers with `x-tagway-trace-id` / `x-tagway-cost-usd` and checks the key) or an upstream, and
production calls written as `otel_traces` spans so the `llm_calls` materialized view fills as in production.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any, Callable

import orjson
from aiohttp import web

from exporters import semconv as sc
from exporters.genai_messages import choices_to_semconv_output, to_semconv_input
from tests.http_server import ThreadedServer, free_port
from tests.upstream import _last_user as last_user

API_KEY = "tw-replay-test-key"

# model name -> answer(last user text, request headers) -> text
Answer = Callable[[str, dict], str]


class FakeLLM(ThreadedServer):
    """aiohttp on 127.0.0.1 in a thread. Unknown model -> 404 model_not_found; wrong key -> 401 (when a key is
    required); `fail_once[case_id] = status` answers that status once, `fail_always[model] = status` every time;
    `delay` seconds per call."""

    def __init__(self, answers: dict[str, Answer], *, cost: float = 0.001, delay: float = 0.0,
                 require_key: str | None = API_KEY) -> None:
        self.answers = answers
        self.cost = cost
        self.delay = delay
        self.require_key = require_key
        self.fail_once: dict[str, int] = {}
        self.fail_always: dict[str, int] = {}  # model -> the status every call to it answers
        self.fail_headers: dict[str, str] = {}  # headers of those answers (e.g. x-should-retry)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        super().__init__()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)

    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/chat/completions"]

    @staticmethod
    def _error(status: int, message: str, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                             "code": code}}, status=status, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": None,
                              "t": time.monotonic()})
        if self.require_key and request.headers.get("authorization") != f"Bearer {self.require_key}":
            return self._error(401, "invalid api key", "invalid_api_key")  # as the gateway's /v1/models
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.answers]})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: as the gateway answers it, a card for a model it serves, else 404."""
        model = request.match_info["model"]
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": None,
                              "t": time.monotonic()})
        if model not in self.answers and model not in self.fail_always:
            return self._error(404, f"The model `{model}` does not exist", "model_not_found")
        return web.json_response({"id": model, "object": "model", "owned_by": "tagway"})

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append({"path": request.path, "headers": headers, "body": body, "t": time.monotonic()})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.require_key and headers.get("authorization") != f"Bearer {self.require_key}":
                return self._error(401, "invalid api key", "invalid_api_key")
            case = headers.get("x-tagway-replay-case-id", "")
            if case in self.fail_once:
                return self._error(self.fail_once.pop(case), "try again later")
            model = body.get("model", "")
            if model in self.fail_always:
                return self._error(self.fail_always[model], f"{model} is broken", "server_error", self.fail_headers)
            if model not in self.answers:
                return self._error(404, f"The model `{model}` does not exist", "model_not_found")
            text = self.answers[model](last_user(body.get("messages")), headers)
            usage = {"prompt_tokens": 12, "completion_tokens": len(text.split()), "total_tokens": 12 + len(text.split())}
            return web.json_response(
                {"id": "chatcmpl-" + uuid.uuid4().hex[:8], "object": "chat.completion", "created": int(time.time()),
                 "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}], "usage": usage},
                headers={"x-tagway-trace-id": uuid.uuid4().hex, "x-tagway-cost-usd": f"{self.cost:.10f}"})
        finally:
            self.in_flight -= 1


# -- production calls as spans ------------------------------------------------------------------------------------

def call_span(*, customer: str, intent: str, user: str, answer: str, model: str = "prod-model",
              prompt_version: str = "v1", tags: dict[str, str] | None = None, system: str = "You are helpful.",
              params: dict | None = None, capture: bool = True, status: str = "Ok", latency_ms: float = 300.0,
              cost: float = 0.0005, source: str = "production", at: float | None = None,
              input_tokens: int = 12) -> dict:
    """One `otel_traces` row shaped like the gateway's call span (attributes as strings, as the Collector writes)."""
    sys_parts, inputs = to_semconv_input([{"role": "system", "content": system}, {"role": "user", "content": user}])
    output = choices_to_semconv_output([{"message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}])
    attrs = {sc.KIND: "call", sc.OPERATION: "chat", sc.REQUEST_MODEL: model, sc.REQUESTED_MODEL: model,
             sc.RESPONSE_MODEL: model, sc.PROVIDER: "openai", sc.CUSTOMER: customer, sc.INTENT: intent,
             sc.PROMPT_VERSION: prompt_version, sc.SOURCE: source, sc.COST_USD: str(cost),
             sc.INPUT_TOKENS: str(input_tokens), sc.OUTPUT_TOKENS: str(len(answer.split())), sc.REQUEST_STREAM: "false",
             sc.REQUEST_PARAMS: orjson.dumps(params or {"temperature": 0.7}).decode(), sc.HTTP_STATUS: "200",
             sc.ATTEMPTS: "1"}
    for k, v in (tags or {}).items():
        attrs[sc.TAG_PREFIX + k] = v
    if capture:
        attrs[sc.INPUT_MESSAGES] = orjson.dumps(inputs).decode()
        attrs[sc.SYSTEM_INSTRUCTIONS] = orjson.dumps(sys_parts).decode()
        attrs[sc.OUTPUT_MESSAGES] = orjson.dumps(output).decode()
    trace_id = uuid.uuid4().hex
    return {"Timestamp": at if at is not None else time.time(), "TraceId": trace_id,
            "SpanId": hashlib.blake2b(trace_id.encode(), digest_size=8).hexdigest(), "ParentSpanId": "",
            "TraceState": "", "SpanName": f"chat {model}", "SpanKind": "Client", "ServiceName": "tagway",
            "ResourceAttributes": {"service.name": "tagway"}, "ScopeName": sc.SCOPE_NAME, "ScopeVersion": "test",
            "SpanAttributes": attrs, "Duration": int(latency_ms * 1e6), "StatusCode": status, "StatusMessage": ""}


def record(store: Any, spans: list[dict]) -> list[str]:
    store.insert_json_rows("otel_traces", b"\n".join(orjson.dumps(s) for s in spans))
    return [s["TraceId"] for s in spans]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
