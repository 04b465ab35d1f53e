"""Which failed inserts might be the batch's own fault (a poison batch) rather than ClickHouse's state. Pure.

A batch that ClickHouse refuses with the same data error every time would otherwise be retried forever from the
spool, with every later batch waiting behind it. Only errors the server *answered* with a code can be the data's
fault; of those, the codes below are states of the server or of our credentials (overload, limits, schema not there
yet, read-only, a rotated password, a missing grant, shutting down...) that pass once someone acts, and are retried
as outages are. Setting rows aside for them would quarantine good calls ("its rows were NOT sent") until an operator
re-queued them by hand.
"""
from __future__ import annotations

from .store import StoreError

__all__ = ["may_be_poison", "NotSentError", "TRANSIENT_CODES"]

# ClickHouse error codes (src/Common/ErrorCodes.cpp) that say nothing about the rows sent. Left out on purpose: the
# limits a batch can pass by its own size (TOO_MANY_ROWS 158, TOO_MANY_BYTES 307, TOO_MANY_ROWS_OR_BYTES 396,
# TOO_MANY_PARTITIONS 565), which halving the batch may get under. TOO_MANY_PARTS (252) is both: the table has too
# many parts (a state: wait), or one insert block spans more partitions (days) than max_partitions_per_insert_block
# allows (the rows: a batch whose timestamps jumped), told apart by the message (`_ROWS_252`).
TRANSIENT_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE (a cut connection)
    16,   # NO_SUCH_COLUMN_IN_TABLE: a migration not applied yet
    60,   # UNKNOWN_TABLE
    81,   # UNKNOWN_DATABASE
    95,   # CANNOT_READ_FROM_SOCKET
    96,   # CANNOT_WRITE_TO_SOCKET
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY (the user, or the server, in read-only mode)
    173,  # CANNOT_ALLOCATE_MEMORY
    192,  # UNKNOWN_USER
    193,  # WRONG_PASSWORD
    194,  # REQUIRED_PASSWORD
    195,  # IP_ADDRESS_NOT_ALLOWED
    201,  # QUOTA_EXCEEDED (QUOTA_EXPIRED on older servers)
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    204,  # CANNOT_FSYNC
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    218,  # TABLE_IS_DROPPED (being dropped or re-created)
    225,  # NO_ZOOKEEPER
    236,  # ABORTED
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY (a replica that lost Keeper)
    243,  # NOT_ENOUGH_SPACE
    244,  # UNEXPECTED_ZOOKEEPER_ERROR
    252,  # TOO_MANY_PARTS
    254,  # NO_ACTIVE_REPLICAS
    279,  # ALL_CONNECTION_TRIES_FAILED
    285,  # TOO_FEW_LIVE_REPLICAS
    286,  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    289,  # REPLICA_IS_NOT_IN_QUORUM
    291,  # DATABASE_ACCESS_DENIED
    319,  # UNKNOWN_STATUS_OF_INSERT
    364,  # RECEIVED_ERROR_TOO_MANY_REQUESTS
    384,  # PART_IS_TEMPORARILY_LOCKED
    394,  # QUERY_WAS_CANCELLED
    415,  # ALL_REPLICAS_LOST
    425,  # SYSTEM_ERROR
    439,  # CANNOT_SCHEDULE_TASK
    473,  # DEADLOCK_AVOIDED
    497,  # ACCESS_DENIED (no INSERT grant, or no DDL grant for a pending migration)
    511,  # UNKNOWN_ROLE
    512,  # SET_NON_GRANTED_ROLE
    516,  # AUTHENTICATION_FAILED
    574,  # DISTRIBUTED_TOO_MANY_PENDING_BYTES
    677,  # THREAD_WAS_CANCELED
    700,  # USER_SESSION_LIMIT_EXCEEDED
    720,  # USER_EXPIRED
    735,  # QUERY_WAS_CANCELLED_BY_CLIENT
    745,  # SERVER_OVERLOADED
    749,  # TCP_CONNECTION_LIMIT_REACHED
    762,  # HTTP_CONNECTION_LIMIT_REACHED
    774,  # TABLE_IS_PERMANENTLY_READ_ONLY
    777,  # MEMORY_RESERVATION_KILLED
    778,  # MEMORY_RESERVATION_FAILED
    999,  # KEEPER_EXCEPTION
    1017,  # ASYNC_INSERT_FLUSH_TIMEOUT
    1019,  # QUERY_SLOT_ACQUISITION_TIMEOUT
    1020,  # MEMORY_RESERVATION_ACQUISITION_TIMEOUT
})


class NotSentError(StoreError):
    """An insert that failed before its rows were sent (connecting, the server's version, the schema): whatever
    code ClickHouse gave, the rows had nothing to do with it."""


# ClickHouse's text for the partitions-per-insert limit ("Too many partitions for single INSERT block (more than
# 100). The limit is controlled by 'max_partitions_per_insert_block' setting")
_ROWS_252 = "max_partitions_per_insert_block"


def may_be_poison(err: BaseException) -> bool:
    """The server answered, and with an error that can come from the rows themselves."""
    if isinstance(err, NotSentError):
        return False
    code = err.code if isinstance(err, StoreError) else None
    if code == 252 and _ROWS_252 in str(err):
        return True  # halving the batch gets its rows under the limit (or sets the one that spans it aside)
    return code is not None and code not in TRANSIENT_CODES
