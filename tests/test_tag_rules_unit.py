"""The pure parts of tag rules: conditions by field type (inclusive ranges), rules checked against the output
schema, the judge's answer validated strictly, and reconciliation planned from outcomes and the present tags."""
from __future__ import annotations

import pytest

from replay.evals.definition import DefinitionError, parse_definition
from replay.evals.rules import Outcome, RuleError, parse_rules, plan_changes, rule_met
from replay.evals.schema import OutputField, SchemaAnswerError, answer_json_schema, answer_model, validate_answer

FIELDS = {"user_sentiment": OutputField(type="choices", choices=["positive", "neutral", "negative"]),
          "expected_helpfulness": OutputField(type="integer", min=1, max=5),
          "confidence_score": OutputField(type="float", min=0, max=1),
          "summary": OutputField(type="string")}
SEED_RULES = [{"field": "user_sentiment", "tag": "negative-sentiment", "equals": "negative"},
              {"field": "expected_helpfulness", "tag": "low-helpfulness", "range": "1..2"},
              {"field": "confidence_score", "tag": "low-confidence", "range": [0.0, 0.4]}]


def test_conditions_by_field_type_with_inclusive_ranges():
    neg, low_help, low_conf = parse_rules(SEED_RULES, FIELDS)
    assert [rule_met(neg, v) for v in ("negative", "neutral", "Negative", None)] == [True, False, False, False]
    assert [rule_met(low_help, v) for v in (0, 1, 2, 3, 2.0, "2", True)] == [False, True, True, False, True, False,
                                                                               False]
    assert [rule_met(low_conf, v) for v in (0.0, 0.4, 0.4000001, -0.1, float("nan"))] == [True, True, False, False,
                                                                                          False]
    (eq,) = parse_rules([{"field": "confidence_score", "tag": "certain", "equals": 1}], FIELDS)
    assert rule_met(eq, 1.0) and not rule_met(eq, 0.99)
    (text,) = parse_rules([{"field": "summary", "tag": "empty", "equals": ""}], FIELDS)
    assert rule_met(text, "") and not rule_met(text, " ")
    assert low_help.condition() == "expected_helpfulness in 1..2" and low_conf.condition() == \
        "confidence_score in 0..0.4"


@pytest.mark.parametrize("rule,message", [
    ({"field": "user_sentiment", "tag": "neg", "range": [1, 2]}, "tag rule 'neg': a range on the choices field"),
    ({"field": "summary", "tag": "s", "range": "1..2"}, "tag rule 's': a range on the string field 'summary'"),
    ({"field": "summary", "tag": "s", "equals": 3}, "the string field 'summary' can only equal a string"),
    ({"field": "expected_helpfulness", "tag": "h", "equals": 2.5}, "can only equal a whole number, not 2.5"),
    ({"field": "expected_helpfulness", "tag": "h", "range": [3, 1]}, "range 3..1 is empty"),
    ({"field": "confidence_score", "tag": "c", "range": "low..high"}, "range must be [min, max]"),
    ({"field": "confidence_score", "tag": "c", "range": [0, True]}, "range must be [min, max]"),
    ({"field": "confidence_score", "tag": "c", "equals": "high"}, "can only equal a number, not 'high'"),
    ({"field": "confidence_score", "tag": "c", "above": 0.5}, "unknown key(s) above"),
    ({"field": "confidence_score", "tag": "-bad", "equals": 0.5}, "tag '-bad' is not a valid tag name"),
    ({"field": "confidence_score", "tag": "c"}, "give exactly one condition"),
    ("low-confidence", "tag rule #1: expected a mapping"),
])
def test_rules_that_do_not_fit_the_schema_name_the_rule(rule, message):
    with pytest.raises(RuleError) as e:
        parse_rules([rule], FIELDS)
    assert message in str(e.value)


def test_rule_names_default_to_the_tag_and_must_be_unique():
    rules = [{"field": "confidence_score", "tag": "low", "range": [0, 0.2]},
             {"field": "expected_helpfulness", "tag": "low", "equals": 1}]
    with pytest.raises(RuleError, match="tag rule 'low': the name is used twice"):
        parse_rules(rules, FIELDS)
    a, b = parse_rules([rules[0], {**rules[1], "name": "low-help"}], FIELDS)
    assert (a.name, b.name, b.tag) == ("low", "low-help", "low")


