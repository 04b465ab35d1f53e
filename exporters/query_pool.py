"""Reads apart from writes: the stats API, the dashboard, the CLI's store API and budget reads go through pools of
clients of their own, so a heavy question neither waits behind the span inserts nor holds them up, and each
statement carries limits (memory, threads, a lower OS priority for its threads, and time but for the CLI's) so that
questions cannot take the CPU the gateway serves calls with. At most `size` statements run at once; others wait
their turn.
"""
from __future__ import annotations

import contextlib
import os
import queue
from typing import Any, Iterator, Sequence

from .store import Store, connect

__all__ = ["QueryPool", "query_settings"]


def query_settings(max_seconds: float | None, max_memory_bytes: int, max_threads: int) -> dict[str, Any]:
    """ClickHouse settings for a read. `max_seconds` None: no time limit. `max_threads` 0: half the machine's cores
    (the other half serves calls)."""
    out: dict[str, Any] = {"max_memory_usage": max_memory_bytes,
                           "max_threads": max_threads or max(1, (os.cpu_count() or 2) // 2),
                           "os_thread_priority": 10}  # niced: when both want the CPU, serving calls wins
    if max_seconds is not None:
        out["max_execution_time"] = max_seconds
    return out


class QueryPool:
    """`Store`'s statement methods over `size` clients of `dsn` (role `<role>-<i>`), one per statement at a time."""

    def __init__(self, dsn: str, *, size: int = 1, defaults: dict[str, Any] | None = None,
                 role: str = "query") -> None:
        self.dsn = dsn
        self._stores = [connect(dsn, role=f"{role}-{i}", defaults=defaults) for i in range(max(1, size))]
        self.embedded = self._stores[0].embedded
        self._free: queue.Queue[Store] = queue.Queue()
        for s in self._stores:
            self._free.put(s)

    @contextlib.contextmanager
    def _one(self) -> Iterator[Store]:
        store = self._free.get()
        try:
            yield store
        finally:
            self._free.put(store)

    def command(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> Any:
        with self._one() as s:
            return s.command(sql, parameters, settings)

    def query(self, sql: str, parameters: dict | None = None, settings: dict | None = None) -> list[dict]:
        with self._one() as s:
            return s.query(sql, parameters, settings)

    def query_rows(self, sql: str, parameters: dict | None = None,
                   settings: dict | None = None) -> tuple[Sequence[Sequence[Any]], tuple[str, ...]]:
        with self._one() as s:
            return s.query_rows(sql, parameters, settings)

    def insert_json_rows(self, table: str, body: bytes, settings: dict[str, Any] | None = None) -> None:
        with self._one() as s:
            s.insert_json_rows(table, body, settings)

    def ping(self) -> bool:
        with self._one() as s:
            return s.ping()

    def close(self) -> None:
        for s in self._stores:
            s.close()
