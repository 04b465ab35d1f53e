"""An LLM evaluator's output schema: named fields, each `choices` (an enum), `integer`, `float` or `string`, with a
rubric the judge reads. From it come the JSON schema the judge is asked to answer in (structured output) and the
pydantic model its answer is validated with; an answer that fails it is an evaluation error for that row.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

__all__ = ["OutputField", "FIELD_NAME_RE", "answer_model", "answer_json_schema", "validate_answer", "SchemaAnswerError"]

FIELD_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,63}$")
MAX_STRING = 4000


class SchemaAnswerError(ValueError):
    """The judge's answer does not fit the output schema; `str(e)` is one line."""


class OutputField(BaseModel):
    """One field of the output schema. `min`/`max` bound an integer or float (inclusive)."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["choices", "integer", "float", "string"]
    rubric: str = ""
    choices: list[str] | None = None
    min: float | None = None
    max: float | None = None

    @field_validator("choices", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
            raise ValueError("choices must be a list of strings (quote yes/no/true/false and numbers in YAML)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "OutputField":
        if self.type == "choices":
            if not self.choices:
                raise ValueError("a choices field needs its choices: [a, b, ...]")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError("choices are repeated")
        elif self.choices is not None:
            raise ValueError(f"choices belong to a choices field, not a {self.type} field")
        if self.type in ("choices", "string") and (self.min is not None or self.max is not None):
            raise ValueError(f"min/max bound a number, not a {self.type} field")
        for bound in (self.min, self.max):
            if bound is not None and (not math.isfinite(bound) or (self.type == "integer" and bound != int(bound))):
                raise ValueError(f"min/max of an {self.type} field must be {'whole ' if self.type == 'integer' else ''}"
                                 "finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self

    def describe(self) -> str:
        """How the judge prompt states the field's type."""
        if self.type == "choices":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices or [])
        kind = {"integer": "an integer", "float": "a number", "string": "a string"}[self.type]
        if self.min is not None and self.max is not None:
            return f"{kind} from {_num(self.min, self.type)} to {_num(self.max, self.type)}"
        if self.min is not None:
            return f"{kind} >= {_num(self.min, self.type)}"
        if self.max is not None:
            return f"{kind} <= {_num(self.max, self.type)}"
        return kind


def _num(x: float, type_: str) -> str:
    return str(int(x)) if type_ == "integer" else f"{x:g}"


def _python_type(f: OutputField) -> tuple[Any, Any]:
    if f.type == "choices":
        return Literal[tuple(f.choices or ())], Field(...)  # type: ignore[misc]
    if f.type == "string":
        return str, Field(..., max_length=MAX_STRING)
    bounds = {k: (int(v) if f.type == "integer" else v) for k, v in (("ge", f.min), ("le", f.max)) if v is not None}
    return (int if f.type == "integer" else float), Field(..., allow_inf_nan=False, **bounds)


def answer_model(fields: dict[str, OutputField]) -> type[BaseModel]:
    """The pydantic model of a valid answer: every field present, nothing else, strict types (an integer field
    takes no 2.5 and no "2"; a float field takes integers)."""
    return create_model("EvaluatorAnswer", __config__=ConfigDict(extra="forbid", strict=True),
                        **{name: _python_type(f) for name, f in fields.items()})


def answer_json_schema(fields: dict[str, OutputField]) -> dict:
    """The JSON schema for `response_format: {type: json_schema}` (OpenAI structured outputs' strict subset)."""
    props: dict[str, dict] = {}
    for name, f in fields.items():
        p: dict[str, Any] = {"type": {"choices": "string", "integer": "integer", "float": "number",
                                      "string": "string"}[f.type]}
        if f.type == "choices":
            p["enum"] = list(f.choices or [])
        if f.min is not None:
            p["minimum"] = int(f.min) if f.type == "integer" else f.min
        if f.max is not None:
            p["maximum"] = int(f.max) if f.type == "integer" else f.max
        if f.rubric:
            p["description"] = f.rubric
        props[name] = p
    return {"type": "object", "properties": props, "required": list(fields), "additionalProperties": False}


def validate_answer(model: type[BaseModel], text: str) -> dict[str, Any]:
    """The judge's answer as field values, or SchemaAnswerError naming the first problem."""
    try:
        return model.model_validate_json(text).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "(answer)"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise SchemaAnswerError(f"judge answer does not fit the output schema: {where}: {err.get('msg')}{more}: "
                                f"{text.strip()[:120]!r}") from None
