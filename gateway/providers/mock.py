"""A built-in deterministic provider for demos, tests and benchmarks: configurable latency and error rate, real
OpenAI response shapes (chat, streaming with usage, completions, embeddings), no network."""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import orjson

from .base import UpstreamCall, UpstreamFailure, UpstreamResponse

if TYPE_CHECKING:  # config imports the provider registry: no import back at run time
    from ..config import ModelConfig

__all__ = ["MockProvider"]


def _last_user_text(messages: list[Any]) -> str:
    for m in reversed(messages or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class MockProvider:
    def __init__(self) -> None:
        self._rng: dict[str, random.Random] = {}

    def _draw(self, d: ModelConfig) -> float:
        rng = self._rng.get(d.name)
        if rng is None:
            rng = self._rng[d.name] = random.Random(d.mock.seed if d.mock else 0)
        return rng.random()

    async def send(self, call: UpstreamCall) -> UpstreamResponse | "_MockStream":
        d = call.deployment
        m = d.mock
        if m:
            delay = m.latency_ms + (m.jitter_ms * self._draw(d) if m.jitter_ms else 0.0)
            if delay > 0:
                await asyncio.sleep(delay / 1000)
            if m.error_rate and self._draw(d) < m.error_rate:
                body = orjson.dumps({"error": {"message": f"mock upstream error ({m.error_status})",
                                               "type": "server_error", "param": None, "code": None}})
                raise UpstreamFailure.from_status(m.error_status, body)
        p = call.payload
        model = d.upstream_model
        rid = "mock-" + hashlib.blake2b(call.body, digest_size=8).hexdigest()
        created = int(time.time())
        if call.operation == "embeddings":
            inputs = p.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            data = [{"object": "embedding", "index": i,
                     "embedding": [b / 255 for b in hashlib.sha256(str(x).encode()).digest()[:8]]}
                    for i, x in enumerate(inputs)]
            n = sum(_tokens(str(x)) for x in inputs)
            return UpstreamResponse(200, orjson.dumps({"object": "list", "data": data, "model": model,
                                                       "usage": {"prompt_tokens": n, "total_tokens": n}}))
        if call.operation == "responses":
            return _mock_response(p, m, rid, created, model, call.stream)
        if call.operation == "messages":
            raise UpstreamFailure("unsupported_operation", "the mock provider does not speak Anthropic messages",
                                  status=501, retryable=False, body=orjson.dumps({"error": {
                                      "message": "The mock provider does not serve /v1/messages.",
                                      "type": "invalid_request_error", "param": None, "code": "unsupported_operation"}}))
        if call.operation == "text_completion":
            prompt = p.get("prompt")
            prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
            text = (m.reply if m and m.reply else f"Echo: {prompt}")
            usage = {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(text)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return UpstreamResponse(200, orjson.dumps({
                "id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}], "usage": usage}))
        messages = p.get("messages") or []
        prompt_text = " ".join(str(x.get("content", "")) for x in messages if isinstance(x, dict))
        text = m.reply if m and m.reply else f"Echo: {_last_user_text(messages)}"
        usage = {"prompt_tokens": _tokens(prompt_text), "completion_tokens": _tokens(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if call.stream:
            return _MockStream(rid, created, model, text, usage, m.stream_chunk_words if m else 3,
                               (m.latency_ms / 1000 / 10) if m else 0.0)
        return UpstreamResponse(200, orjson.dumps({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage}))

    async def aclose(self) -> None:
        pass


def _mock_response(p: dict, m: Any, rid: str, created: int, model: str, stream: bool) -> UpstreamResponse | "_Events":
    """A Responses API answer: one output message echoing the last user input."""
    inp = p.get("input")
    if isinstance(inp, list):
        inp = _last_user_text([x for x in inp if isinstance(x, dict)])
    text = m.reply if m and m.reply else f"Echo: {inp or ''}"
    usage = {"input_tokens": _tokens(str(inp or "")), "output_tokens": _tokens(text),
             "output_tokens_details": {"reasoning_tokens": 0}}
    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    item = {"type": "message", "id": "msg_" + rid, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}
    resp = {"id": "resp_" + rid, "object": "response", "created_at": created, "status": "completed", "model": model,
            "output": [item], "usage": usage}
    if not stream:
        return UpstreamResponse(200, orjson.dumps(resp))
    pending = {**resp, "status": "in_progress", "output": [], "usage": None}
    return _Events([("response.created", {"response": pending}),
                    ("response.output_item.added", {"output_index": 0, "item": {**item, "content": []}}),
                    ("response.content_part.added", {"output_index": 0, "content_index": 0, "part": {
                        "type": "output_text", "text": "", "annotations": []}}),
                    ("response.output_text.delta", {"output_index": 0, "content_index": 0, "delta": text}),
                    ("response.output_item.done", {"output_index": 0, "item": item}),
                    ("response.completed", {"response": resp})])


class _Events:
    """Named SSE events, as the Responses API streams them."""

    def __init__(self, events: list[tuple[str, dict]]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for n, (name, obj) in enumerate(self._events):
            data = orjson.dumps({"type": name, "sequence_number": n, **obj})
            yield b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"

    async def aclose(self) -> None:
        pass


class _MockStream:
    def __init__(self, rid: str, created: int, model: str, text: str, usage: dict, words: int, gap: float) -> None:
        self._args = (rid, created, model, text, usage, max(1, words), gap)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        rid, created, model, text, usage, words, gap = self._args

        def event(obj: dict) -> bytes:
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        yield event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})
        tokens = text.split(" ")
        for i in range(0, len(tokens), words):
            piece = " ".join(tokens[i:i + words]) + (" " if i + words < len(tokens) else "")
            if gap:
                await asyncio.sleep(gap)
            yield event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        yield event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield event({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        pass