def test_definitions_are_checked_whole():
    base = {"name": "quality", "model": "judge", "rubric": "r", "output": {"s": {"type": "choices",
                                                                             "choices": ["a", "b"]}}}
    assert parse_definition(base).mode == "message"
    for bad, message in [
        ({**base, "tag_rules": [{"field": "s", "tag": "t", "equals": "c"}]}, "tag rule 't': 'c' is not one of the "
                                                                             "choices of 's' (a, b)"),
        ({"name": "x", "type": "icontains", "value": "refund", "tag_rules": [{"field": "f", "tag": "t",
                                                                             "equals": 1}]},
         "tag rules are available only on LLM evaluators"),
        ({**base, "output": {}}, "an LLM evaluator needs an output schema"),
        ({**base, "model": None}, "an LLM evaluator needs model"),
        ({**base, "output": {"s": {"type": "choices", "choices": [True, False]}}}, "choices must be a list of strings"),
        ({**base, "output": {"n": {"type": "integer", "min": 5, "max": 1}}}, "min is greater than max"),
        ({**base, "output": {"Bad Name": {"type": "string"}}}, "output field 'Bad Name'"),
        ({**base, "type": "nonsense"}, "unknown evaluator type 'nonsense'"),
        ({**base, "name": "Quality"}, "evaluator name 'Quality'"),
    ]:
        with pytest.raises(DefinitionError) as e:
            parse_definition(bad, "q.yaml")
        assert message in str(e.value) and str(e.value).startswith("q.yaml")
    det = parse_definition({"name": "refund", "type": "icontains", "value": "refund"})
    assert not det.is_llm and det.spec().kind == "icontains"


def test_a_definition_has_a_stable_content_hash():
    d = {"name": "quality", "model": "judge", "rubric": "r", "output": {"s": {"type": "string"}},
         "tag_rules": [{"field": "s", "tag": "t", "equals": "x"}]}
    same = {**d, "tag_rules": [{"tag": "t", "equals": "x", "field": "s", "name": "t"}]}
    assert parse_definition(d).content_hash() == parse_definition(same).content_hash()
    assert parse_definition(d).content_hash() != parse_definition({**d, "rubric": "r2"}).content_hash()


def test_the_judge_answer_must_fit_the_schema_strictly():
    model = answer_model(FIELDS)
    good = '{"user_sentiment": "negative", "expected_helpfulness": 2, "confidence_score": 1, "summary": "ok"}'
    assert validate_answer(model, good) == {"user_sentiment": "negative", "expected_helpfulness": 2,
                                            "confidence_score": 1.0, "summary": "ok"}
    for bad, where in [
        (good.replace('"negative"', '"angry"'), "user_sentiment"),
        (good.replace(": 2,", ": 2.5,"), "expected_helpfulness"),
        (good.replace(": 2,", ': "2",'), "expected_helpfulness"),
        (good.replace(": 2,", ": 9,"), "expected_helpfulness"),
        (good.replace(": 1,", ": 1.5,"), "confidence_score"),
        (good.replace(', "summary": "ok"', ""), "summary"),
        (good.replace("}", ', "extra": 1}'), "extra"),
        ("PASS", "(answer)"),
    ]:
        with pytest.raises(SchemaAnswerError) as e:
            validate_answer(model, bad)
        assert f": {where}: " in str(e.value), str(e.value)
    schema = answer_json_schema(FIELDS)
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False
    assert schema["properties"]["expected_helpfulness"] == {"type": "integer", "minimum": 1, "maximum": 5}


def _outcome(target, ok=True, evaluator="e", **fields):
    rules = parse_rules(SEED_RULES, FIELDS)
    return Outcome(evaluator, 1, target, "acme", ok, fields, rules)


def test_plan_applies_met_rules_and_removes_managed_tags_whoever_applied_them():
    present = {"m1": {"negative-sentiment", "escalated"}, "m2": {"low-confidence"}}
    changes = plan_changes([_outcome("m1", user_sentiment="positive", expected_helpfulness=1, confidence_score=0.9),
                            _outcome("m2", user_sentiment="negative", expected_helpfulness=5, confidence_score=0.2)],
                           present)
    assert [(c.target_id, c.tag, c.action, c.actor, c.value) for c in changes] == [
        ("m1", "low-helpfulness", "apply", "rule:e/low-helpfulness", 1),
        ("m1", "negative-sentiment", "remove", "rule:e/negative-sentiment", "positive"),
        ("m2", "negative-sentiment", "apply", "rule:e/negative-sentiment", "negative")]
    # "escalated" is named by no rule; m2's low-confidence is met again: no change, no audit row


def test_an_errored_evaluator_leaves_the_tags_it_names():
    present = {"m1": {"negative-sentiment"}}
    assert plan_changes([_outcome("m1", ok=False)], present) == []
    # two evaluators name the tag: one met it on m1, the other errored: applied; none met, one errored: kept
    other = _outcome("m1", ok=False, evaluator="f")
    changes = plan_changes([_outcome("m2", user_sentiment="negative", expected_helpfulness=5, confidence_score=1),
                            _outcome("m1", user_sentiment="neutral", expected_helpfulness=5, confidence_score=1),
                            other], present)
    assert [(c.target_id, c.tag, c.action) for c in changes] == [("m2", "negative-sentiment", "apply")]
