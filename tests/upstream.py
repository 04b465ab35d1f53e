"""A real OpenAI-compatible (and Anthropic-compatible) HTTP server on 127.0.0.1 for tests.

Behaviour is picked by the upstream model name the gateway sends, so one server plays every deployment:
  ok-*        answers normally (streams real SSE when asked; usage only when stream_options.include_usage)
  tools-*     answers with a tool call
  fail503-*, fail500-*, fail429-*, fail400-*   answers that HTTP error with an OpenAI-shaped body
  slow-*      waits 2 s before answering (for timeouts); hang-* (resource routes) waits 30 s or until the caller hangs
              up; slowstream-* waits 0.3 s after each streamed text delta
  cut-*       streams two chunks (Responses and Anthropic: up to the first text delta) then drops the connection
  refund-bad-* answers "WRONG" when the prompt mentions refund, else like ok-*
  garbage-*   answers 502 with an HTML body
  midstreamerror-*  streams one chunk, then an error event (mentioning the upstream key), then [DONE]
  errorend-*  streams one chunk (Responses: one text delta), then the API's error event, and ends without [DONE]
              (as OpenAI ends a stream that failed)
  echokey-*   answers 200 with the bearer key it was sent in its text (a provider that leaks its key)
  jsonstream-*  answers a stream request with plain JSON; ssewhole-* answers a non-stream request with SSE;
  badjson-*     answers 200 with a body that is not JSON
Every response carries `x-request-id: req-<n>` (n counts requests), `x-ratelimit-remaining-requests`,
`openai-processing-ms` and a header no allow-list names (`x-upstream-internal`); 429s add `retry-after: 0` and
`x-should-retry: false`. Every request is recorded (path, headers, JSON body) in `requests`.
"""
from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
from aiohttp import web

from tests.http_server import ThreadedServer

SECRET_ECHO = "sk-upstream-secret-should-never-leak"


def re_fields(raw: bytes) -> list[tuple[str, str]]:
    """The small text fields of a multipart body (name -> value), enough for the fixture to echo them."""
    return [(m.group(1).decode(), m.group(2).decode("utf-8", "replace"))
            for m in re.finditer(rb'name="([^"]+)"\r\n\r\n([^\r\n]{0,200})\r\n', raw)]


def _last_user(messages: list) -> str:
    for m in reversed(messages or []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [])
    return ""


