"""Redaction of captured content before it is recorded: built-in patterns (e-mail, card numbers, bearer tokens)
plus the operator's regexes. Applied to every string inside the captured structure, never to the JSON text, so
a pattern can never break the JSON it is recorded in."""
from __future__ import annotations

import re
from typing import Any

__all__ = ["Redactor", "BUILTIN"]

# name -> (pattern, replacement, cheap test that must pass before the regex runs). Capture runs on every call,
# and most text holds no e-mail, card or token: the pre-checks keep redaction off the profile.
_DIGITS = re.compile(r"\d{4}")
BUILTIN = {
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), "[REDACTED:email]",
              lambda s: "@" in s),
    # 13-19 digits, optionally grouped by spaces or dashes; checked with Luhn so order ids survive
    "card": (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), "[REDACTED:card]", lambda s: _DIGITS.search(s) is not None),
    "bearer": (re.compile(r"(?i)\b(?:bearer\s+|sk-|tw-)[A-Za-z0-9._~+/=-]{16,}"), "[REDACTED:secret]",
               lambda s: "-" in s or "earer" in s),
}


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


class Redactor:
    def __init__(self, builtin: list[str], patterns: list[str], max_chars: int = 200_000) -> None:
        # Captured text per call is bounded: redacting (and later storing) a multi-megabyte prompt would stall the
        # event loop for every other call. Past the budget, strings are cut and say so.
        self.max_chars = max_chars
        self._rules = [BUILTIN[name] for name in builtin]
        self._rules += [(re.compile(p), "[REDACTED]", None) for p in patterns]

    def text(self, s: str) -> str:
        for rx, repl, precheck in self._rules:
            if precheck is not None and not precheck(s):
                continue
            if repl == "[REDACTED:card]":
                s = rx.sub(lambda m: repl if _luhn_ok(re.sub(r"\D", "", m.group())) else m.group(), s)
            else:
                s = rx.sub(repl, s)
        return s

    def deep(self, obj: Any) -> Any:
        """Redact every string in a JSON-like structure (keys are left alone), within the character budget."""
        budget = [self.max_chars]

        def walk(x: Any) -> Any:
            if isinstance(x, str):
                cut = max(budget[0], 0)
                if len(x) <= cut:
                    budget[0] -= len(x)
                    return self.text(x) if self._rules else x
                # redact a margin past the cut, so a secret straddling it is replaced whole before the cut
                head = x[:cut + 256]
                head = (self.text(head) if self._rules else head)[:cut]
                budget[0] = 0
                return head + f"...[truncated by tagway: {len(x) - cut} more characters]"
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            return x

        return walk(obj)
