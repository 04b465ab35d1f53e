"""Providers that do not speak the OpenAI wire format (Anthropic, Gemini, Bedrock, Vertex, ...) go through
`litellm` for translation. litellm is imported on first use: it costs seconds and ~100 MB, and a gateway that only
talks to OpenAI-compatible upstreams never pays it."""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from typing import Any, AsyncIterator

import orjson

from .base import UpstreamCall, UpstreamFailure, UpstreamResponse
from .sse import iter_events

__all__ = ["LiteLLMProvider", "TRANSLATED_RESPONSE_PREFIX"]

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the price list at import

# request fields litellm understands for chat; anything else stays out rather than confusing a translator
_CHAT_PARAMS = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "tools", "tool_choice",
                "response_format", "seed", "n", "presence_penalty", "frequency_penalty", "user", "parallel_tool_calls",
                "reasoning_effort", "logprobs", "top_logprobs"}


def preload() -> None:
    """Import litellm ahead of the first call (called off the event loop at start-up)."""
    _litellm()


def _litellm() -> Any:
    import litellm  # noqa: PLC0415 - deliberate lazy import

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm


def _missing_module(e: BaseException) -> ImportError | None:
    """The ImportError behind a litellm exception, if any: litellm wraps its own failures (a module it imports
    lazily, not installed) in the same exception classes as a provider's answer."""
    x: BaseException | None = e
    for _ in range(8):
        if x is None:
            return None
        if isinstance(x, ImportError):
            return x
        x = x.__cause__ or x.__context__
    return None


def _first_line(text: str) -> str:
    # litellm appends a traceback and a prefilled bug-report link to some messages: neither is for the client
    return text.strip().split("\n", 1)[0][:2000]


_UNSUPPORTED = re.compile(r"does not support parameters: \[([^\]]*)\]")


def _unsupported_params(e: Exception, model: str, provider: str) -> UpstreamFailure | None:
    """litellm's refusal of an OpenAI parameter the provider has no equivalent for, said in tagway's terms: its
    own message tells the client to set `litellm.drop_params` or a LiteLLM proxy setting, neither of which a
    tagway user has. OpenAI's own answer to a parameter a model does not take is this shape (code
    `unsupported_parameter`, the parameter in `param`)."""
    if type(e).__name__ != "UnsupportedParamsError":
        return None
    m = _UNSUPPORTED.search(str(getattr(e, "message", "") or e))
    names = re.findall(r"'([^']+)'", m.group(1)) if m else []
    listed = ", ".join(names) or "some of this request's parameters"
    message = (f"Provider {provider} does not support {listed} (model {model!r}). Leave "
               f"{'it' if len(names) == 1 else 'them'} out, or ask the gateway's operator to set "
               f"`drop_params: true` on this model, which drops what the provider does not support.")
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": names[0] if names else None, "code": "unsupported_parameter"}})
    return UpstreamFailure("unsupported_parameter", message, status=400, body=body, retryable=False)


def _failure(e: Exception) -> UpstreamFailure:
    missing = _missing_module(e)
    if missing is not None:  # the gateway's fault, not the upstream's: a 500 that names it, no fallback
        message = (f"The gateway cannot translate this call: litellm needs a module that is not installed "
                   f"({_first_line(str(missing))}).")
        body = orjson.dumps({"error": {"message": message, "type": "api_error", "param": None,
                                       "code": "translation_unavailable"}})
        return UpstreamFailure("translation_unavailable", message, status=500, body=body, retryable=False)
    status = getattr(e, "status_code", None)
    if not isinstance(status, int):
        name = type(e).__name__
        if "Timeout" in name:
            return UpstreamFailure("timeout", "upstream timed out")
        if "Connection" in name:
            return UpstreamFailure("connect_error", "cannot connect to upstream")
        return UpstreamFailure("upstream_error", f"upstream call failed: {name}")
    raw = _first_line(str(getattr(e, "message", "")))
    said = _provider_error(raw)
    # litellm prefixes messages with its own exception names and the provider's JSON: keep the provider's words
    # and its error type (Anthropic's invalid_request_error is OpenAI's too), and the code OpenAI gives the kinds
    # of errors apps test for (context_length_exceeded, ...)
    body = orjson.dumps({"error": {"message": said.get("message") or raw or f"upstream answered HTTP {status}",
                                   "type": said.get("type") or "upstream_error", "param": None,
                                   "code": _OPENAI_CODES.get(type(e).__name__, str(status))}})
    # the provider's response headers: its retry-after (the SDKs wait that long), request id and rate-limit state
    headers = getattr(e, "litellm_response_headers", None)
    raw_headers = tuple((k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
                        for k, v in headers.multi_items()) \
        if hasattr(headers, "multi_items") else ()
    return UpstreamFailure.from_status(status, body, raw_headers)


# litellm's exception classes -> the `code` OpenAI answers for the same error
_OPENAI_CODES = {"ContextWindowExceededError": "context_length_exceeded",
                 "ContentPolicyViolationError": "content_policy_violation",
                 "RateLimitError": "rate_limit_exceeded", "NotFoundError": "model_not_found"}


def _provider_error(message: str) -> dict:
    """The provider's own error (message, type) in a litellm message (`litellm.X: ProviderException - {json}`)."""
    i = message.find("{")
    if i < 0:
        return {}
    try:
        obj = orjson.loads(message[i:])
    except orjson.JSONDecodeError:
        return {}
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, str):
        return {"message": err}
    if not isinstance(err, dict):
        return {}
    return {k: str(err[k]) for k in ("message", "type") if isinstance(err.get(k), (str, int)) and err.get(k)}


