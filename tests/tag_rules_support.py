"""Helpers for the tag rule tests (no tests here): the judge double behind the real gateway, production calls driven
through it with the openai SDK, datasets of those calls, and the seed 002 evaluator."""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import orjson
import yaml

from gateway.providers import HandlerProvider, UpstreamCall
from tests.gateway_fixture import KEYS

MARKER_RE = re.compile(r"ticket-[0-9a-f]{8}-\d+")
NEUTRAL = {"user_sentiment": "neutral", "expected_helpfulness": 4, "confidence_score": 0.9}
JUDGE_MODEL = {"name": "judge", "provider": "judge-double", "model": "judge-1"}


class JudgeDouble:
    """A deterministic judge: the answer for a conversation is `answers[its first ticket marker]` (a dict of field
    values, or raw text to send as is), else NEUTRAL. Every prompt it was sent is kept in `prompts`."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.prompts: list[dict] = []
        self.provider = HandlerProvider(self)

    def __call__(self, call: UpstreamCall) -> dict:
        self.prompts.append(call.payload)
        user = call.payload["messages"][-1]["content"]
        markers = MARKER_RE.findall(user)
        answer = self.answers.get(markers[0], NEUTRAL) if markers else NEUTRAL
        text = answer if isinstance(answer, str) else orjson.dumps(answer).decode()
        return {"id": "chatcmpl-judge", "object": "chat.completion", "created": 1, "model": "judge-1",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}}

    def markers_seen(self) -> list[list[str]]:
        """The markers of each prompt in order of first appearance (the upstream echoes each user message)."""
        return [list(dict.fromkeys(MARKER_RE.findall(p["messages"][-1]["content"]))) for p in self.prompts]


class Traffic:
    """Production calls through the gateway as `customer` (the platform key may set it), tagged run=<run>."""

    def __init__(self, gw: Any, run: str) -> None:
        self.gw, self.run = gw, run
        self.client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["platform"], max_retries=0)
        self.n = 0

    def marker(self) -> str:
        self.n += 1
        return f"ticket-{self.run[:8]}-{self.n}"

    def call(self, customer: str, text: str = "", *, session: str | None = None, via: str = "header",
             key: str | None = None) -> tuple[str, str]:
        """(trace id, marker) of one recorded call whose user message carries a fresh marker."""
        m = self.marker()
        headers = {"x-tagway-tags": f"run={self.run}"}
        kwargs: dict[str, Any] = {}
        if key is None:
            headers["x-tagway-customer"] = customer
        if session and via == "header":
            headers["x-tagway-session-id"] = session
        elif session:
            kwargs["metadata"] = {"session_id": session}
        client = self.client if key is None else openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key,
                                                                max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=[{"role": "user", "content": f"{m}: {text}"}], extra_headers=headers, **kwargs)
        return raw.headers["x-tagway-trace-id"], m

    def flush(self, store: Any, trace_ids: list[str], timeout: float = 15.0) -> None:
        """Wait until every call is in llm_calls."""
        assert self.gw.recorder.force_flush()
        deadline = time.monotonic() + timeout
        while True:
            n = store.query("SELECT uniqExact(trace_id) AS n FROM llm_calls WHERE trace_id IN {ids:Array(String)}",
                            {"ids": trace_ids})[0]["n"]
            if n == len(set(trace_ids)) or time.monotonic() > deadline:
                assert n == len(set(trace_ids)), f"{n} of {len(trace_ids)} calls recorded"
                return
            time.sleep(0.05)


def seed_evaluator(path: Path, name: str, *, mode: str = "message", rules: list | None = None, **extra: Any) -> Path:
    """The seed 002 example: the Evaluators page's output schema and its three tag rules."""
    doc = {"name": name, "mode": mode, "type": "llm_judge", "model": "judge",
           "rubric": "Judge the user's sentiment, how helpful the answer will be, and how sure you are.",
           "output": {"user_sentiment": {"type": "choices", "choices": ["positive", "neutral", "negative"],
                                         "rubric": "The user's sentiment"},
                      "expected_helpfulness": {"type": "integer", "min": 1, "max": 5,
                                               "rubric": "How helpful the answer is expected to be"},
                      "confidence_score": {"type": "float", "min": 0.0, "max": 1.0,
                                           "rubric": "How confident you are in this evaluation"}},
           "tag_rules": rules if rules is not None else [
               {"field": "user_sentiment", "tag": "negative-sentiment", "equals": "negative"},
               {"field": "expected_helpfulness", "tag": "low-helpfulness", "range": "1..2"},
               {"field": "confidence_score", "tag": "low-confidence", "range": [0.0, 0.4]}],
           **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
