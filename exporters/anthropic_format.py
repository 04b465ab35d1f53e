"""Anthropic's Messages API, in both directions: a request's `system` and `messages` (content blocks) and a
message's `content` to the GenAI semantic-convention messages (for the record), and back from recorded chat-shaped
messages to a Messages request and from a Messages answer to a chat-shaped message (for replay). Pure functions.

Mapping: `text` blocks are text parts; `image` blocks with a URL source are uri parts, other sources are kept
verbatim; `tool_use` blocks are assistant `tool_call` parts; `tool_result` blocks (which Anthropic puts in user
turns) become `tool` messages with a `tool_call_response`; `thinking` blocks are `reasoning` parts.
"""
from __future__ import annotations

from typing import Any

import orjson

from .genai_messages import from_semconv_input

__all__ = ["input_to_semconv", "output_to_semconv", "request_from_chat", "answer_as_chat", "TERMINAL_EVENTS",
           "FINISH_REASONS"]

TERMINAL_EVENTS = frozenset({"message_stop", "error"})
# Anthropic stop reasons in the words the other APIs use (the semconv leaves them free; one vocabulary is easier)
FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _block_part(b: Any) -> dict:
    if not isinstance(b, dict):
        return {"type": "text", "content": str(b)}
    t = b.get("type")
    if t == "text":
        return {"type": "text", "content": str(b.get("text", ""))}
    if t == "tool_use":
        return {"type": "tool_call", "id": b.get("id", ""), "name": b.get("name", ""), "arguments": b.get("input")}
    if t in ("thinking", "redacted_thinking"):
        return {"type": "reasoning", "content": str(b.get("thinking", ""))}
    src = b.get("source")
    if t == "image" and isinstance(src, dict) and src.get("type") == "url":
        return {"type": "uri", "modality": "image", "uri": src.get("url", "")}
    return {"type": "anthropic_block", "block": b}


def _tool_result(b: dict) -> dict:
    content = b.get("content")
    if isinstance(content, list):
        content = "".join(str(x.get("text", "")) for x in content if isinstance(x, dict) and x.get("type") == "text")
    return {"role": "tool", "parts": [{"type": "tool_call_response", "id": b.get("tool_use_id", ""),
                                       "response": _text(content if content is not None else "")}]}


def input_to_semconv(payload: dict) -> tuple[list[dict], list[dict]]:
    """A Messages request -> (system instructions parts, input messages)."""
    system_field = payload.get("system")
    if isinstance(system_field, str):
        system = [{"type": "text", "content": system_field}] if system_field else []
    else:
        system = [_block_part(b) for b in system_field] if isinstance(system_field, list) else []
    out: list[dict] = []
    for m in payload.get("messages") or []:
        if not isinstance(m, dict):
            continue
        role, content = str(m.get("role") or "user"), m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "parts": [{"type": "text", "content": content}]})
            continue
        parts: list[dict] = []
        for b in content if isinstance(content, list) else []:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                out.append(_tool_result(b))
            else:
                parts.append(_block_part(b))
        if parts:
            out.append({"role": role, "parts": parts})
    return system, out


def output_to_semconv(message: dict) -> list[dict]:
    parts = [_block_part(b) for b in message.get("content") or []]
    reason = message.get("stop_reason") or ""
    return [{"role": "assistant", "parts": parts, "finish_reason": FINISH_REASONS.get(reason, reason)}]


# -- replay --------------------------------------------------------------------------------------------------------

def _blocks(content: Any) -> Any:
    if not isinstance(content, list):
        return content if content is not None else ""
    out = []
    for p in content:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "text":
            out.append({"type": "text", "text": p.get("text", "")})
        elif p.get("type") == "image_url":
            url = p.get("image_url")
            out.append({"type": "image", "source": {"type": "url",
                                                     "url": url.get("url", "") if isinstance(url, dict) else url}})
        else:
            out.append(p.get("block", p) if p.get("type") == "anthropic_block" else p)
    return out


def request_from_chat(messages: list[dict], params: dict, api_mark: str) -> dict:
    """Chat-shaped messages + recorded params -> a Messages request body (without model)."""
    body = {k: v for k, v in params.items() if k != api_mark}
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    if system:
        body["system"] = "\n\n".join(_text(m.get("content")) if not isinstance(m.get("content"), list) else
                                     "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
                                     for m in system)
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            continue
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": m.get("tool_call_id", ""), "content": _text(m.get("content", ""))}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
            continue
        content = _blocks(m.get("content"))
        calls = m.get("tool_calls") or []
        if calls:
            blocks = ([{"type": "text", "text": content}] if isinstance(content, str) and content else
                      content if isinstance(content, list) else [])
            for tc in calls:
                fn = tc.get("function") or {}
                args = fn.get("arguments") or "{}"
                try:
                    args = orjson.loads(args) if isinstance(args, str) else args
                except orjson.JSONDecodeError:
                    args = {"_raw": args}
                blocks.append({"type": "tool_use", "id": tc.get("id", ""), "name": fn.get("name", ""), "input": args})
            content = blocks
        out.append({"role": role or "user", "content": content})
    body["messages"] = out
    body.setdefault("max_tokens", 1024)  # required by the API; a recorded call always has it
    return body


def answer_as_chat(message: dict) -> tuple[dict, str, int, int]:
    msgs = from_semconv_input(None, output_to_semconv(message))
    msg = msgs[0] if msgs else {"role": "assistant", "content": ""}
    text = "".join(str(b.get("text", "")) for b in message.get("content") or []
                   if isinstance(b, dict) and b.get("type") == "text")
    usage = message.get("usage") or {}
    return msg, text, int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