class LiteLLMProvider:
    async def send(self, call: UpstreamCall) -> UpstreamResponse | "_LiteLLMStream":
        d = call.deployment
        # a gateway whose deployments are all OpenAI-compatible imports litellm only when a Responses or messages
        # call needs translating: that first import (seconds) runs off the event loop, not in every call's way
        litellm = sys.modules.get("litellm") or await asyncio.get_running_loop().run_in_executor(None, _litellm)
        p = call.payload
        kwargs: dict[str, Any] = {"model": f"{d.provider}/{d.upstream_model}", "timeout": d.timeout,
                                  "num_retries": 0}  # fallbacks are ours to decide
        if d.base_url:
            kwargs["api_base"] = d.base_url
        if d.api_key:
            kwargs["api_key"] = d.api_key
        if d.headers:
            kwargs["extra_headers"] = dict(d.headers)
        try:
            if call.operation in ("responses", "messages"):
                return await _translated_api(litellm, call, kwargs)
            # what the provider has no equivalent for is left out, not refused (chat and embeddings)
            drop = {"drop_params": True} if d.drop_params else {}
            if call.operation == "embeddings":
                resp = await litellm.aembedding(input=p.get("input"), **kwargs, **drop)
                return UpstreamResponse(200, resp.model_dump_json().encode())
            if call.operation != "chat":
                raise UpstreamFailure("unsupported_operation", f"{d.provider} supports chat and embeddings only",
                                      status=400, retryable=False,
                                      body=orjson.dumps({"error": {"message": f"Provider {d.provider} does not"
                                                                   " support /v1/completions; use chat.",
                                                                   "type": "invalid_request_error", "param": None,
                                                                   "code": "unsupported_operation"}}))
            params = {**{k: v for k, v in p.items() if k in _CHAT_PARAMS}, **drop}
            if call.stream:
                stream = await litellm.acompletion(messages=p.get("messages"), stream=True,
                                                   stream_options={"include_usage": True}, **params, **kwargs)
                return _LiteLLMStream(stream)
            resp = await litellm.acompletion(messages=p.get("messages"), **params, **kwargs)
            return UpstreamResponse(200, orjson.dumps(_openai_completion(resp.model_dump())))
        except UpstreamFailure:
            raise
        except Exception as e:  # litellm maps provider errors onto OpenAI-like exception classes with status_code
            raise _unsupported_params(e, d.name, d.provider) or _failure(e) from None

    async def aclose(self) -> None:
        pass


# The request fields of each API that go to litellm, which maps what the provider knows. Only these: litellm takes
# its own controls as keyword arguments beside them (api_base, api_key, custom_llm_provider, mock_response, ...),
# so a client's `"api_base": "https://elsewhere"` would have sent the operator's provider key there.
_TRANSLATED_PARAMS = {
    "responses": frozenset({
        "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
        "parallel_tool_calls", "previous_response_id", "reasoning", "store", "metadata", "text", "truncation", "user",
        "include", "background", "prompt", "service_tier", "top_logprobs", "prompt_cache_key", "safety_identifier",
        "conversation", "max_tool_calls", "stream_options"}),
    "messages": frozenset({
        "messages", "system", "max_tokens", "metadata", "stop_sequences", "temperature", "top_k", "top_p", "tools",
        "tool_choice", "thinking", "service_tier", "container", "mcp_servers"}),
}


# the id of a response a translated provider made: litellm's own (base64 of `litellm:custom_llm_provider:<provider>;
# model_id:...;response_id:...`, which names the provider behind the gateway and which only litellm's proxy, with its
# database, could continue) becomes an opaque one with this prefix; nothing stores such a response, so its id is
# never sent back to litellm (`previous_response_id` is refused, the stored-response routes answer 501)
TRANSLATED_RESPONSE_PREFIX = "resp_tagway_"
_LITELLM_RESPONSE_ID = "resp_bGl0ZWxs"  # "resp_" + base64("litell...")


def _opaque_id(rid: Any) -> Any:
    if isinstance(rid, str) and rid.startswith(_LITELLM_RESPONSE_ID):
        return TRANSLATED_RESPONSE_PREFIX + hashlib.sha256(rid.encode()).hexdigest()[:40]
    return rid


# what continues state kept at the provider: a translated provider keeps none (a stored response, a conversation)
_STATE_PARAMS = ("previous_response_id", "conversation")


