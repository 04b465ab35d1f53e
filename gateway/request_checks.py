"""What the gateway checks in a request body before forwarding it: JSON object, the fields each operation needs,
and the types of the parameters it reads itself. Ranges are the upstream's business. Pure; raises GatewayError."""
from __future__ import annotations

import orjson

from .errors import bad_request

__all__ = ["parse_object", "requested_model", "check_request", "stream_flag"]

_INT_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def parse_object(body: bytes) -> dict:
    if not body:
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if "UTF-8" in str(e) or "utf-8" in str(e):
            raise bad_request("The request body is not valid UTF-8.", code="invalid_encoding") from None
        raise bad_request(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return payload


def requested_model(p: dict, max_chars: int) -> str:
    model = p.get("model")
    if model is not None and not isinstance(model, str):  # the type is wrong, not the model missing
        raise bad_request("model must be a string.", code="invalid_type", param="model")
    if not model:
        raise bad_request("You must provide a model parameter.", code="missing_model", param="model")
    if len(model) > max_chars:  # cutting a model name would route (and record) a different model: refuse
        raise bad_request(f"model is {len(model)} characters long; at most {max_chars} are accepted.",
                          code="model_too_long", param="model")
    return model


def model_of(operation: str, p: dict, max_chars: int) -> str:
    """The requested model; "" for a Responses call without one (its stored `prompt` names the model)."""
    if operation == "responses" and p.get("model") is None:
        return ""
    return requested_model(p, max_chars)


def check_request(operation: str, p: dict) -> None:
    if operation == "chat":
        _check_message_list(p)
    elif operation == "text_completion":
        if not isinstance(p.get("prompt"), (str, list)):
            raise bad_request("prompt must be a string or an array.", code="invalid_prompt", param="prompt")
    elif operation == "responses":
        _check_responses(p)
    elif operation == "messages":
        _check_messages(p)
    elif operation == "embeddings":
        if not isinstance(p.get("input"), (str, list)) or p.get("input") in ("", []):
            raise bad_request("input must be a non-empty string or array.", code="invalid_input", param="input")
    for name in ("temperature", "top_p"):
        v = p.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad_request(f"{name} must be a number.", code="invalid_type", param=name)
    # types only: the ranges are the upstream's (max_tokens: 0 with echo: true is how prompts are scored)
    for name in _INT_PARAMS:
        v = p.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad_request(f"{name} must be an integer.", code="invalid_type", param=name)


def stream_flag(operation: str, p: dict) -> bool:
    stream = p.get("stream", False)
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean.", code="invalid_type", param="stream")
    if stream and operation == "embeddings":
        raise bad_request("Embeddings cannot be streamed.", param="stream")
    return stream


def _check_responses(p: dict) -> None:
    if "input" in p and not isinstance(p["input"], (str, list)):
        raise bad_request("input must be a string or an array of items.", code="invalid_input", param="input")
    if p.get("instructions") is not None and not isinstance(p["instructions"], str):
        raise bad_request("instructions must be a string.", code="invalid_type", param="instructions")
    if isinstance(p.get("input"), list):
        for i, item in enumerate(p["input"]):
            if not isinstance(item, dict):
                raise bad_request(f"input[{i}] must be an object.", code="invalid_input", param=f"input[{i}]")


def _check_message_list(p: dict) -> None:
    """Chat completions and Anthropic messages: a non-empty array of objects with a role."""
    msgs = p.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty array.", code="invalid_messages", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a role.", code="invalid_messages",
                              param=f"messages[{i}]")


def _check_messages(p: dict) -> None:
    _check_message_list(p)
    if p.get("system") is not None and not isinstance(p["system"], (str, list)):
        raise bad_request("system must be a string or an array of blocks.", code="invalid_type", param="system")
