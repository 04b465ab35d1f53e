"""Who owns the calls this process served lately, by trace id: a rating (POST /v1/tagway/feedback) can follow its call
by less than the recorder's batch window, before the call is in ClickHouse. Two generations of at most `size`
entries: O(1) to add and look up, memory bounded (~150 bytes an entry), nothing to expire. Added to on the event
loop, read from the thread pool: a dict read and a reference swap are atomic under the GIL."""
from __future__ import annotations

__all__ = ["RecentCalls"]


class RecentCalls:
    __slots__ = ("size", "_new", "_old")

    def __init__(self, size: int = 50_000) -> None:
        self.size = size
        self._new: dict[bytes, tuple[str, str]] = {}
        self._old: dict[bytes, tuple[str, str]] = {}

    def add(self, trace_id: bytes, customer: str, key_id: str) -> None:
        if len(self._new) >= self.size:
            self._old, self._new = self._new, {}
        self._new[trace_id] = (customer, key_id)

    def get(self, trace_id: str) -> tuple[str, str] | None:
        """(customer, key id) of a call served here lately, else None."""
        key = trace_id.encode()
        return self._new.get(key) or self._old.get(key)
