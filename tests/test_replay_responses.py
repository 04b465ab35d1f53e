"""A replay slice may hold Responses and Anthropic messages calls: each is recorded with its API's mark, rebuilt
from the record and re-sent to the same API through the gateway (tool calls and their outputs included), and scored
on the answer's text like a chat call."""
from __future__ import annotations

import asyncio

import openai
import anthropic
import orjson
import pytest

from exporters.responses_format import API_MARK
from replay.runner import Runner, Target, build_request, gateway_client
from replay.slice import case_from_row, select_slice
from replay.spec import PromptSpec, ReplaySpec, SliceSpec
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


def _replay(gw, cases, customer: str, *, model: str, contains: str):
    """The cases replayed through the gateway on candidate `model` (the admin key), scored by an icontains."""
    spec = ReplaySpec(slice={"customer": [customer]}, candidates=[{"name": "cand", "model": model}],
                      evaluators=[{"type": "icontains", "value": contains}])

    async def run():
        async with gateway_client(base_url=gw.url) as client:
            runner = Runner(client, spec, run_id=unique("run"), api_key=ADMIN_KEY, progress=False)
            return await runner.run(cases, [Target("cand", model=None)])

    return asyncio.run(run())


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

    upstream.clear()
    outcome = _replay(gw, cases, customer, model="tools", contains="e")
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


def test_system_messages_later_in_a_conversation_are_replayed_where_they_were(recorded, upstream, chdb_store):
    """A system or developer message in the middle of a conversation was recorded with the system instructions,
    and a replay sent it first: not the recorded request. The opening ones stay the system instructions; a later
    one is chat history (the semconv's gen_ai.input.messages), recorded and re-sent in its place with its role. For
    the Responses API, `instructions` go back as `instructions` and a developer or system input item as an item."""
    gw, _ = recorded
    customer = unique("midsys")
    h = {"x-tagway-customer": customer}
    oa = openai.OpenAI(base_url=gw.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    upstream.clear()
    oa.chat.completions.create(model="gpt-test", extra_headers=h, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "How far is Paris?"},
        {"role": "assistant", "content": "465 km."}, {"role": "developer", "content": "Answer in miles now."},
        {"role": "user", "content": "And in miles?"}, {"role": "system", "content": "Round it."},
        {"role": "user", "content": "Roughly?"}])
    oa.responses.create(model="gpt-test", instructions="Be exact.", extra_headers=h, input=[
        {"role": "developer", "content": "Use the metric system."}, {"role": "user", "content": "How far is Lyon?"},
        {"role": "assistant", "content": "392 km."}, {"role": "system", "content": "Answer in miles now."},
        {"role": "user", "content": "And in miles?"}])
    sent = {r["path"]: r["body"] for r in upstream.requests}
    assert gw.recorder.force_flush()
    rows = chdb_store.query("SELECT system_instructions, request_json FROM llm_calls WHERE customer = {c:String} "
                            "ORDER BY Timestamp", {"c": customer})
    assert [orjson.loads(r["system_instructions"]) for r in rows] == [
        [{"type": "text", "content": "Be brief."}],
        [{"type": "text", "content": "Be exact."}, {"type": "text", "content": "Use the metric system.",
                                                    "role": "developer"}]]
    assert [m["role"] for m in orjson.loads(rows[0]["request_json"])] == [
        "user", "assistant", "developer", "user", "system", "user"]

    cases, _ = select_slice(chdb_store, SliceSpec(customer=[customer], since="1h", segment_by=["customer"]))
    upstream.clear()
    outcome = _replay(gw, cases, customer, model="gpt-test", contains="echo")
    assert outcome.complete, [r.error for r in outcome.results]
    replayed = {r["path"]: r["body"] for r in upstream.requests}
    assert replayed["/v1/chat/completions"]["messages"] == sent["/v1/chat/completions"]["messages"]
    assert replayed["/v1/responses"]["instructions"] == "Be exact."
    assert replayed["/v1/responses"]["input"] == sent["/v1/responses"]["input"]
    # a candidate's system prompt still replaces the opening instructions only
    resp_case = next(c for c in cases if c.params.get(API_MARK) == "responses")
    body = build_request(resp_case, Target("cand", model="gpt-test", prompt=PromptSpec(system="New."),
                                           prompt_text="New."))
    assert body["instructions"] == "New." and [i["role"] for i in body["input"]] == [
        "user", "assistant", "system", "user"]


def test_recordings_made_before_keep_replaying():
    """A call recorded before (every system or developer message among the system instructions) still rebuilds:
    the instructions first, as it was replayed then; a Responses call's developer item stays an input item."""
    old_chat = {"system_instructions": orjson.dumps([{"type": "text", "content": "Be brief."},
                                                     {"type": "text", "content": "Later.", "role": "developer"}]),
                "request_json": orjson.dumps([{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]),
                "request_params": b"{}"}
    case, why = case_from_row({"trace_id": "old-chat", **old_chat}, "all")
    assert why is None and case.messages == [{"role": "system", "content": "Be brief."},
                                             {"role": "developer", "content": "Later."},
                                             {"role": "user", "content": "hi"}]
    case, why = case_from_row({"trace_id": "old-resp", **old_chat,
                               "request_params": orjson.dumps({API_MARK: "responses"})}, "all")
    assert why is None
    body = build_request(case, Target("cand", model="gpt-test"))
    assert body["instructions"] == "Be brief." and body["input"] == [{"role": "developer", "content": "Later."},
                                                                      {"role": "user", "content": "hi"}]
