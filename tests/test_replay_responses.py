"""A replay slice may hold Responses and Anthropic messages calls: each is recorded with its API's mark, rebuilt
from the record and re-sent to the same API through the gateway (tool calls and their outputs included), and scored
on the answer's text like a chat call."""
from __future__ import annotations

import asyncio

import openai
import anthropic
import pytest

from exporters.responses_format import API_MARK
from replay.runner import Runner, Target, build_request, gateway_client
from replay.slice import select_slice
from replay.spec import ReplaySpec, SliceSpec
from tests.gateway_fixture import ADMIN_KEY, recorded_gateway
from tests.replay_support import unique

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def recorded(upstream, chdb_store, tmp_path_factory):
    with recorded_gateway(upstream, chdb_store, str(tmp_path_factory.mktemp("spool"))) as gw:
        customer = unique("resp")
        h = {"x-tagway-customer": customer, "x-tagway-intent": "weather"}
        oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        oa.responses.create(model="tools", instructions="Answer with the tool's words.", extra_headers=h, input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_w1", "output": "sunny"}], temperature=0.1)
        anthropic.Anthropic(base_url=gw.url, api_key=ADMIN_KEY, max_retries=0).messages.create(
            model="claude", max_tokens=32, system="Be brief.", messages=[{"role": "user", "content": "hi claude"}],
            extra_headers=h)
        oa.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "plain chat"}],
                                   extra_headers=h)
        assert gw.recorder.force_flush()
        yield gw, customer


def test_responses_and_messages_calls_replay_as_themselves(recorded, upstream, chdb_store):
    gw, customer = recorded
    cases, _ = select_slice(chdb_store, SliceSpec(customer=[customer], since="1h", segment_by=["customer"]))
    apis = sorted(str(c.params.get(API_MARK)) for c in cases)
    assert apis == ["None", "messages", "responses"]  # one slice, three APIs (operation chat for all)

    resp_case = next(c for c in cases if c.params.get(API_MARK) == "responses")
    body = build_request(resp_case, Target("cand", model="gpt-4o-mini"))
    assert body["instructions"] == "Answer with the tool's words." and body["temperature"] == 0.1
    assert body["input"] == [  # arguments are recorded parsed, so they come back as compact JSON
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_w1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_w1", "output": "sunny"}]
    assert resp_case.baseline_text == "The weather is sunny"

    spec = ReplaySpec(slice={"customer": [customer]}, candidates=[{"name": "cand", "model": "tools"}],
                      evaluators=[{"type": "icontains", "value": "e"}])

    async def run():
        async with gateway_client(base_url=gw.url) as client:
            runner = Runner(client, spec, run_id=unique("run"), api_key=ADMIN_KEY, progress=False)
            return await runner.run(cases, [Target("cand", model=None)])

    upstream.clear()
    outcome = asyncio.run(run())
    assert outcome.complete, [r.error for r in outcome.results]
    by_api = {r.case_id: r for r in outcome.results}
    sent = {r["path"]: r["body"] for r in upstream.requests}
    assert sent["/v1/responses"]["input"][-1] == {"type": "function_call_output", "call_id": "call_w1",
                                                  "output": "sunny"}
    assert API_MARK not in sent["/v1/responses"] and sent["/v1/responses"]["stream"] is False
    assert sent["/v1/messages"]["system"] == "Be brief." and sent["/v1/messages"]["max_tokens"] == 32
    assert sent["/v1/messages"]["messages"] == [{"role": "user", "content": "hi claude"}]
    assert sent["/v1/chat/completions"]["messages"] == [{"role": "user", "content": "plain chat"}]
    outputs = sorted(r.output for r in by_api.values())
    assert outputs == ["Claude echo: hi claude", "Echo: plain chat", "The weather is sunny"]
