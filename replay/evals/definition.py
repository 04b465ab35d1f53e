"""Evaluator definitions: what an evaluation run applies, saved and versioned in the store (exporters.evals).

```yaml
name: support-quality            # 1-64 of [a-z0-9_.-]
mode: message                    # message: tags the evaluated call | session: sees the session's calls, tags it
type: llm_judge                  # or any deterministic type of replay.evaluators (icontains, regex, ...)
model: judge                     # llm_judge: the judge model, called through the gateway
rubric: How did the conversation go for the user?
structured_output: json_schema   # json_schema (default) | json_object | none: how the judge is asked for JSON
output:                          # llm_judge: the output schema (replay.evals.schema)
  user_sentiment: {type: choices, choices: [positive, neutral, negative], rubric: The user's sentiment}
  expected_helpfulness: {type: integer, min: 1, max: 5, rubric: How helpful the answer will be}
  confidence_score: {type: float, min: 0, max: 1, rubric: How sure you are}
tag_rules:                       # llm_judge only (seed 002): checked against `output` when saved
  - {field: user_sentiment, tag: negative-sentiment, equals: negative}
  - {field: expected_helpfulness, tag: low-helpfulness, range: [1, 2]}
  - {field: confidence_score, tag: low-confidence, range: [0.0, 0.4]}
```

A deterministic evaluator keeps pass/score/reason (and the fields its type reports); tag rules are available only
on LLM evaluators. The version of a definition is a number the store gives it when its content changes.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from exporters.yamlfile import YamlFileError, load_mapping

from ..evaluators import EvaluatorSpec, evaluator_for, stored_specs
from ..spec import validate_mapping
from .rules import RuleError, TagRule, parse_rules
from .schema import FIELD_NAME_RE, OutputField, answer_model

__all__ = ["EvaluatorDefinition", "DefinitionError", "LLM_TYPES", "parse_definition", "load_definition",
           "parse_ref", "NAME_RE"]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
LLM_TYPES = ("llm_judge", "llm-rubric")


class DefinitionError(ValueError):
    """A definition (or a reference to one) is invalid; `str(e)` is one line naming what is wrong."""


class EvaluatorDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    mode: Literal["message", "session"] = "message"
    type: str = "llm_judge"
    model: str | None = None
    rubric: str | None = None
    structured_output: Literal["json_schema", "json_object", "none"] = "json_schema"
    params: dict[str, Any] = Field(default_factory=dict)
    system: str | None = None
    output: dict[str, OutputField] = Field(default_factory=dict)
    tag_rules: list[Any] = Field(default_factory=list)
    # deterministic types: their value, threshold and options, as in a replay spec's evaluators
    value: Any = None
    threshold: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    _rules: list[TagRule] = PrivateAttr(default_factory=list)
    _answer_model: Any = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"evaluator name {v!r}: 1-64 of [a-z0-9_.-], starting with a letter or digit")
        return v

    @field_validator("output")
    @classmethod
    def _field_names(cls, v: dict[str, OutputField]) -> dict[str, OutputField]:
        for name in v:
            if not FIELD_NAME_RE.match(name):
                raise ValueError(f"output field {name!r}: names are 1-64 of [a-z0-9_], starting with a letter or _")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "EvaluatorDefinition":
        if self.is_llm:
            missing = [k for k in ("model", "rubric") if not getattr(self, k)]
            if missing:
                raise ValueError(f"an LLM evaluator needs {' and '.join(missing)}")
            if not self.output:
                raise ValueError("an LLM evaluator needs an output schema (output: {field: {type: ...}})")
        else:
            if evaluator_for(self.type) is None:
                raise ValueError(f"unknown evaluator type {self.type!r} (llm_judge, or a type of replay.evaluators)")
            if self.tag_rules:
                raise ValueError("tag rules are available only on LLM evaluators (type llm_judge)")
            if self.output:
                raise ValueError(f"output: only an LLM evaluator declares an output schema (a {self.type} evaluator "
                                 "reports pass, score, reason and its own fields)")
            self._spec()  # the type checks its own options (strictly, unless read from the store)
        try:
            self._rules = parse_rules(self.tag_rules, self.output)
        except RuleError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def is_llm(self) -> bool:
        return self.type in LLM_TYPES

    @property
    def rules(self) -> list[TagRule]:
        return self._rules

    def answer_model(self) -> type[BaseModel]:
        """The pydantic model a judge's answer must fit (built once)."""
        if self._answer_model is None:
            self._answer_model = answer_model(self.output)
        return self._answer_model

    def spec(self) -> EvaluatorSpec:
        """A deterministic definition as the registry's EvaluatorSpec (its options were checked when it was read:
        a stored one's are taken as they were saved)."""
        with stored_specs():
            return self._spec()

    def _spec(self) -> EvaluatorSpec:
        return EvaluatorSpec(type=self.type, value=self.value, threshold=self.threshold, metric=self.name,
                             **self.options)

    def canonical(self) -> dict:
        """The stored form: rules normalised, keys sorted (its hash decides whether a save is a new version)."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["name"] = self.name
        if self._rules:
            data["tag_rules"] = [r.to_json() for r in self._rules]
        return data

    def to_json(self) -> str:
        return orjson.dumps(self.canonical(), option=orjson.OPT_SORT_KEYS).decode()

    def content_hash(self) -> str:
        return hashlib.blake2b(self.to_json().encode(), digest_size=16).hexdigest()


def parse_definition(data: Any, source: str = "evaluator") -> EvaluatorDefinition:
    name = data.get("name") if isinstance(data, dict) and isinstance(data.get("name"), str) else None
    return validate_mapping(EvaluatorDefinition, data, f"{source} ({name})" if name else source, DefinitionError)


def load_definition(path: str | Path) -> EvaluatorDefinition:
    try:
        data = load_mapping(path, "evaluator file")
    except YamlFileError as e:
        raise DefinitionError(str(e)) from None
    return parse_definition(data, str(path))


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'NAME' or 'NAME@VERSION' -> (name, version or None)."""
    name, sep, version = ref.strip().partition("@")
    if not NAME_RE.match(name) or (sep and not version.isdigit()):
        raise DefinitionError(f"--evaluator {ref!r}: give a saved evaluator's NAME or NAME@VERSION, or a YAML file")
    return name, int(version) if sep else None
