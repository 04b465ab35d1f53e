"""A key's limits as `tagway keys create/limits` set them from flags, and as `tagway keys list` shows them. Pure: the
keys file is read and written by gateway/auth.py, and the result is checked by the same `LimitsConfig` the gateway
loads it with, so the CLI never writes an entry the gateway would refuse."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .config import LimitsConfig

__all__ = ["LimitFlags", "apply_flags", "describe"]


class LimitFlags:
    """What the flags asked for: None leaves a setting as it is, 0 removes it (`--budget 0`: the whole budget)."""

    def __init__(self, rpm: int | None = None, tpm: int | None = None, budget: float | None = None,
                 per: str | None = None, soft: float | None = None, clear: bool = False) -> None:
        self.rpm, self.tpm, self.budget, self.per, self.soft, self.clear = rpm, tpm, budget, per, soft, clear

    def empty(self) -> bool:
        return not self.clear and all(v is None for v in (self.rpm, self.tpm, self.budget, self.per, self.soft))


def apply_flags(current: Any, flags: LimitFlags) -> dict | None:
    """The key's new `limits` entry (None: no limits) from its current one (as stored) and the flags; ValueError
    with one line when the result is not something the gateway would load."""
    out: dict[str, Any] = {} if flags.clear or not isinstance(current, dict) else dict(current)
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
            raise ValueError("--budget-per and --budget-soft change a budget: give --budget USD too (the key has none)")
        if flags.per is not None:
            budget["per"] = flags.per
        if flags.soft is not None:
            budget["soft"] = flags.soft
    if budget is None:
        out.pop("budget", None)
    else:
        out["budget"] = budget
    if not out:
        return None
    try:
        LimitsConfig.model_validate(out)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"limits: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    return out


def describe(limits: Any) -> str:
    """One short column for `keys list`: `rpm=60 tpm=100000 budget=$50/month`, or `-` for none."""
    if not isinstance(limits, dict) or not limits:
        return "-"
    parts = [f"{k}={limits[k]}" for k in ("rpm", "tpm") if limits.get(k)]
    budget = limits.get("budget")
    if isinstance(budget, dict) and isinstance(budget.get("usd"), (int, float)):
        soft = budget.get("soft")
        parts.append(f"budget=${budget['usd']:g}/{budget.get('per') or 'month'}" +
                     (f" (warn at {soft:g})" if isinstance(soft, (int, float)) and soft != 0.8 else ""))
    return " ".join(parts) or "-"
