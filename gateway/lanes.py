"""The replay lane: calls that `tagway replay` sends (`x-tagway-source: replay` or `replay-judge`) share at most
`server.replay_concurrency` slots in the gateway, so a replay run at full speed cannot starve production calls of
the event loop and CPU (bench/live_bench.py measures production p99 with and without a 1,000-case replay).
Production calls never wait here; a replay call over the limit waits for a slot (the replay's own retries and
timeouts still apply)."""
from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["ReplayLane", "is_replay_call"]


def is_replay_call(scope: dict) -> bool:
    for name, value in scope["headers"]:
        if name == b"x-tagway-source":
            return value.startswith(b"replay")
    return False


class ReplayLane:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: asyncio.Semaphore | None = None  # made on first use, on the serving loop

    async def __call__(self, inner: Any, scope: dict, receive: Any, send: Any) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            await inner(scope, receive, send)
