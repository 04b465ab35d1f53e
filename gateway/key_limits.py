"""A key's limits as `tagway keys create/limits` set them from flags, and as `tagway keys list` shows them. Pure: the
keys file is read and written by gateway/auth.py, and the result is checked by the same `LimitsConfig` the gateway
loads it with, so the CLI never writes an entry the gateway would refuse."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .config import LimitsConfig

__all__ = ["LimitFlags", "apply_flags", "describe"]


class LimitFlags:
    """What the flags asked for: None leaves a setting as it is, 0 removes it (`--budget 0`: the whole budget).
    With `model`, they are the key's limits on that model (`limits.models`), and `clear` clears only those."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, budget: float | None = None,
                 per: str | None = None, soft: float | None = None, clear: bool = False,
                 model: str | None = None) -> None:
        self.rpm, self.tpm, self.budget, self.per, self.soft = rpm, tpm, budget, per, soft
        self.clear, self.model = clear, model

    def empty(self) -> bool:
        return not self.clear and all(v is None for v in (self.rpm, self.tpm, self.budget, self.per, self.soft))


def apply_flags(current: Any, flags: LimitFlags) -> dict | None:
    """The key's new `limits` entry (None: no limits) from its current one (as stored) and the flags; ValueError
    with one line when the result is not something the gateway would load."""
    out: dict[str, Any] = dict(current) if isinstance(current, dict) else {}
    if flags.model is None:  # the key's own limits; --clear clears its limits on models too
        models = None if flags.clear else out.get("models")
        out = _apply({} if flags.clear else out, flags)
        if models:
            out["models"] = models
    else:
        models = dict(out["models"]) if isinstance(out.get("models"), dict) else {}
        on_model = models.get(flags.model)
        on_model = _apply({} if flags.clear or not isinstance(on_model, dict) else on_model, flags)
        if on_model:
            models[flags.model] = on_model
        else:
            models.pop(flags.model, None)
        out = {**out, "models": models} if models else {k: v for k, v in out.items() if k != "models"}
    if not out:
        return None
    try:
        LimitsConfig.model_validate(out)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"limits: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    return out


def _apply(level: dict, flags: LimitFlags) -> dict:
    """One level of limits (the key's own, or its limits on one model) with the flags applied."""
    out = {k: v for k, v in level.items() if k != "models"}
    for name in ("rpm", "tpm"):
        value = getattr(flags, name)
        if value is None:
            continue
        if value < 0:
            raise ValueError(f"--{name} must be a positive number of {'requests' if name == 'rpm' else 'tokens'} a "
                             "minute, or 0 to remove the limit")
        if value == 0:
            out.pop(name, None)
        else:
            out[name] = value
    budget = dict(out["budget"]) if isinstance(out.get("budget"), dict) else None
    if flags.budget is not None:
        if flags.budget < 0:
            raise ValueError("--budget must be a positive number of USD, or 0 to remove the budget")
        budget = None if flags.budget == 0 else {**(budget or {}), "usd": flags.budget}
    if flags.per is not None or flags.soft is not None:
        if budget is None:
            raise ValueError("--budget-per and --budget-soft change a budget: give --budget USD too (there is none)")
        if flags.per is not None:
            budget["per"] = flags.per
        if flags.soft is not None:
            budget["soft"] = flags.soft
    if budget is None:
        out.pop("budget", None)
    else:
        out["budget"] = budget
    return out


def describe(limits: Any) -> str:
    """One short column for `keys list`: `rpm=60 budget=$50/month gpt-4o:[rpm=10]`, or `-` for none."""
    if not isinstance(limits, dict) or not limits:
        return "-"
    own = _level(limits)
    parts = [own] if own else []
    models = limits.get("models")
    if isinstance(models, dict):
        parts += [f"{name}:[{_level(lim) or '-'}]" for name, lim in models.items()]
    return " ".join(parts) or "-"


def _level(limits: Any) -> str:
    if not isinstance(limits, dict):
        return ""
    parts = [f"{k}={limits[k]}" for k in ("rpm", "tpm") if limits.get(k)]
    budget = limits.get("budget")
    if isinstance(budget, dict) and isinstance(budget.get("usd"), (int, float)):
        soft = budget.get("soft")
        parts.append(f"budget=${budget['usd']:g}/{budget.get('per') or 'month'}" +
                     (f" (warn at {soft:g})" if isinstance(soft, (int, float)) and soft != 0.8 else ""))
    return " ".join(parts)
