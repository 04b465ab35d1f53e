"""Realistic traffic and replays for the case board tests, made the way production makes them: the real gateway
(TagwayApp under uvicorn, recording into the session's chDB) in front of the test upstream (tests/upstream.py),
three tenants calling it through the real openai SDK (plain, streamed, tool calls and tool results, a fallback
after a 503, provider errors, an e-mail to redact, a huge prompt, markup in the text), then two runs of one replay
spec through the same gateway with `tagway replay run`: a candidate that answers like production, then one that
answers "WRONG" whenever a refund is mentioned (a regression on the refund segment, with flipped cases).
"""
from __future__ import annotations

import dataclasses
import os
import uuid

import orjson
import pytest
import yaml
from openai import OpenAI
from typer.testing import CliRunner

from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from replay.cli import replay_app
from tests.gateway_fixture import GatewayServer
from tests.upstream import Upstream

ADMIN_KEY = "tw-board-admin-0123456789abcdefghijklmn"
PLATFORM_KEY = "tw-board-platform-0123456789abcdefghij"
INTENTS = ("refund", "billing", "support")
XSS = '<img src=x onerror="document.title=\'pwned\'"><script>window.pwned=1</script>'
HUGE_CHARS = 40_000  # under the gateway's own per-string capture cap (50,000), over the page's 20,000


@dataclasses.dataclass
class Board:
    run: str  # tag.run on every production call
    customers: dict[str, str]  # short name -> customer
    keys: dict[str, str]  # short name -> tenant key
    url: str
    app: TagwayApp
    traces: dict[str, str]  # what -> trace id (fallback, tools, error, redacted, huge, xss, session, ...)
    runs: list[str]  # replay run ids, oldest first
    reports: list[dict]  # `tagway replay run --format json` of each run
    spec_name: str

    @property
    def where(self) -> str:
        return f"tag.run={self.run}"


