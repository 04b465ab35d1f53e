"""The replay spec: what to replay (a slice of `llm_calls` or a pinned dataset), against which candidates, scored
how, and gated how. Pydantic models off the hot path; `load_spec` turns every validation problem into one line.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exporters.vocabulary import (APPLIED_TAG, NORMALISED_COLUMNS, normalise, parse_dimension, parse_duration,
                                  parse_filter, validate_tag_key)
from exporters.yamlfile import YamlFileError, load_mapping

from .evaluators import EvaluatorSpec, stored_specs

__all__ = [
    "SpecError", "Sampling", "SliceSpec", "PromptSpec", "Candidate", "Baseline", "EvaluatorSpec", "Gating",
    "Escalation", "Families", "LEGACY_GATING", "LEGACY_GATING_HELP",
    "ReplaySpec", "load_spec", "load_spec_data", "apply_overrides", "parse_spec", "one_line_error",
    "validate_mapping",
]

_M = TypeVar("_M", bound=BaseModel)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,64}$")


class SpecError(ValueError):
    """A replay spec (or a CLI override of it) is invalid. The message is one line, fit for a terminal."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Sampling(_Model):
    mode: Literal["stratified", "uniform"] = "stratified"
    min_per_segment: int = Field(20, ge=0)
    max_per_segment: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _bounds(self) -> "Sampling":
        if self.max_per_segment is not None and self.max_per_segment < self.min_per_segment:
            raise ValueError("max_per_segment must be >= min_per_segment")
        return self


