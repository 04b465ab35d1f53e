"""The OpenAI Responses API, in both directions: a request's `instructions` and `input` items and a response's
`output` items to the GenAI semantic-convention messages (for the record), and back from recorded (chat-shaped)
messages to a Responses request and from a Responses answer to a chat-shaped message (for replay, which re-sends a
recorded Responses call as a Responses call). Pure functions, no I/O; the chat direction is genai_messages.py.

Mapping: message items keep their role (system/developer ones before the conversation become system instructions,
as for chat; later ones stay in the input, in their place);
`function_call` items are assistant `tool_call` parts (id = call_id); `function_call_output` items are `tool`
messages with a `tool_call_response`; `reasoning` items are `reasoning` parts (their summary text); any other item
(web search, file search, MCP, ...) is kept as a part of its own type so nothing said is lost from the record.
"""
from __future__ import annotations

from typing import Any

import orjson

from .genai_messages import from_semconv_input

__all__ = ["API_MARK", "input_to_semconv", "output_to_semconv", "finish_reason", "messages_from_record",
           "request_from_chat", "answer_as_chat", "TERMINAL_EVENTS"]

# the key in a recorded call's request_params that says which API it spoke (absent: chat completions), so replay
# re-sends it the same way
API_MARK = "tagway.api"
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "error"})
_TEXT_PARTS = ("input_text", "output_text", "text")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return orjson.dumps(content).decode()


def _content_parts(content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if not isinstance(content, list):
        return [{"type": "text", "content": _text(content)}]
    parts: list[dict] = []
    for p in content:
        if not isinstance(p, dict):
            parts.append({"type": "text", "content": str(p)})
        elif p.get("type") in _TEXT_PARTS:
            parts.append({"type": "text", "content": str(p.get("text", ""))})
        elif p.get("type") == "refusal":
            parts.append({"type": "text", "content": str(p.get("refusal", ""))})
        elif p.get("type") == "input_image" and isinstance(p.get("image_url"), str):
            part = {"type": "uri", "modality": "image", "uri": p["image_url"]}
            if p.get("detail") is not None:  # low/high/auto: what replay re-sends
                part["detail"] = p["detail"]
            parts.append(part)
        else:  # files, images by file id, audio: kept verbatim so replay can send them back
            parts.append({"type": "openai_part", "part": p})
    return parts


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str) and raw:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw  # models do emit invalid JSON arguments; record what was said
    return raw


def _item_parts(item: dict) -> tuple[str, list[dict]]:
    """(role, parts) of one non-message item."""
    t = item.get("type")
    if t == "function_call":
        return "assistant", [{"type": "tool_call", "id": item.get("call_id", ""), "name": item.get("name", ""),
                              "arguments": _arguments(item.get("arguments", ""))}]
    if t == "function_call_output":
        return "tool", [{"type": "tool_call_response", "id": item.get("call_id", ""),
                         "response": _text(item.get("output", ""))}]
    if t == "reasoning":
        summary = item.get("summary") or []
        text = "\n".join(str(s.get("text", "")) for s in summary if isinstance(s, dict))
        return "assistant", [{"type": "reasoning", "content": text}]
    return "assistant", [{"type": str(t or "item"), "item": item}]


def input_to_semconv(payload: dict) -> tuple[list[dict], list[dict]]:
    """A Responses request -> (system instructions parts, input messages). `instructions` is a part without a role;
    a system/developer input item before the conversation is a part with its role; one after it stays an input
    message in its place."""
    system: list[dict] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str) and instructions:
        system.append({"type": "text", "content": instructions})
    items = payload.get("input")
    if isinstance(items, str):
        return system, [{"role": "user", "parts": [{"type": "text", "content": items}]}]
    out: list[dict] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("type", "message") == "message" and "role" in item:
            role = str(item.get("role") or "user")
            parts = _content_parts(item.get("content"))
            if role in ("system", "developer") and not out:
                system += [{**p, "role": role} for p in parts]
                continue
            out.append({"role": role, "parts": parts})
            continue
        role, parts = _item_parts(item)
        if out and role == "assistant" and out[-1]["role"] == "assistant" and item.get("type") == "function_call":
            out[-1]["parts"] += parts  # parallel tool calls: one assistant turn, as in chat
        else:
            out.append({"role": role, "parts": parts})
    return system, out