def _config(upstream: Upstream, dsn: str, spool: str, customers: dict[str, str], keys: dict[str, str]) -> GatewayConfig:
    up = {"provider": "openai", "base_url": upstream.base_url, "api_key_env": "BOARD_UPSTREAM_KEY",
          "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}
    return GatewayConfig(
        models=[{"name": "gpt-prod", "model": "ok-prod", **up},
                {"name": "flaky", "model": "fail503-flaky", **up, "fallbacks": ["gpt-prod"]},
                {"name": "broken", "model": "fail500-broken", **up},
                {"name": "tools", "model": "tools-a", **up},
                {"name": "cand-good", "model": "ok-cand", **up},
                {"name": "cand-bad", "model": "refund-bad-cand", **up}],
        tenants=[{"customer": c, "keys": [{"id": f"{short}-key", "hash": hash_key(keys[short])}]}
                 for short, c in customers.items()]
        + [{"customer": "board-platform", "may_set_customer": True,
            "keys": [{"id": "platform", "hash": hash_key(PLATFORM_KEY)}]}],
        admin_key_hash=hash_key(ADMIN_KEY),
        storage={"dsn": dsn, "spool_dir": spool},
        recording={"batch_max_seconds": 0.05},
        taxonomy={"unknown": "keep"})


def _user_text(intent: str, i: int) -> str:
    if intent == "refund":  # every other refund question names the refund: those are the ones the bad candidate fails
        return f"Where is my refund for order {1000 + i}?" if i % 2 == 0 else f"I want my money back for order {1000 + i}"
    return f"{intent} question number {i}"


def seed_board(upstream: Upstream, dsn: str, spool: str, work_dir: str) -> tuple[Board, GatewayServer]:
    run = "b" + uuid.uuid4().hex[:8]
    customers = {short: f"{short}-{run}" for short in ("acme", "globex", "initech")}
    keys = {short: f"tw-board-{short}-{run}-0123456789abcdef" for short in customers}
    os.environ["BOARD_UPSTREAM_KEY"] = "sk-upstream-secret-should-never-leak"
    app = TagwayApp(_config(upstream, dsn, spool, customers, keys))
    server = GatewayServer(app).start()
    clients = {short: OpenAI(base_url=server.url + "/v1", api_key=k, max_retries=0) for short, k in keys.items()}
    traces: dict[str, str] = {}

    def call(short: str, intent: str, messages: list, *, model: str = "gpt-prod", tags: str = "", stream: bool = False,
             **kw) -> str:
        headers = {"x-tagway-intent": intent, "x-tagway-prompt-version": f"{intent}-v2",
                   "x-tagway-tags": f"run={run},region={'eu' if short != 'globex' else 'us'}" + (f",{tags}" if tags else "")}
        client = clients[short]
        try:
            if stream:
                with client.chat.completions.with_streaming_response.create(
                        model=model, messages=messages, stream=True, extra_headers=headers, **kw) as resp:
                    tid = resp.headers["x-tagway-trace-id"]
                    for _ in resp.iter_lines():
                        pass
                    return tid
            raw = client.chat.completions.with_raw_response.create(model=model, messages=messages,
                                                                    extra_headers=headers, **kw)
            return raw.headers["x-tagway-trace-id"]
        except Exception as e:  # an error answer still carries the trace id
            response = getattr(e, "response", None)
            assert response is not None, e
            return response.headers["x-tagway-trace-id"]

    system = {"role": "system", "content": "You are the support assistant. Be brief."}
    for short in customers:
        for intent in INTENTS:
            for i in range(8):
                call(short, intent, [system, {"role": "user", "content": _user_text(intent, i)}], stream=i % 4 == 3)
    traces["fallback"] = call("acme", "billing", [{"role": "user", "content": "fallback please"}], model="flaky")
    traces["error"] = call("globex", "support", [{"role": "user", "content": "this one breaks"}], model="broken")
    tool_msgs = [system, {"role": "user", "content": "What's the weather in Paris?"},
                 {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
                     "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                 {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 21, "sky": "clear"}'},
                 {"role": "user", "content": "And tomorrow?"}]
    traces["tools"] = call("acme", "support", tool_msgs, model="tools",
                           tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                               "type": "object", "properties": {"city": {"type": "string"}}}}}])
    traces["redacted"] = call("initech", "support", [{"role": "user", "content":
                                                      "Mail me at jane.doe@example.com about my invoice"}])
    traces["huge"] = call("initech", "support", [{"role": "user", "content": "long " + "x" * HUGE_CHARS + " end"}])
    traces["xss"] = call("globex", "support", [{"role": "user", "content": XSS}])
    traces["session"] = call("acme", "support", [{"role": "user", "content": "first turn"}], tags=f"session_id=s-{run}")
    traces["session2"] = call("acme", "support", [{"role": "user", "content": "second turn"}], tags=f"session_id=s-{run}")
    assert app.recorder.force_flush()

    spec_name = f"refund-check-{run}"
    runs, reports = [], []
    for i, model in enumerate(("cand-good", "cand-bad")):
        spec = os.path.join(work_dir, f"spec{i}.yaml")
        with open(spec, "w") as f:
            yaml.safe_dump({
                "name": spec_name,
                "slice": {"customer": list(customers.values()), "tags": {"run": run}, "since": "1h",
                          "segment_by": ["intent"], "where": ["model=gpt-prod"],
                          "sampling": {"min_per_segment": 24, "seed": 1}, "limit": 72},
                "candidates": [{"name": "cand", "model": model, "params": {"temperature": 0}}],
                "evaluators": [{"type": "not-icontains", "value": "WRONG"}],
                "gating": {"alpha": 0.05, "margin": 0.05, "escalation": {"enabled": False}},
                "concurrency": 8}, f)
        run_id = f"{run}-r{i + 1}"
        res = CliRunner().invoke(replay_app, ["run", "--spec", spec, "--dsn", dsn, "--gateway", server.url,
                                              "--api-key", PLATFORM_KEY, "--no-progress", "--run-id", run_id,
                                              "--format", "json"])
        assert res.exit_code == (0 if model == "cand-good" else 1), res.output
        reports.append(orjson.loads(res.output[res.output.index("{"):]))
        runs.append(run_id)
    assert app.recorder.force_flush()
    return Board(run, customers, keys, server.url, app, traces, runs, reports, spec_name), server


@pytest.fixture(scope="session")
def board(upstream: Upstream, chdb_dsn: str, chdb_store, tmp_path_factory: pytest.TempPathFactory) -> Board:
    """The seeded case board (one per test session; the gateway stays up for every board test)."""
    work = tmp_path_factory.mktemp("board")
    b, server = seed_board(upstream, chdb_dsn, str(work / "spool"), str(work))
    yield b
    server.stop()
