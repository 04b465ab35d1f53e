"""Tag rules (seed 002): an output field, a tag name, and a condition, checked against the evaluator's output schema
when it is saved. Pure functions: which rules an answer meets, and which tag changes reconcile a run's targets.

Conditions, by the field's type:
- choices: `equals: <one of the defined choices>`;
- integer / float: `equals: <number>`, or `range: [min, max]` (also `{min: , max: }` or "min..max"), inclusive
  at both ends;
- string: `equals: <text>`.

Reconciliation (seed 002, "Tag reconciliation on rerun"), for each target the run evaluated: a tag named by a rule
of the run's evaluators is applied when a rule naming it is met, and removed, whoever applied it, when every
evaluator that names it scored the target and none met it. An evaluator that errored on a target leaves the tags it
names there as they were. Tags no rule of the run names are never touched.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

from exporters.tagstate import TAG_NAME_RE

from .schema import OutputField

__all__ = ["TagRule", "RuleError", "parse_rules", "rule_met", "matched_rules", "Outcome", "Change", "plan_changes"]

_RULE_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_RANGE_TEXT_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\.\.\s*(-?\d+(?:\.\d+)?)\s*$")


class RuleError(ValueError):
    """A rule that does not fit the output schema; the message names the rule."""


@dataclasses.dataclass(frozen=True)
class TagRule:
    name: str
    field: str
    tag: str
    equals: Any = None  # set when the condition is a value
    low: float | None = None  # set (with high) when the condition is a range
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def condition(self) -> str:
        if self.is_range:
            return f"{self.field} in {_show(self.low)}..{_show(self.high)}"
        return f"{self.field} == {self.equals!r}"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "field": self.field, "tag": self.tag}
        if self.is_range:
            out["range"] = [self.low, self.high]
        else:
            out["equals"] = self.equals
        return out


def _show(x: float | None) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _range(raw: Any) -> tuple[Any, Any] | None:
    if isinstance(raw, str):
        m = _RANGE_TEXT_RE.match(raw)
        if not m:
            return None
        return tuple(float(g) if "." in g else int(g) for g in m.groups())  # type: ignore[return-value]
    if isinstance(raw, dict) and set(raw) == {"min", "max"}:
        return raw["min"], raw["max"]
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        return raw[0], raw[1]
    return None


def _parse_one(i: int, raw: Any, fields: Mapping[str, OutputField]) -> TagRule:
    if not isinstance(raw, dict):
        raise RuleError(f"tag rule #{i + 1}: expected a mapping with field, tag and equals or range")
    tag = raw.get("tag")
    name = raw.get("name", tag)
    label = f"tag rule {name!r}" if isinstance(name, str) and name else f"tag rule #{i + 1}"
    unknown = set(raw) - {"name", "field", "tag", "equals", "range"}
    if unknown:
        raise RuleError(f"{label}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (use field, tag, equals or "
                        "range, name)")
    if not isinstance(tag, str) or not TAG_NAME_RE.match(tag):
        raise RuleError(f"{label}: tag {tag!r} is not a valid tag name (1-64 of [a-z0-9_.:-], starting with a "
                        "letter or digit)")
    if not isinstance(name, str) or not _RULE_NAME_RE.match(name):
        raise RuleError(f"{label}: name must be 1-64 of [A-Za-z0-9_.:-]")
    field = raw.get("field")
    if field not in fields:
        raise RuleError(f"{label}: field {field!r} is not in the output schema (fields: {', '.join(fields) or 'none'})")
    spec = fields[field]
    has_eq, has_range = "equals" in raw, "range" in raw
    if has_eq == has_range:
        raise RuleError(f"{label}: give exactly one condition, equals or range")
    if has_range:
        if spec.type not in ("integer", "float"):
            raise RuleError(f"{label}: a range on the {spec.type} field {field!r} (a range is for integer or float "
                            "fields; use equals)")
        bounds = _range(raw["range"])
        low, high = (_number(bounds[0]), _number(bounds[1])) if bounds else (None, None)
        if low is None or high is None:
            raise RuleError(f"{label}: range must be [min, max] (or min..max) with two numbers")
        if spec.type == "integer" and (low != int(low) or high != int(high)):
            raise RuleError(f"{label}: the bounds of a range on the integer field {field!r} must be whole numbers")
        if low > high:
            raise RuleError(f"{label}: range {low}..{high} is empty (min is greater than max)")
        if spec.type == "integer":
            low, high = int(low), int(high)
        return TagRule(name, field, tag, low=low, high=high)
    value = raw["equals"]
    if spec.type == "choices":
        if value not in (spec.choices or []):
            raise RuleError(f"{label}: {value!r} is not one of the choices of {field!r} "
                            f"({', '.join(spec.choices or [])})")
    elif spec.type == "string":
        if not isinstance(value, str):
            raise RuleError(f"{label}: the string field {field!r} can only equal a string, not {value!r}")
    else:
        num = _number(value)
        if num is None or (spec.type == "integer" and num != int(num)):
            raise RuleError(f"{label}: the {spec.type} field {field!r} can only equal "
                            f"{'a whole number' if spec.type == 'integer' else 'a number'}, not {value!r}")
        value = int(num) if spec.type == "integer" else num
    return TagRule(name, field, tag, equals=value)


def parse_rules(raw: Any, fields: Mapping[str, OutputField]) -> list[TagRule]:
    """Validate rules against the output schema; RuleError names the first bad rule."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RuleError("tag_rules must be a list of rules")
    rules = [_parse_one(i, r, fields) for i, r in enumerate(raw)]
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise RuleError(f"tag rule {r.name!r}: the name is used twice (give each rule naming the same tag a "
                            "name of its own)")
        seen.add(r.name)
    return rules


