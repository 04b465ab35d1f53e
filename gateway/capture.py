"""What a call said, in the GenAI semantic conventions' message shapes, for the record: the input (from the request
body), the output (from a whole response, or reassembled from a stream). Pure; redaction is applied by the caller's
`Redactor`."""
from __future__ import annotations

from typing import Any

import orjson

from exporters import anthropic_format, responses_format
from exporters.genai_messages import choices_to_semconv_output, to_semconv_input

from .redact import Redactor
from .telemetry import CallRecord

__all__ = ["capture_input", "output_messages", "StreamAccumulator"]

# body fields that are request parameters worth keeping for replay (everything except content and plumbing)
_NOT_PARAMS = frozenset({"messages", "model", "stream", "stream_options", "metadata", "prompt", "input", "user"})
# the APIs that are not chat completions: their content, and the mark replay reads to re-send them the same way
_WIRE_INPUT = {"responses": responses_format.input_to_semconv, "messages": anthropic_format.input_to_semconv}
_WIRE_OUTPUT = {"responses": responses_format.output_to_semconv, "messages": anthropic_format.output_to_semconv}
_WIRE_NOT_PARAMS = _NOT_PARAMS | {"instructions", "system"}


def capture_input(operation: str, payload: dict, rec: CallRecord, redactor: Redactor) -> None:
    """The request's messages (system instructions apart) and parameters, redacted, onto the record as JSON text."""
    if operation == "chat":
        messages = payload.get("messages")
        system, inp = to_semconv_input(messages if isinstance(messages, list) else [])
        rec.system_instructions = redactor.json(system) if system else None
        rec.input_messages = redactor.json(inp)
    elif operation in _WIRE_INPUT:
        system, inp = _WIRE_INPUT[operation](payload)
        rec.system_instructions = redactor.json(system) if system else None
        rec.input_messages = redactor.json(inp)
        params = {k: v for k, v in payload.items() if k not in _WIRE_NOT_PARAMS}
        rec.request_params = redactor.json({**params, responses_format.API_MARK: operation})
        return
    else:
        content = payload.get("prompt" if operation == "text_completion" else "input")
        texts = content if isinstance(content, list) else [content]
        parts = [{"type": "text", "content": t if isinstance(t, str) else orjson.dumps(t).decode()} for t in texts]
        rec.input_messages = redactor.json([{"role": "user", "parts": parts}])
    params = {k: v for k, v in payload.items() if k not in _NOT_PARAMS}
    rec.request_params = redactor.json(params) if params else None


def output_messages(operation: str, choices: Any) -> list[dict] | None:
    """A whole response's choices as output messages (embeddings: vectors are not worth recording); for the APIs
    that are not chat completions, their answer (a dict), or their stream's reader."""
    if operation in _WIRE_OUTPUT:
        return choices.output() if hasattr(choices, "output") else _WIRE_OUTPUT[operation](choices)
    if operation == "chat":
        return choices_to_semconv_output([c for c in choices if isinstance(c, dict)])
    if operation == "text_completion":
        return [{"role": "assistant", "parts": [{"type": "text", "content": str(c.get("text") or "")}],
                 "finish_reason": c.get("finish_reason") or ""} for c in choices if isinstance(c, dict)]
    return None


class StreamAccumulator:
    """Reassembles what a stream said (for the record), by choice index. Without capture it keeps only the model,
    id, finish reasons and how many characters were generated (a stream cut short is billed for them:
    gateway/usage_estimate.py)."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.model = ""
        self.id = ""
        self.text: dict[int, list[str]] = {}
        self.tools: dict[int, dict[int, dict]] = {}
        self.finish: dict[int, str] = {}
        self.chars = 0  # generated text and tool-call arguments, every choice

    def add(self, obj: dict) -> None:
        if not self.model and obj.get("model"):
            self.model, self.id = str(obj.get("model")), str(obj.get("id") or "")
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            i = c.get("index", 0)
            if c.get("finish_reason"):
                self.finish[i] = str(c["finish_reason"])
            delta = c.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if content:
                    content = str(content)
                    self.chars += len(content)
                    if self.capture:
                        self.text.setdefault(i, []).append(content)
                for tc in delta.get("tool_calls") or ():
                    if not isinstance(tc, dict):
                        continue
                    fn = tc.get("function")
                    fn = fn if isinstance(fn, dict) else {}
                    name, args = str(fn.get("name") or ""), str(fn.get("arguments") or "")
                    self.chars += len(name) + len(args)
                    if not self.capture:
                        continue
                    slot = self.tools.setdefault(i, {}).setdefault(tc.get("index", 0), {
                        "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    if tc.get("id"):
                        slot["id"] = tc["id"]
                    slot["function"]["name"] += name
                    slot["function"]["arguments"] += args
            elif "text" in c:  # /v1/completions streams
                text = str(c.get("text") or "")
                self.chars += len(text)
                if self.capture:
                    self.text.setdefault(i, []).append(text)

    def finish_reasons(self) -> list[str]:
        return [self.finish[i] for i in sorted(self.finish)]

    def output(self) -> list[dict]:
        indexes = sorted(set(self.text) | set(self.tools) | set(self.finish))
        choices = [{"index": i, "finish_reason": self.finish.get(i, ""),
                    "message": {"role": "assistant", "content": "".join(self.text.get(i, [])) or None,
                                "tool_calls": [self.tools[i][k] for k in sorted(self.tools.get(i, {}))] or None}}
                   for i in indexes]
        return choices_to_semconv_output(choices)
