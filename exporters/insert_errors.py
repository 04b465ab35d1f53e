"""Which failed inserts might be the batch's own fault (a poison batch) rather than ClickHouse's state. Pure.

A batch that ClickHouse refuses with the same data error every time would otherwise be retried forever from the
spool, with every later batch waiting behind it. Only errors the server *answered* with a code can be the data's
fault; of those, the codes below are states of the server (overload, limits, schema not there yet, read-only,
shutting down...) that pass, and are retried as outages are.
"""
from __future__ import annotations

from .store import StoreError

__all__ = ["may_be_poison", "TRANSIENT_CODES"]

# ClickHouse error codes (src/Common/ErrorCodes.cpp) that say nothing about the rows sent
TRANSIENT_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE (a cut connection)
    16,   # NO_SUCH_COLUMN_IN_TABLE: a migration not applied yet
    60,   # UNKNOWN_TABLE
    81,   # UNKNOWN_DATABASE
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    243,  # NOT_ENOUGH_SPACE
    252,  # TOO_MANY_PARTS
    285,  # TOO_FEW_LIVE_REPLICAS
    319,  # UNKNOWN_STATUS_OF_INSERT
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    439,  # CANNOT_SCHEDULE_TASK
    999,  # KEEPER_EXCEPTION
})


def may_be_poison(err: BaseException) -> bool:
    """The server answered, and with an error that can come from the rows themselves."""
    code = err.code if isinstance(err, StoreError) else None
    return code is not None and code not in TRANSIENT_CODES