def rule_met(rule: TagRule, value: Any) -> bool:
    """Whether a field value meets the rule (a missing or mistyped value never does)."""
    if rule.is_range:
        num = _number(value)
        return num is not None and rule.low <= num <= rule.high  # type: ignore[operator]
    if isinstance(rule.equals, str):
        return isinstance(value, str) and value == rule.equals
    num = _number(value)
    return num is not None and num == rule.equals


def matched_rules(rules: Iterable[TagRule], fields: Mapping[str, Any]) -> list[TagRule]:
    return [r for r in rules if r.field in fields and rule_met(r, fields[r.field])]


# -- reconciliation ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    """One evaluator on one target in this run: scored (with its field values) or errored."""
    evaluator: str
    evaluator_version: int
    target_id: str
    customer: str
    ok: bool
    fields: dict[str, Any]
    rules: list[TagRule]

    @property
    def matched(self) -> list[TagRule]:
        return matched_rules(self.rules, self.fields) if self.ok else []


@dataclasses.dataclass(frozen=True)
class Change:
    target_id: str
    customer: str
    tag: str
    action: str  # apply | remove
    evaluator: str
    evaluator_version: int
    rule: str
    field: str
    value: Any

    @property
    def actor(self) -> str:
        return f"rule:{self.evaluator}/{self.rule}"


def plan_changes(outcomes: Iterable[Outcome], present: Mapping[str, Iterable[str]]) -> list[Change]:
    """The tag changes that make the targets' tags agree with this run (see the module docstring). `present` maps
    a target to the tags it carries now. Deterministic order: by target, then tag."""
    by_target: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_target.setdefault(o.target_id, []).append(o)
    changes: list[Change] = []
    for target in sorted(by_target):
        outs = by_target[target]
        has = set(present.get(target, ()))
        managed = sorted({r.tag for o in outs for r in o.rules})
        for tag in managed:
            managers = [o for o in outs if any(r.tag == tag for r in o.rules)]
            hit = next(((o, r) for o in managers for r in o.matched if r.tag == tag), None)
            if hit is not None:
                if tag not in has:
                    o, r = hit
                    changes.append(Change(target, o.customer, tag, "apply", o.evaluator, o.evaluator_version, r.name,
                                          r.field, o.fields.get(r.field)))
            elif tag in has and all(o.ok for o in managers):
                o = managers[0]
                r = next(r for r in o.rules if r.tag == tag)
                changes.append(Change(target, o.customer, tag, "remove", o.evaluator, o.evaluator_version, r.name,
                                      r.field, o.fields.get(r.field)))
    return changes
