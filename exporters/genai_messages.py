"""Convert between OpenAI chat messages and the OpenTelemetry GenAI semantic-convention message shape.

Spans carry `gen_ai.input.messages`, `gen_ai.output.messages` and `gen_ai.system_instructions` as JSON in the
semconv "parts" shape (so OTel tooling renders them); replay converts them back to OpenAI messages to re-run a
recorded call. Both directions live here so they stay inverse to each other. Pure functions, no I/O.
"""
from __future__ import annotations

from typing import Any

import orjson

__all__ = ["to_semconv_input", "from_semconv_input", "choices_to_semconv_output", "output_text", "loads_or_empty"]


def _content_to_parts(content: Any) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if not isinstance(content, list):
        return [{"type": "text", "content": orjson.dumps(content).decode()}]
    parts: list[dict] = []
    if isinstance(content, list):
        for p in content:
            if not isinstance(p, dict):
                parts.append({"type": "text", "content": str(p)})
            elif p.get("type") == "text":
                parts.append({"type": "text", "content": p.get("text", "")})
            elif p.get("type") == "image_url":
                img = p.get("image_url", {})
                part = {"type": "uri", "modality": "image", "uri": img.get("url", "") if isinstance(img, dict) else img}
                if isinstance(img, dict) and img.get("detail") is not None:  # low/high/auto: what replay re-sends
                    part["detail"] = img["detail"]
                parts.append(part)
            else:  # audio, file, refusal...: kept verbatim so replay can send it back
                parts.append({"type": "openai_part", "part": p})
    return parts


def _parts_to_content(parts: list[dict]) -> Any:
    if all(p.get("type") == "text" for p in parts):
        if len(parts) == 1:
            return parts[0].get("content", "")
        if not parts:
            return None
    out: list[dict] = []
    for p in parts:
        t = p.get("type")
        if t == "text":
            out.append({"type": "text", "text": p.get("content", "")})
        elif t == "uri":
            img = {"url": p.get("uri", "")}
            if p.get("detail") is not None:
                img["detail"] = p["detail"]
            out.append({"type": "image_url", "image_url": img})
        elif t == "openai_part":
            out.append(p.get("part", {}))
    return out


def _as_list(x: Any) -> list:
    return x if isinstance(x, list) else []


def _tool_call_part(tc: dict) -> dict:
    fn = tc.get("function")
    fn = fn if isinstance(fn, dict) else {}  # clients do send malformed tool calls; record what can be read
    args: Any = fn.get("arguments", "")
    try:
        args = orjson.loads(args) if isinstance(args, str) and args else args
    except orjson.JSONDecodeError:
        pass  # keep the raw string: models do emit invalid JSON arguments, and that is worth recording
    return {"type": "tool_call", "id": tc.get("id", ""), "name": fn.get("name", ""), "arguments": args}


def to_semconv_input(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """OpenAI `messages` -> (system_instructions parts, input messages). The system/developer messages that open
    the conversation become its system instructions (their role kept on each part so the conversion can be undone);
    one that comes later is part of the chat history and stays in the input messages where it was, with its role
    ("instructions that are part of the chat history SHOULD be recorded in gen_ai.input.messages"), so a replay
    sends it back in its place."""
    system: list[dict] = []
    out: list[dict] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        role = m.get("role", "user")
        if role in ("system", "developer") and not out:
            for p in _content_to_parts(m.get("content")):
                system.append({**p, "role": role} if role != "system" else p)
            continue
        parts = _content_to_parts(m.get("content"))
        if role == "assistant":
            parts += [_tool_call_part(tc) for tc in _as_list(m.get("tool_calls")) if isinstance(tc, dict)]
        if role == "tool":
            content = m.get("content")
            text = content if isinstance(content, str) else orjson.dumps(content).decode()
            parts = [{"type": "tool_call_response", "id": m.get("tool_call_id", ""), "response": text}]
        msg: dict[str, Any] = {"role": role, "parts": parts}
        if m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return system, out


def from_semconv_input(system: list[dict] | None, messages: list[dict] | None) -> list[dict]:
    """Inverse of `to_semconv_input`: rebuild OpenAI chat messages (the system instructions first, then the
    input messages in their recorded order and roles)."""
    out: list[dict] = []
    for p in system or []:
        role = p.get("role", "system")
        part = {k: v for k, v in p.items() if k != "role"}
        out.append({"role": role, "content": _parts_to_content([part])})
    for m in messages or []:
        role = m.get("role", "user")
        parts = m.get("parts") or []
        if role == "tool":
            resp = next((p for p in parts if p.get("type") == "tool_call_response"), {})
            out.append({"role": "tool", "tool_call_id": resp.get("id", ""), "content": resp.get("response", "")})
            continue
        calls = [p for p in parts if p.get("type") == "tool_call"]
        rest = [p for p in parts if p.get("type") != "tool_call"]
        msg: dict[str, Any] = {"role": role, "content": _parts_to_content(rest)}
        if calls:
            msg["tool_calls"] = [
                {"id": c.get("id", ""), "type": "function",
                 "function": {"name": c.get("name", ""),
                              "arguments": c["arguments"] if isinstance(c.get("arguments"), str)
                              else orjson.dumps(c.get("arguments")).decode()}}
                for c in calls
            ]
        if m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def choices_to_semconv_output(choices: list[dict]) -> list[dict]:
    """OpenAI response `choices` (each with `message` and `finish_reason`) -> semconv output messages."""
    out = []
    for c in choices:
        msg = c.get("message")
        msg = msg if isinstance(msg, dict) else {}
        parts = _content_to_parts(msg.get("content"))
        parts += [_tool_call_part(tc) for tc in _as_list(msg.get("tool_calls")) if isinstance(tc, dict)]
        out.append({"role": msg.get("role") or "assistant", "parts": parts, "finish_reason": c.get("finish_reason") or ""})
    return out


def output_text(output_messages: list[dict] | None) -> str:
    """The text of the first output message (what most evaluators look at)."""
    if not output_messages:
        return ""
    return "".join(p.get("content", "") for p in output_messages[0].get("parts", []) if p.get("type") == "text")


def loads_or_empty(text: str | bytes | None) -> Any:
    """Parse a JSON attribute; an absent or empty one is []."""
    if not text:
        return []
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return []
