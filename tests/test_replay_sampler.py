"""The pure sampler and the slice SQL builder: exact per-segment counts with a floor, determinism, "(none)"."""
from __future__ import annotations

import random

import pytest

from replay.slice import NONE_SEGMENT, PoolRow, build_pool_query, case_from_row, sample, segment_of
from replay.spec import Sampling, SliceSpec


def pool(sizes: dict[str, int], *, key: str = "customer", start: int = 0) -> list[PoolRow]:
    rows, i = [], start
    for seg, n in sizes.items():
        for _ in range(n):
            rows.append(PoolRow(trace_id=f"t{i:05d}", **{key: seg}))
            i += 1
    return rows


def counts(result) -> dict[str, int]:
    return result.selected


def test_stratified_floor_then_proportional_fill():
    rows = pool({"big": 1000, "mid": 300, "small": 5, "tiny": 1})
    r = sample(rows, ["customer"], 100, Sampling(min_per_segment=20, seed=7))
    # floors: big 20, mid 20, small 5 (all it has), tiny 1 -> 46; the other 54 go 1000:300 to big and mid
    assert counts(r) == {"big": 20 + 42, "mid": 20 + 12, "small": 5, "tiny": 1}
    assert sum(counts(r).values()) == 100 == len(r.cases)
    assert r.available == {"big": 1000, "mid": 300, "small": 5, "tiny": 1}
    assert any("'tiny' has only 1" in n for n in r.notes)


def test_max_per_segment_caps_and_spills_to_others():
    rows = pool({"a": 500, "b": 100, "c": 100})
    r = sample(rows, ["customer"], 150, Sampling(min_per_segment=10, max_per_segment=40, seed=1))
    assert counts(r) == {"a": 40, "b": 40, "c": 40}  # every cap binds; limit cannot be reached
    r = sample(rows, ["customer"], 90, Sampling(min_per_segment=10, max_per_segment=60, seed=1))
    assert counts(r)["a"] <= 60 and sum(counts(r).values()) == 90


def test_floor_wins_over_a_small_limit_and_says_so():
    r = sample(pool({"a": 50, "b": 50, "c": 50}), ["customer"], 30, Sampling(min_per_segment=20))
    assert counts(r) == {"a": 20, "b": 20, "c": 20}
    assert any("exceeds limit 30" in n for n in r.notes)


def test_no_limit_takes_everything():
    r = sample(pool({"a": 7, "b": 3}), ["customer"], None, Sampling(min_per_segment=20))
    assert counts(r) == {"a": 7, "b": 3}


def test_deterministic_under_seed_whatever_the_input_order():
    rows = pool({"a": 200, "b": 80, "c": 9})
    s = Sampling(min_per_segment=10, seed=42)
    first = sample(rows, ["customer"], 60, s)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    again = sample(shuffled, ["customer"], 60, s)
    assert [c.trace_id for c in first.cases] == [c.trace_id for c in again.cases]
    other = sample(rows, ["customer"], 60, Sampling(min_per_segment=10, seed=43))
    assert counts(other) == counts(first)
    assert {c.trace_id for c in other.cases} != {c.trace_id for c in first.cases}


def test_uniform_ignores_segments():
    rows = pool({"a": 900, "b": 100})
    r = sample(rows, ["customer"], 100, Sampling(mode="uniform", seed=5))
    assert len(r.cases) == 100
    assert 70 <= counts(r)["a"] <= 100  # ~90 expected; uniform does not protect the small segment


def test_absent_key_is_its_own_none_segment_and_multi_key_segments():
    rows = [PoolRow("t1", customer="acme", intent="refund", tags={"region": "eu"}),
            PoolRow("t2", customer="acme", intent="", tags={}),
            PoolRow("t3", customer="", intent="invoice", tags={"region": "us"})]
    assert [segment_of(r, ["customer"]) for r in rows] == ["acme", "acme", NONE_SEGMENT]
    assert segment_of(rows[0], ["customer", "intent"]) == "acme/refund"
    assert segment_of(rows[1], ["customer", "intent"]) == f"acme/{NONE_SEGMENT}"
    assert [segment_of(r, ["tag.region"]) for r in rows] == ["eu", NONE_SEGMENT, "us"]
    r = sample(rows, ["tag.region"], None, Sampling(min_per_segment=1))
    assert counts(r) == {NONE_SEGMENT: 1, "eu": 1, "us": 1}


def test_calls_without_content_are_skipped_and_counted():
    rows = pool({"a": 5}) + [PoolRow("x1", customer="a", has_content=False), PoolRow("x2", customer="b",
                                                                                      has_content=False)]
    r = sample(rows, ["customer"], None, Sampling(min_per_segment=1))
    assert counts(r) == {"a": 5}
    assert list(r.skipped.values()) == [2]
    assert "no captured content" in next(iter(r.skipped))


def test_pool_query_is_parameterized():
    s = SliceSpec.model_validate({"customer": "acme", "intent": ["refund", "invoice"], "tag.region": "eu",
                                  "tags": {"tier": "gold"}, "where": "provider!=mock", "since": "7d", "status": "ok",
                                  "limit": 10})
    sql, params = build_pool_query(s, now=1_000_000.0)
    assert "acme" not in sql and "region" not in sql and "eu" not in sql and "mock" not in sql
    assert "tags[{w_k0:String}] = {w_v1:String}" in sql and "provider != {w_v4:String}" in sql
    assert params["f_customer"] == ["acme"] and params["f_intent"] == ["refund", "invoice"]
    assert (params["w_k0"], params["w_v1"], params["w_k2"], params["w_v3"]) == ("region", "eu", "tier", "gold")
    assert params["w_v4"] == "mock"
    assert params["t_from"] == int((1_000_000 - 7 * 86400) * 1000)
    assert params["excluded_sources"] == ["replay", "replay-judge", "shadow"] and params["status"] == "ok"


@pytest.mark.parametrize("bad", ["Region", "x y", "a'b", "k]", "x" * 65, ""])
def test_tag_keys_are_validated(bad):
    from replay.spec import SpecError, parse_spec
    data = {"slice": {"tags": {bad: "v"}}, "candidates": [{"name": "c", "model": "m"}],
            "evaluators": [{"type": "contains", "value": "x"}]}
    with pytest.raises(SpecError, match="invalid tag key"):
        parse_spec(data)


def test_case_from_row_rebuilds_messages_and_drops_stream():
    import orjson
    from exporters.genai_messages import choices_to_semconv_output, to_semconv_input
    system, inputs = to_semconv_input([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}])
    out = choices_to_semconv_output([{"message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}])
    row = {"trace_id": "abc", "customer": "acme", "intent": "refund", "prompt_version": "v1", "model": "m",
           "tags": {"region": "eu"}, "status": "ok", "latency_ms": 12.0, "cost_usd": 0.001,
           "request_json": orjson.dumps(inputs).decode(), "system_instructions": orjson.dumps(system).decode(),
           "request_params": orjson.dumps({"temperature": 0.2, "stream": True, "stream_options": {}}).decode(),
           "response_json": orjson.dumps(out).decode()}
    case, why = case_from_row(row, "acme")
    assert why is None
    assert case.messages == [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert case.params == {"temperature": 0.2}
    assert case.baseline_text == "hello"
    assert case_from_row({**row, "request_json": ""}, "acme") == (None, "no captured content (content capture off "
                                                                        "for that call, or the call refused before "
                                                                        "capture)")