def _no_previous_response(d: Any, param: str = "previous_response_id") -> UpstreamFailure:
    """A translated provider keeps no responses or conversations (litellm's session handler needs its own proxy's
    database): a follow-up turn names what to send instead, before litellm is asked. A 400: retrying will not
    change it."""
    message = (f"Model {d.name!r} is served through translation (provider {d.provider}), which keeps no stored "
               f"responses or conversations, so `{param}` cannot continue one. Send the whole conversation as "
               "`input` instead: the earlier turns' input items and the output items they got, then the new input.")
    body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error",
                                   "param": param, "code": "unsupported_parameter"}})
    return UpstreamFailure("unsupported_parameter", message, status=400, body=body, retryable=False)


async def _translated_api(litellm: Any, call: UpstreamCall, kwargs: dict) -> UpstreamResponse | "_EventStream":
    """The Responses API (litellm.aresponses) or Anthropic's Messages API (litellm's anthropic interface) for a
    provider that does not speak it: the API's request fields go to litellm, which maps what the provider knows."""
    known = _TRANSLATED_PARAMS[call.operation]
    p = {k: v for k, v in call.payload.items() if k in known}
    if call.operation == "responses":
        for param in _STATE_PARAMS:
            if p.get(param):
                raise _no_previous_response(call.deployment, param)
        result = await litellm.aresponses(stream=call.stream, **p, **kwargs)
    else:
        from litellm.anthropic_interface import messages  # noqa: PLC0415 - only for this API

        result = await messages.acreate(stream=call.stream, **{"max_tokens": 1024, **p}, **kwargs)
    if not call.stream:
        obj = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        if isinstance(obj, dict) and call.operation == "responses":
            obj["id"] = _opaque_id(obj.get("id"))
            obj.pop("provider_specific_fields", None)
        return UpstreamResponse(200, orjson.dumps(obj))
    return _EventStream(result)


async def _close_quietly(stream: Any) -> None:
    """Close a litellm stream if it can be closed; the call is over either way, so a failure to close is moot."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


class _EventStream:
    """A translated stream as SSE events: litellm yields event objects (Responses) or SSE bytes (messages)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for event in iter_events(self._pieces()):  # byte chunks need not end where events do
            yield event

    async def _pieces(self) -> AsyncIterator[bytes]:
        try:
            async for item in self._stream:
                if isinstance(item, (bytes, bytearray, str)):
                    yield item.encode() if isinstance(item, str) else bytes(item)
                    continue
                obj = item.model_dump(mode="json", exclude_none=True) if hasattr(item, "model_dump") else item
                name = obj.get("type", "message") if isinstance(obj, dict) else "message"
                response = obj.get("response") if isinstance(obj, dict) else None
                if isinstance(response, dict) and "id" in response:  # created, in_progress, completed, ...
                    response["id"] = _opaque_id(response["id"])
                yield f"event: {name}\n".encode() + b"data: " + orjson.dumps(obj) + b"\n\n"
        except UpstreamFailure:
            raise
        except Exception as e:
            raise _failure(e) from None

    async def aclose(self) -> None:
        await _close_quietly(self._stream)


# what litellm adds to OpenAI's chat shapes (a completion, its choices' messages; a chunk, its choices' deltas)
_LITELLM_ONLY = ("provider_specific_fields", "citations")


def _drop_litellm_keys(d: Any) -> None:
    if isinstance(d, dict):
        for k in _LITELLM_ONLY:
            d.pop(k, None)


def _drop_nulls(usage: Any) -> None:
    """litellm's usage has keys of its own, null unless the provider said something (iterations, speed, ...)."""
    if isinstance(usage, dict):
        for k in [k for k, v in usage.items() if v is None]:
            del usage[k]


def _openai_completion(obj: dict) -> dict:
    """A translated chat completion in OpenAI's shape: without litellm's own keys."""
    _drop_litellm_keys(obj)
    _drop_nulls(obj.get("usage"))
    for c in obj.get("choices") or ():
        _drop_litellm_keys(c.get("message") if isinstance(c, dict) else None)
    return obj


def _openai_chunks(obj: dict) -> tuple[dict, ...]:
    """A translated stream chunk in OpenAI's shape: without litellm's own keys, and usage on a chunk of its own
    with `choices: []` (litellm gives it a stub choice after the finish, or puts it on a chunk with content), which
    the proxy relays only to a client that asked for it (`stream_options.include_usage`)."""
    _drop_litellm_keys(obj)
    choices = obj.get("choices") or ()
    stub = True
    for c in choices:
        delta = c.get("delta") if isinstance(c, dict) else None
        _drop_litellm_keys(delta)
        if stub and (not isinstance(c, dict) or c.get("finish_reason") is not None
                     or (isinstance(delta, dict) and any(v is not None for v in delta.values()))):
            stub = False
    usage = obj.get("usage")
    if not usage:
        if "usage" in obj:
            del obj["usage"]
        return (obj,)
    _drop_nulls(usage)
    if stub:
        obj["choices"] = []
        return (obj,)
    rest = {k: v for k, v in obj.items() if k != "usage"}
    return rest, {**obj, "choices": []}


class _LiteLLMStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                for obj in _openai_chunks(chunk.model_dump()):
                    yield b"data: " + orjson.dumps(obj) + b"\n\n"
        except Exception as e:
            raise _failure(e) from None
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        await _close_quietly(self._stream)
