"""Token counts for a stream that ended early (the client hung up, the upstream cut it): it never got to its usage
chunk, yet the provider bills the prompt and what it generated, and without counts the call cost nothing in stats
and budgets. The record then carries an estimate, marked as one (`tagway.usage.estimated`).

The estimate is OpenAI's rule of thumb, ~4 characters a token of English text, plus the chat format's few tokens a
message. A tokenizer would be closer (tiktoken, on the files litellm ships), but holds ~75-115 MB per process for a
rare path; the estimate's error (~10-25% on prose, more on code or CJK) is small beside the zero it replaces.
"""
from __future__ import annotations

import math
from typing import Any

import orjson

__all__ = ["CHARS_PER_TOKEN", "tokens_of_chars", "estimate_prompt_tokens"]

CHARS_PER_TOKEN = 4
_PER_MESSAGE = 3  # each chat message's role and separators (and the reply's primer)
# ids and inline data, not text the model reads as tokens (Anthropic's image `source`, a Responses `file_data`)
_NOT_TEXT = frozenset({"type", "role", "id", "tool_call_id", "call_id", "tool_use_id", "image_url", "input_audio",
                       "file", "file_id", "file_data", "source", "cache_control"})


def tokens_of_chars(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _chars(value: Any) -> int:
    """Characters of every string in a message's content (text parts, tool calls' names and arguments), not its
    keys, ids or inline data (an image's base64 is billed by its size in pixels, not counted here). Iterative: a
    deeply nested body costs no recursion."""
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            n += 0 if v.startswith("data:") else len(v)
        elif isinstance(v, dict):
            stack += [x for k, x in v.items() if k not in _NOT_TEXT]
        elif isinstance(v, list):
            stack += v
    return n


def estimate_prompt_tokens(payload: dict, operation: str = "chat") -> int:
    """A request's prompt tokens: its messages (chat's; Anthropic's, with its `system`; a Responses call's input
    items, with its `instructions`) and tool definitions, or a completion's prompt."""
    if operation == "responses":
        items = payload.get("input")
        messages = [items] if isinstance(items, str) else items if isinstance(items, list) else []
        instructions = payload.get("instructions")
    elif operation == "text_completion":
        return tokens_of_chars(_chars(payload.get("prompt")))
    else:
        messages, instructions = payload.get("messages"), payload.get("system")  # system: Anthropic's
        messages = messages if isinstance(messages, list) else []
    tools = payload.get("tools")
    tool_chars = len(orjson.dumps(tools)) if isinstance(tools, list) and tools else 0  # schemas' keys count too
    n = len(messages) + (1 if instructions else 0)
    return tokens_of_chars(_chars(messages) + _chars(instructions) + tool_chars) + _PER_MESSAGE * (n + 1)