def finish_reason(response: dict) -> str:
    status = response.get("status")
    if status == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason") or "incomplete"
        return "length" if reason == "max_output_tokens" else str(reason)
    if status == "failed":
        return "error"
    output = response.get("output") or []
    if any(isinstance(i, dict) and i.get("type") == "function_call" for i in output):
        return "tool_calls"
    return "stop" if status in ("completed", None) else str(status)


def output_to_semconv(response: dict) -> list[dict]:
    """A response object's output items -> one assistant output message."""
    parts: list[dict] = []
    for item in response.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            parts += _content_parts(item.get("content"))
        else:
            parts += _item_parts(item)[1]
    return [{"role": "assistant", "parts": parts, "finish_reason": finish_reason(response)}]


# -- replay: recorded (chat-shaped) messages back to a Responses request, and the answer back to chat shape -------

def _input_content(content: Any, role: str) -> Any:
    if not isinstance(content, list):
        return content if content is not None else ""
    kind = "output_text" if role == "assistant" else "input_text"
    out = []
    for p in content:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "text":
            out.append({"type": kind, "text": p.get("text", "")})
        elif p.get("type") == "image_url":
            url = p.get("image_url")
            out.append({"type": "input_image", "image_url": url.get("url", "") if isinstance(url, dict) else url,
                        "detail": (url.get("detail") if isinstance(url, dict) else None) or "auto"})
        else:
            out.append(p)
    return out


def messages_from_record(system: list[dict], inputs: list[dict]) -> list[dict]:
    """A recorded Responses call's system instructions and input messages -> chat-shaped messages for replay
    (from_semconv_input): `instructions` first, then the input items in their order. A system/developer message
    that was an input item (its recorded parts carry their role), not the instructions, keeps the API's
    `"type": "message"`, so `request_from_chat` sends it back as an item, not as `instructions`."""
    instructions = [p for p in system if isinstance(p, dict) and "role" not in p]
    items = [p for p in system if isinstance(p, dict) and "role" in p]
    out = from_semconv_input(instructions, [])
    for m in from_semconv_input(items, inputs):
        if m.get("role") in ("system", "developer"):
            m["type"] = "message"
        out.append(m)
    return out


def request_from_chat(messages: list[dict], params: dict) -> dict:
    """Chat-shaped messages (as messages_from_record rebuilds them) + recorded params -> a Responses request body
    (without model). The leading system/developer messages that were not input items (`"type": "message"`), such
    as the instructions or a candidate's prompt, become `instructions`; every other message is an input item, in
    its order and role."""
    body = {k: v for k, v in params.items() if k != API_MARK}
    lead = 0
    while (lead < len(messages) and messages[lead].get("role") in ("system", "developer")
           and "type" not in messages[lead]):
        lead += 1
    system = "\n\n".join(_text(m.get("content")) if not isinstance(m.get("content"), list) else
                         "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
                         for m in messages[:lead])
    if system:
        body["instructions"] = system
    items: list[dict] = []
    for m in messages[lead:]:
        role = m.get("role", "user")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": m.get("tool_call_id", ""),
                          "output": _text(m.get("content", ""))})
            continue
        content = m.get("content")
        if content not in (None, "", []):
            items.append({"role": role, "content": _input_content(content, role)})
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") or {}
            items.append({"type": "function_call", "call_id": tc.get("id", ""), "name": fn.get("name", ""),
                          "arguments": fn.get("arguments", "")})
    body["input"] = items
    return body


def answer_as_chat(response: dict) -> tuple[dict, str, int, int]:
    """A Responses answer -> (chat-shaped assistant message with tool_calls, its text, input and output tokens)."""
    messages = from_semconv_input(None, output_to_semconv(response))
    message = messages[0] if messages else {"role": "assistant", "content": ""}
    content = message.get("content")
    text = content if isinstance(content, str) else "".join(
        p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "text")
    usage = response.get("usage") or {}
    return message, text or "", int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