class Upstream(ThreadedServer):
    def __init__(self) -> None:
        super().__init__()
        self.base_url = f"{self.url}/v1"
        self.requests: list[dict[str, Any]] = []
        self.uploads = 0  # files uploaded: each gets its own id, as a provider's

    def routes(self, app: web.Application) -> None:
        app.on_response_prepare.append(self._stamp)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.anthropic_messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.models)
        # the resource routes tagway passes through (gateway/routes_table.py)
        for method, path in (("GET", "/v1/chat/completions"), ("GET", "/v1/chat/completions/{id}"),
                             ("POST", "/v1/chat/completions/{id}"), ("DELETE", "/v1/chat/completions/{id}"),
                             ("GET", "/v1/chat/completions/{id}/messages"), ("GET", "/v1/responses/{id}"),
                             ("DELETE", "/v1/responses/{id}"), ("POST", "/v1/responses/{id}/cancel"),
                             ("GET", "/v1/responses/{id}/input_items"), ("POST", "/v1/moderations"),
                             ("POST", "/v1/images/generations"), ("GET", "/v1/files"), ("GET", "/v1/files/{id}"),
                             ("DELETE", "/v1/files/{id}"), ("POST", "/v1/batches"), ("GET", "/v1/batches/{id}"),
                             ("POST", "/v1/batches/{id}/cancel"), ("DELETE", "/v1/models/{id}")):
            app.router.add_route(method, path, self.resource)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_post("/v1/audio/transcriptions", self.upload)
        app.router.add_get("/v1/files/{id}/content", self.file_content)
        app.router.add_post("/v1/audio/speech", self.speech)

    def last(self, path: str = "/v1/chat/completions") -> dict[str, Any]:
        return [r for r in self.requests if r["path"] == path][-1]

    def clear(self) -> None:
        self.requests.clear()

    # -- handlers -----------------------------------------------------------------------------------------------
    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-request-id"] = f"req-{len(self.requests)}"
        response.headers["x-ratelimit-remaining-requests"] = "99"
        response.headers["openai-processing-ms"] = "7"
        response.headers["x-upstream-internal"] = "not for clients"
        if response.status == 429:
            response.headers["retry-after"] = "0"
            response.headers["x-should-retry"] = "false"

    async def _record(self, request: web.Request) -> dict:
        raw = await request.read()
        body = orjson.loads(raw)
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body, "raw": raw})
        return body

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        return web.Response(status=status, content_type="application/json", body=orjson.dumps(
            {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                       "param": None, "code": None}}))

    async def _behaviour(self, model: str) -> web.Response | None:
        if model.startswith("fail"):
            status = int(model[4:7])
            return self._error(status, f"upstream says {status} (key {SECRET_ECHO})")
        if model.startswith("garbage"):
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        if model.startswith("slow"):
            await asyncio.sleep(2)
        if model.startswith("badjson"):
            return web.Response(status=200, text='{"id": "chatcmpl-x", "choices": [', content_type="application/json")
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        model = body.get("model", "")
        early = await self._behaviour(model)
        if early is not None:
            return early
        user = _last_user(body.get("messages"))
        text = f"Echo: {user}"
        if model.startswith("echokey"):
            text = f"your key is {request.headers.get('Authorization', '')[7:]}"
        if model.startswith("refund-bad") and "refund" in user.lower():
            text = "WRONG"
        usage = {"prompt_tokens": 10 + len(user.split()), "completion_tokens": len(text.split()),
                 "total_tokens": 10 + len(user.split()) + len(text.split())}
        tool_call = None
        if model.startswith("tools"):
            tool_call = {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        base = {"id": "chatcmpl-test", "created": int(time.time()), "model": model + "-2026"}
        if model.startswith("ssewhole") and not body.get("stream"):
            body = {**body, "stream": True}
        if not body.get("stream") or model.startswith("jsonstream"):
            msg: dict[str, Any] = {"role": "assistant", "content": None if tool_call else text}
            if tool_call:
                msg["tool_calls"] = [tool_call]
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": msg, "finish_reason": "tool_calls" if tool_call else "stop"}],
                "usage": usage}, dumps=lambda o: orjson.dumps(o).decode())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def event(obj: Any) -> None:
            await resp.write(b"data: " + orjson.dumps(obj) + b"\n\n")

        chunk = {**base, "object": "chat.completion.chunk"}
        await event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]})
        if tool_call:
            await event({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]})
            await event({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}, "finish_reason": None}]})
        else:
            for i, word in enumerate(text.split(" ")):
                await event({**chunk, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word},
                                                   "finish_reason": None}]})
                if model.startswith("errorend") and i == 0:
                    await event({"error": {"message": "The server had an error while processing your request.",
                                           "type": "server_error"}})
                    await resp.write_eof()
                    return resp
                if model.startswith("midstreamerror") and i == 0:
                    await event({"error": {"message": f"overloaded (key {SECRET_ECHO})", "type": "server_error"}})
                    await resp.write(b"data: [DONE]\n\n")
                    await resp.write_eof()
                    return resp
                if model.startswith("cut") and i == 0:
                    await asyncio.sleep(0.05)
                    request.transport.close()  # drop the connection mid-stream
                    return resp
                if model.startswith("slowstream"):
                    await asyncio.sleep(0.3)
        await event({**chunk, "choices": [{"index": 0, "delta": {},
                                           "finish_reason": "tool_calls" if tool_call else "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await event({**chunk, "choices": [], "usage": usage})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: an echo of the last user input, or (tools-*) a function call first and, once its
        output is in the input, a message quoting it; streamed as the API's named events when asked."""
        body = await self._record(request)
        model = body.get("model", "")
        early = await self._behaviour(model)
        if early is not None:
            return early
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items or []
        tool_output = next((i.get("output") for i in items if i.get("type") == "function_call_output"), None)
        user = _last_user([i for i in items if i.get("role") == "user"]) if items else ""
        if model.startswith("tools") and tool_output is None:
            out = [{"type": "function_call", "id": "fc_1", "call_id": "call_w1", "name": "get_weather",
                    "arguments": '{"city": "Paris"}', "status": "completed"}]
            text = ""
        else:
            text = f"The weather is {tool_output}" if tool_output is not None else f"Echo: {user}"
            out = [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}]
        usage = {"input_tokens": 10 + len(user.split()), "input_tokens_details": {"cached_tokens": 2},
                 "output_tokens": max(1, len(text.split())), "output_tokens_details": {"reasoning_tokens": 3}}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        resp = {"id": f"resp_{len(self.requests)}", "object": "response", "created_at": int(time.time()),
                "status": "completed", "model": model + "-2026", "output": out, "usage": usage,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": body.get("tools") or [],
                "error": None, "incomplete_details": None, "instructions": body.get("instructions"),
                "metadata": body.get("metadata") or {}, "temperature": None, "top_p": None}
        if not body.get("stream"):
            return web.json_response(resp)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        seq = 0

        async def ev(name: str, obj: dict) -> None:
            nonlocal seq
            await stream.write(f"event: {name}\n".encode() + b"data: " + orjson.dumps(
                {"type": name, "sequence_number": seq, **obj}) + b"\n\n")
            seq += 1

        pending = {**resp, "status": "in_progress", "output": [], "usage": None}
        await ev("response.created", {"response": pending})
        await ev("response.in_progress", {"response": pending})
        for i, item in enumerate(out):
            empty = {**item, "content": []} if item["type"] == "message" else {**item, "arguments": ""}
            await ev("response.output_item.added", {"output_index": i, "item": empty})
            if item["type"] == "message":
                part = {"type": "output_text", "text": "", "annotations": []}
                await ev("response.content_part.added", {"item_id": item["id"], "output_index": i,
                                                         "content_index": 0, "part": part})
                for n, word in enumerate(text.split(" ")):
                    await ev("response.output_text.delta", {"item_id": item["id"], "output_index": i,
                                                            "content_index": 0, "delta": (" " if n else "") + word,
                                                            "logprobs": []})
                    if model.startswith("cut") and n == 0:
                        await asyncio.sleep(0.05)
                        request.transport.close()
                        return stream
                    if model.startswith("errorend") and n == 0:
                        await ev("error", {"code": "server_error", "message": "The server had an error.",
                                           "param": None})
                        await stream.write_eof()
                        return stream
                    if model.startswith("slowstream"):
                        await asyncio.sleep(0.3)
            else:
                await ev("response.function_call_arguments.delta", {"item_id": item["id"], "output_index": i,
                                                                    "delta": item["arguments"]})
            await ev("response.output_item.done", {"output_index": i, "item": item})
        await ev("response.completed", {"response": resp})
        await stream.write_eof()
        return stream

    async def resource(self, request: web.Request) -> web.Response:
        """Any resource route: echoes what it was asked (method, path, query, model) with an id."""
        raw = await request.read()
        body = orjson.loads(raw) if raw else None
        self.requests.append({"path": request.path, "method": request.method, "query": request.query_string,
                              "headers": dict(request.headers), "body": body, "raw": raw})
        model = (body or {}).get("model", "") if isinstance(body, dict) else ""
        if model.startswith("fail"):
            return self._error(int(model[4:7]), f"upstream says {model[4:7]} (key {SECRET_ECHO})")
        if model.startswith("hang"):  # no answer for 30 s, or until the caller hangs up
            for _ in range(300):
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.1)
        rid = request.match_info.get("id") or f"res-{len(self.requests)}"
        out: dict[str, Any] = {"id": rid, "object": "echo", "method": request.method, "path": request.path,
                               "query": request.query_string, "model": model}
        if request.method == "GET" and ("id" not in request.match_info or request.path.endswith(("/messages",
                                                                                                 "/input_items"))):
            out = {"object": "list", "data": [{"id": "listed-1"}, {"id": "listed-2"}], "has_more": False}
            if request.path == "/v1/files":  # the account's files: every upload, whoever made it, paged
                every = [{"id": f"file-up-{i}"} for i in range(1, self.uploads + 1)] + out["data"]
                after, limit = request.query.get("after"), int(request.query.get("limit", "10000"))
                start = next((n + 1 for n, x in enumerate(every) if x["id"] == after), 0) if after else 0
                out["data"], out["has_more"] = every[start:start + limit], start + limit < len(every)
        if request.path == "/v1/images/generations":
            out["usage"] = {"input_tokens": 9, "output_tokens": 100, "total_tokens": 109}
        elif "data" not in out and request.path.startswith(("/v1/responses/", "/v1/chat/completions/")):
            out["usage"] = {"input_tokens": 40, "output_tokens": 60, "total_tokens": 100}  # the stored call's
        return web.json_response(out)

    async def upload(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append({"path": request.path, "method": "POST", "headers": dict(request.headers),
                              "body": None, "raw": raw})
        fields = dict(re_fields(raw))
        self.uploads += 1
        return web.json_response({"id": f"file-up-{self.uploads}", "object": "file", "bytes": len(raw),
                                  "model": fields.get("model", ""), "purpose": fields.get("purpose", ""),
                                  "text": f"heard {fields.get('model', '')}"})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"path": request.path, "method": "GET", "headers": dict(request.headers),
                              "body": None, "raw": b""})
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(4):  # a file in pieces: relayed as it comes
            await resp.write(b'{"line": %d}\n' % i)
        await resp.write_eof()
        return resp

    async def speech(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(body=b"ID3" + bytes(range(256)) * 4, content_type="audio/mpeg")

    async def models(self, request: web.Request) -> web.Response:
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": None, "raw": b""})
        return web.json_response({"object": "list", "data": [
            {"id": i, "object": "model", "created": 1700000000, "owned_by": "upstream"}
            for i in ("ok-a", "ok-tmpl-b", "other")]})

    async def completions(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        early = await self._behaviour(body.get("model", ""))
        if early is not None:
            return early
        prompt = body.get("prompt")
        text = f"Echo: {prompt}"
        return web.json_response({"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
                                  "model": body["model"], "choices": [
                                      {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        early = await self._behaviour(body.get("model", ""))
        if early is not None:
            return early
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body["model"], "data": [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i, _ in enumerate(inputs)],
            "usage": {"prompt_tokens": 4 * len(inputs), "total_tokens": 4 * len(inputs)}})

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        """Enough of Anthropic's Messages API for litellm's translation: one text block, usage, SSE events."""
        body = await self._record(request)
        model = body.get("model", "")
        if model.startswith("fail"):
            status = int(model[4:7])
            kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error"}.get(status, "overloaded_error")  # Anthropic's
            return web.json_response({"type": "error", "error": {"type": kind, "message": f"anthropic says {status}"}},
                                     status=status)
        user = ""
        for m in body.get("messages", []):
            if m.get("role") == "user":
                c = m.get("content")
                user = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
        text = f"Claude echo: {user}"
        if not body.get("stream"):
            return web.json_response({"id": "msg_test", "type": "message", "role": "assistant", "model": model,
                                      "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                      "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 4}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def ev(name: str, obj: Any) -> None:
            await resp.write(f"event: {name}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n")

        await ev("message_start", {"type": "message_start", "message": {
            "id": "msg_test", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 1}}})
        await ev("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})
        for n, word in enumerate(text.split(" ")):
            await ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": word + " "}})
            if model.startswith("cut") and n == 0:  # drop the connection mid-stream
                await asyncio.sleep(0.05)
                request.transport.close()
                return resp
            if model.startswith("slowstream"):
                await asyncio.sleep(0.3)
        await ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        await ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                      "stop_sequence": None},
                                   "usage": {"output_tokens": 4}})
        await ev("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp
