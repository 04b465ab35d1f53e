"""Redaction of captured content before it is recorded: built-in patterns (e-mail, card numbers, bearer tokens)
plus the operator's regexes. Applied to every string inside the captured structure, never to the JSON text, so
a pattern can never break the JSON it is recorded in.

Every pattern runs on RE2 (google-re2): matching is linear in the text whatever the pattern, so no prompt can make
redaction backtrack (one 98 KB prompt against a backtracking e-mail regex held the event loop for 8-27 s), and an
operator's pattern that would backtrack in Python's `re` cannot stall the gateway either. RE2 refuses what it
cannot run in linear time (backreferences, look-around): such a pattern is a config error, said at start-up.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import orjson
import re2

from exporters.vocabulary import REDACTED_MARK, TRUNCATED_MARK

__all__ = ["Redactor", "BUILTIN", "compile_pattern", "PatternError", "TRUNCATED"]

# RE2 refuses rather than backtracks; its log lines about refused patterns are noise next to our own error
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


class PatternError(ValueError):
    pass


def compile_pattern(pattern: str) -> Any:
    try:
        return re2.compile(pattern, options=_OPTIONS)
    except re2.error as e:
        why = e.args[0] if e.args else str(e)  # RE2 gives its reason as bytes
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        shown = f"'{pattern}'" if pattern.isprintable() else repr(pattern)  # one line, whatever the pattern holds
        raise PatternError(f"pattern {shown} cannot be used (RE2 syntax, no backreferences or look-around): "
                           f"{why}") from None


# Pre-checks: what a text must hold for a pattern to match in it, tested in C-speed string operations (Python's
# `re` walks ~10 ns a character, which on every call's content costs more than the patterns). Each is necessary
# for its pattern (never a guess), which is what lets `Redactor.deep` test a whole structure's JSON text once:
#   email: an `@`;  card: 13 ASCII digits (RE2's \d is ASCII);  bearer: `bearer`, `sk-` or `tw-` after Unicode case
#   folding (RE2's (?i) folds `ſ` to s and the Kelvin sign to k; `str.casefold` does too).
_NON_DIGIT = bytes(b for b in range(256) if not 48 <= b <= 57)
_NON_DIGITS = re.compile(r"\D")


def _digits(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass").translate(None, _NON_DIGIT))


def _bearer_hint(s: str) -> bool:
    folded = s.casefold()
    return "bearer" in folded or "sk-" in folded or "tw-" in folded


# name -> (pattern, replacement, pre-check that must pass before the pattern runs). Capture runs on every call,
# and most text holds no e-mail, card or token: the pre-checks keep redaction off the profile.
BUILTIN: dict[str, tuple[Any, str, Callable[[str], bool] | None]] = {
    "email": (compile_pattern(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), f"{REDACTED_MARK}:email]",
              lambda s: "@" in s),
    # 13-19 digits, optionally grouped by spaces or dashes; checked with Luhn so order ids survive
    "card": (compile_pattern(r"\b(?:\d[ -]?){12,18}\d\b"), f"{REDACTED_MARK}:card]", lambda s: _digits(s) >= 13),
    "bearer": (compile_pattern(r"(?i)\b(?:bearer\s+|sk-|tw-)[A-Za-z0-9._~+/=-]{16,}"), f"{REDACTED_MARK}:secret]",
               _bearer_hint),
}
TRUNCATED = "..." + TRUNCATED_MARK + " {} more characters]"


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


def _card(m: Any) -> str:
    text = m.group()
    return f"{REDACTED_MARK}:card]" if _luhn_ok(_NON_DIGITS.sub("", text)) else text


class Redactor:
    def __init__(self, builtin: list[str], patterns: list[str], max_chars: int = 200_000,
                 max_string_chars: int = 50_000) -> None:
        # Captured text per call is bounded (and per string): redacting and storing a multi-megabyte prompt would
        # cost every other call its share of the gateway. Past the budget, strings are cut and say so.
        self.max_chars = max_chars
        self.max_string_chars = max_string_chars
        self._rules: list[tuple[Any, Any, Callable[[str], bool] | None]] = []
        for name in builtin:
            rx, repl, precheck = BUILTIN[name]
            self._rules.append((rx, _card if name == "card" else repl, precheck))
        self._rules += [(compile_pattern(p), f"{REDACTED_MARK}]", None) for p in patterns]
        # every rule has a pre-check (the built-ins): a structure can be cleared in one test of its JSON text
        self._prechecks = [pre for _, _, pre in self._rules] if all(pre for _, _, pre in self._rules) else None

    def _quiet(self, obj: Any) -> str | None:
        """The structure's JSON text when `deep` would return `obj` unchanged: nothing to cut, and no rule's
        pre-check passes on that text; else None. Sound because a pre-check is necessary for its pattern and every
        character it looks for (`@`, digits, `-`, letters) is written as itself in orjson's JSON (UTF-8, not \\u
        escapes), so a string that would pass it makes the whole text pass it (escapes and keys can only add passes,
        which just means the walk below runs). Operator patterns have no pre-check: then every string is redacted
        one by one."""
        if self._prechecks is None:
            return None
        try:
            text = orjson.dumps(obj)
        except TypeError:  # not JSON (a caller's odd object): the walk handles it
            return None
        if len(text) > min(self.max_chars, self.max_string_chars):
            return None  # something may need cutting
        decoded = text.decode()
        for pre in self._prechecks:
            if pre(decoded):
                return None
        return decoded

    def text(self, s: str) -> str:
        for rx, repl, precheck in self._rules:
            if precheck is None or precheck(s):
                s = rx.sub(repl, s)
        return s

    def deep(self, obj: Any) -> Any:
        """Redact every string in a JSON-like structure (keys are left alone), within the character budget."""
        if self._quiet(obj) is not None:
            return obj
        return self._walk(obj)

    def json(self, obj: Any) -> str:
        """`deep(obj)` as the JSON text it is recorded as: a structure with nothing to redact or cut is serialised
        once, by the check that clears it."""
        text = self._quiet(obj)
        return text if text is not None else orjson.dumps(self._walk(obj)).decode()

    def _walk(self, obj: Any) -> Any:
        budget = [self.max_chars]

        def walk(x: Any) -> Any:
            if isinstance(x, str):
                cut = max(min(budget[0], self.max_string_chars), 0)
                if len(x) <= cut:
                    budget[0] -= len(x)
                    return self.text(x) if self._rules else x
                # redact a margin past the cut, so a secret straddling it is replaced whole before the cut
                head = x[:cut + 256]
                head = (self.text(head) if self._rules else head)[:cut]
                budget[0] -= cut
                return head + TRUNCATED.format(len(x) - cut)
            if isinstance(x, list):
                return [walk(v) for v in x]
            if isinstance(x, dict):
                return {k: walk(v) for k, v in x.items()}
            return x

        return walk(obj)