class SliceSpec(_Model):
    """Which production calls to replay. Filters accept one value or a list; `tags` (or `tag.<key>` keys) match
    exact tag values; `where` takes `key=value` / `key!=value` filters as `tagway stats --where` does. Keys,
    durations and filters follow exporters.vocabulary. Non-production traffic (replay, judge) is excluded unless
    `source` or a `where` filter on source says."""
    customer: list[str] | None = None
    intent: list[str] | None = None
    prompt_version: list[str] | None = None
    model: list[str] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    where: list[str] = Field(default_factory=list)
    source: list[str] | None = None
    operation: str = "chat"
    status: Literal["ok", "error", "any"] = "ok"
    include_errors: bool = False  # errored production calls are cases too (their baseline is a failure)
    since: str | None = None
    from_: float | None = Field(None, alias="from")  # epoch seconds, or an ISO timestamp in YAML
    to: float | None = None
    limit: int | None = Field(500, ge=1)
    pool_max: int = Field(100_000, ge=1)  # how many calls the sampler may look at
    segment_by: list[str] = Field(default_factory=lambda: ["customer"])
    sampling: Sampling = Field(default_factory=Sampling)

    @model_validator(mode="before")
    @classmethod
    def _tag_dot_keys(cls, data: Any) -> Any:
        # `tag.region: eu` is a shorthand for `tags: {region: eu}`
        if isinstance(data, dict):
            data = dict(data)
            for k in [k for k in data if isinstance(k, str) and k.startswith("tag.")]:
                data.setdefault("tags", {})
                data["tags"] = {**data["tags"], k[4:]: data.pop(k)}
        return data

    @field_validator("customer", "intent", "prompt_version", "model", "source", "where", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if v is None or isinstance(v, list):
            return v
        return [v]

    @field_validator(*NORMALISED_COLUMNS)
    @classmethod
    def _normalised(cls, v: list[str] | None) -> list[str] | None:
        # recorded normalised by the gateway: a slice reads them the same way (customer: [ACME] finds acme)
        return None if v is None else [normalise(x) for x in v]

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("tags must be a mapping of key: value")
        return {validate_tag_key(str(k), "tags"): normalise(str(val)) for k, val in v.items()}

    @field_validator("where")
    @classmethod
    def _where(cls, v: list[str]) -> list[str]:
        return [str(parse_filter(f)) for f in v if str(f).strip()]

    @field_validator("segment_by", mode="before")
    @classmethod
    def _segment_by(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if not v:
            raise ValueError("segment_by needs at least one key")
        keys = [parse_dimension(str(k), "by") for k in v]
        if APPLIED_TAG in keys:  # a call may carry several applied tags: it would be in several segments
            raise ValueError(f"{APPLIED_TAG} cannot be a segment key (filter on it with where: instead)")
        return keys

    @field_validator("since")
    @classmethod
    def _since(cls, v: str | None) -> str | None:
        if v is not None:
            parse_duration(v)
        return v

    @field_validator("from_", "to", mode="before")
    @classmethod
    def _time(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = dt.datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"bad timestamp {v!r} (use ISO 8601, e.g. 2026-11-01T00:00:00Z)") from None
        if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
            v = dt.datetime(v.year, v.month, v.day)
        if isinstance(v, dt.datetime):
            if v.tzinfo is None:
                v = v.replace(tzinfo=dt.timezone.utc)
            return v.timestamp()
        return v

    @model_validator(mode="after")
    def _window(self) -> "SliceSpec":
        if self.include_errors and self.status == "ok":
            self.status = "any"
        if self.since and (self.from_ is not None or self.to is not None):
            raise ValueError("use either since or from/to, not both")
        if self.from_ is not None and self.to is not None and self.to <= self.from_:
            raise ValueError("to must be after from")
        return self


class PromptSpec(_Model):
    """A candidate system prompt: inline `system` text or a `file`, applied in `replace` mode (the recorded system
    messages are replaced) or `template` mode (`{original_system}`, `{customer}`, `{intent}`, `{tag_<key>}`...)."""
    system: str | None = None
    file: str | None = None
    mode: Literal["replace", "template"] = "replace"
    version: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSpec":
        if (self.system is None) == (self.file is None):
            raise ValueError("prompt needs exactly one of system or file")
        if self.file is not None and not self.version:
            raise ValueError("a prompt file needs a version (prompt.version)")
        return self

    def text(self, base_dir: Path | None = None) -> str:
        if self.system is not None:
            return self.system
        path = Path(self.file or "")
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_text()
        except OSError as e:
            raise SpecError(f"cannot read prompt file {path}: {e.strerror}") from None


class Candidate(_Model):
    name: str
    model: str
    prompt: PromptSpec | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v == "baseline":
            raise ValueError(f"bad candidate name {v!r} (1-64 of [A-Za-z0-9_.:@+-], not 'baseline')")
        return v


class Baseline(_Model):
    """`logged`: the production response recorded in llm_calls is the baseline. `rerun`: re-run each case now
    (with `model`/`prompt`/`params`, defaulting to the original call's), to remove drift of the logged answers."""
    mode: Literal["logged", "rerun"] = "logged"
    model: str | None = None
    prompt: PromptSpec | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class Escalation(_Model):
    """More cases for segments the first sample cannot decide, drawn from production (stratified by segment,
    without replacement, in the slice's seeded order) at looks planned up front (replay.gate.escalation). On by
    default for slice runs (a dataset has no production to draw from); `enabled: false` turns it off."""
    enabled: bool | None = None  # None: on for a slice, off for a dataset
    max_cases: int = Field(2000, ge=1)  # extra cases for the whole run (each runs against every target)
    max_cost: float | None = Field(None, gt=0)  # USD for the escalation's calls; the spec's max_cost still caps all
    max_per_segment: int = Field(200, ge=1)
    looks: int = Field(2, ge=1, le=10)  # extra looks per segment at most
    trigger: Literal["drop", "inconclusive"] = "drop"


class Families(_Model):
    """Segments grouped into families: `by` one of the slice's segment_by keys (a second level, e.g.
    segment_by: [tier, customer], families: {by: tier}), or explicit `groups: {name: [segment, ...]}`."""
    by: str | None = None
    groups: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `families: {enterprise: [acme, globex], smb: [initech]}` is a shorthand for `groups:`
        if isinstance(data, dict) and data and "by" not in data and "groups" not in data:
            return {"groups": data}
        return data

    @model_validator(mode="after")
    def _one(self) -> "Families":
        if (self.by is None) == (not self.groups):
            raise ValueError("give either by: KEY or groups of segments")
        seen: dict[str, str] = {}
        for fam, members in self.groups.items():
            for m in members:
                if m in seen:
                    raise ValueError(f"segment {m!r} is in two families ({seen[m]}, {fam})")
                seen[m] = fam
        return self


# The rule the paired gate replaced; a spec or flag still using these keys gets this, not a silent other meaning.
LEGACY_GATING = ("aggregate", "threshold", "max_drop", "min_cases_per_segment")
LEGACY_GATING_HELP = (
    "the gate is now paired and significance-aware (README, 'Replay a slice, gate on the worst segment'): a "
    "segment is a regression when its drop beyond `margin` is significant at `alpha` across all segments (Holm); "
    "use gating.margin where you had max_drop, and remove aggregate, threshold and min_cases_per_segment")


class Gating(_Model):
    """The paired gate (replay.gate): per segment the exact sign test on the flipped cases, Holm across segments
    (or families), verdicts regression / ok / inconclusive. `alpha` bounds the chance of calling any segment a
    regression when none got worse; `margin` is the drop a segment may show before it counts."""
    metric: Literal["pass_rate"] = "pass_rate"
    alpha: float = Field(0.05, gt=0, lt=0.5)
    margin: float = Field(0.05, ge=0, lt=1)
    inconclusive: Literal["block", "pass"] = "pass"  # exit 0 with the inconclusive segments listed, or exit 4
    errors: Literal["fail", "exclude"] = "fail"  # an errored result is a failed case, or left out of the test
    families: Families | None = None
    escalation: Escalation = Field(default_factory=Escalation)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in LEGACY_GATING if k in data]
            if old:
                raise ValueError(f"{', '.join(old)}: no longer used: {LEGACY_GATING_HELP}")
        return data


class ReplaySpec(_Model):
    name: str | None = None
    slice: SliceSpec | None = None
    dataset: str | None = None
    candidates: list[Candidate] = Field(min_length=1)
    baseline: Baseline = Field(default_factory=Baseline)
    evaluators: list[EvaluatorSpec] = Field(min_length=1)
    case_threshold: float | None = Field(None, ge=0, le=1)  # None: a case passes when every weighted check passes
    gating: Gating = Field(default_factory=Gating)
    concurrency: int = Field(8, ge=1, le=1024)
    retries: int = Field(3, ge=0, le=20)
    timeout: float = Field(120.0, gt=0)
    max_cost: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _source(self) -> "ReplaySpec":
        if (self.slice is None) == (self.dataset is None):
            raise ValueError("give exactly one of slice or dataset")
        names = [c.name for c in self.candidates]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate candidate name(s): {', '.join(sorted(dup))}")
        fam = self.gating.families
        if fam is not None and fam.by is not None:
            if fam.by not in self.segment_by or len(self.segment_by) < 2:
                raise ValueError(f"gating.families.by: unknown family dimension {fam.by!r} (use one of the slice's "
                                 f"segment_by keys, with a second key to segment by: {', '.join(self.segment_by)})")
        if self.gating.escalation.enabled is True and self.slice is None:
            raise ValueError("gating.escalation draws more cases from production: it needs a slice, not a dataset")
        return self

    def family_of(self, segment: str) -> str | None:
        """The family a segment belongs to (None without families); segments outside every group form "(other)"."""
        fam = self.gating.families
        if fam is None:
            return None
        if fam.by is not None:
            parts = segment.split("/")
            i = self.segment_by.index(fam.by)
            return parts[i] if len(parts) == len(self.segment_by) else "(other)"
        return next((name for name, members in fam.groups.items() if segment in members), "(other)")

    @property
    def segment_by(self) -> list[str]:
        return self.slice.segment_by if self.slice else ["segment"]

    @property
    def escalates(self) -> bool:
        return self.slice is not None and self.gating.escalation.enabled is not False

    @property
    def judge_version(self) -> str:
        return ",".join(sorted({str(e.option("judge_version")) for e in self.evaluators if e.kind == "llm_judge"}))


def one_line_error(e: ValidationError, source: str) -> str:
    """A pydantic error as one line: '<source>: <where>: <what> (+N more: <where>, ...)'. Our own explanations
    (value errors: a migration hint, a rule) come before pydantic's generic ones, which would hide them (an old spec
    lacking `evaluators` said only "evaluators: Field required (+1 more)")."""
    errors = sorted(e.errors(), key=lambda err: err.get("type") != "value_error")  # stable: file order otherwise

    def where(err: Any) -> str:
        return ".".join(str(p) for p in err.get("loc", ()) if p not in ("function-after", "function-before"))

    err = errors[0]
    loc = where(err)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    rest = [where(x) or "spec" for x in errors[1:]]
    more = f" (+{len(rest)} more: {', '.join(rest[:3])}{', ...' if len(rest) > 3 else ''})" if rest else ""
    return f"{source}: {loc + ': ' if loc else ''}{msg}{more}"


def validate_mapping(model: type[_M], data: Any, source: str, error: type[ValueError]) -> _M:
    """A YAML mapping validated as `model`; anything wrong is `error` with one line naming `source`."""
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(one_line_error(e, source)) from None


def parse_spec(data: Any, source: str = "spec", *, stored: bool = False) -> ReplaySpec:
    """`stored`: a run's spec read back from the store, taken as it ran (replay.evaluators.stored_specs)."""
    if stored:
        with stored_specs():
            return validate_mapping(ReplaySpec, data, source, SpecError)
    return validate_mapping(ReplaySpec, data, source, SpecError)


def load_spec(path: str | Path) -> ReplaySpec:
    return parse_spec(load_spec_data(path), str(path))


def _parse_tag_flags(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        k, sep, val = v.partition("=")
        if not sep or not k.strip():
            raise SpecError(f"--tag {v!r}: expected key=value")
        try:  # here, not once merged into the spec's tags: the error names the flag, not the spec file
            validate_tag_key(k.strip(), "--tag")
        except ValueError as e:
            raise SpecError(f"--tag {v!r}: {e}") from None
        out[k.strip()] = val.strip()
    return out


def apply_overrides(data: dict, *, customer: list[str] | None = None, intent: list[str] | None = None,
                    tags: list[str] | None = None, since: str | None = None, segment_by: str | None = None,
                    limit: int | None = None, dataset: str | None = None, candidate_models: list[str] | None = None,
                    gating: dict[str, Any] | None = None, escalation: dict[str, Any] | None = None,
                    max_cost: float | None = None, concurrency: int | None = None) -> dict:
    """CLI flags onto the raw spec mapping (before validation, so flags are validated like the file). `gating` and
    `escalation` hold the gate flags that were given (None values are dropped)."""
    data = {**data}
    if dataset is not None:
        data.pop("slice", None)
        data["dataset"] = dataset
        gating_of = data.get("gating")
        esc_of = gating_of.get("escalation") if isinstance(gating_of, dict) else None
        if isinstance(esc_of, dict) and esc_of.get("enabled") is True:
            # the spec's escalation drew from the slice --dataset replaced: a dataset's cases are fixed (an
            # explicit --escalate with --dataset is still refused, by the spec's own check)
            data["gating"] = {**gating_of, "escalation": {**esc_of, "enabled": False}}
    slice_over = {k: v for k, v in {"customer": customer or None, "intent": intent or None, "since": since,
                                    "segment_by": segment_by, "limit": limit}.items() if v is not None}
    if tags:
        slice_over["tags"] = _parse_tag_flags(tags)
    if slice_over:
        if "dataset" in data and "slice" not in data:
            raise SpecError("slice flags (--customer, --intent, --tag, --since, --segment-by, --limit) do not apply "
                            "to a dataset run")
        sl = dict(data.get("slice") or {})
        if "since" in slice_over:
            sl.pop("from", None)
            sl.pop("to", None)
        if "tags" in slice_over:
            slice_over["tags"] = {**(sl.get("tags") or {}), **slice_over["tags"]}
        data["slice"] = {**sl, **slice_over}
    if candidate_models:
        existing = list(data.get("candidates") or [])
        if len(candidate_models) == 1 and len(existing) == 1 and isinstance(existing[0], dict):
            data["candidates"] = [{**existing[0], "model": candidate_models[0]}]
        else:
            template = {k: v for k, v in (existing[0] if existing and isinstance(existing[0], dict) else {}).items()
                        if k in ("prompt", "params")}
            data["candidates"] = [{**template, "name": re.sub(r"[^A-Za-z0-9_.:@+-]", "-", m)[:64], "model": m}
                                  for m in candidate_models]
    gate = {k: v for k, v in (gating or {}).items() if v is not None}
    esc = {k: v for k, v in (escalation or {}).items() if v is not None}
    if gate or esc:
        merged = {**(data.get("gating") or {}), **gate}
        if esc:
            merged["escalation"] = {**(merged.get("escalation") or {}), **esc}
        data["gating"] = merged
    if max_cost is not None:
        data["max_cost"] = max_cost
    if concurrency is not None:
        data["concurrency"] = concurrency
    return data


def load_spec_data(path: str | Path) -> dict:
    """The raw mapping of a spec file (to apply CLI overrides before validation)."""
    try:
        return load_mapping(path, "spec")
    except YamlFileError as e:
        raise SpecError(str(e)) from None
