"""The lock (seed 004: "every fixed bug becomes a permanent lock"): a locked dataset case is a unit test, not a
sample. Its expected outcome (pass, or fail for a case the system must keep failing) is checked case by case, and
one locked case that does not keep it makes the candidate a regression, whatever the segment statistics say: no
test, no alpha, no margin. Pure functions; `verdicts.decide` applies them.

An errored result counts as a failure under `errors: fail` (the default) and is undecided under `errors: exclude`
(the run is incomplete then anyway, so the gate is not final); a locked case not run yet is undecided too.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

__all__ = ["LockResult", "check_locks", "HELD", "BROKEN", "UNDECIDED"]

HELD, BROKEN, UNDECIDED = "held", "broken", "undecided"


@dataclasses.dataclass(frozen=True)
class LockResult:
    trace_id: str
    expect: str  # pass | fail
    got: str  # pass | fail | "" (no decided outcome)
    note: str = ""
    segment: str = ""

    @property
    def state(self) -> str:
        if not self.got:
            return UNDECIDED
        return HELD if self.got == self.expect else BROKEN

    def describe(self) -> str:
        note = f" ({self.note})" if self.note else ""
        got = self.got or "no decided outcome"
        return f"locked case {self.trace_id}{note}: expected {self.expect}, got {got}"


def check_locks(locks: Mapping[str, Mapping[str, str]], outcomes: Mapping[str, bool | None],
                segments: Mapping[str, str] | None = None) -> list[LockResult]:
    """`locks`: trace id -> {expect, note}; `outcomes`: trace id -> the candidate passed (True), failed (False) or
    undecided (None or absent). Broken locks first, then by trace id."""
    out = []
    for tid, lk in locks.items():
        o = outcomes.get(tid)
        got = "" if o is None else "pass" if o else "fail"
        out.append(LockResult(tid, str(lk.get("expect") or "pass"), got, str(lk.get("note") or ""),
                              (segments or {}).get(tid, "")))
    out.sort(key=lambda r: (r.state != BROKEN, r.trace_id))
    return out
