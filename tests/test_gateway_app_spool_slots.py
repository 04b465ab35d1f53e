"""Worker processes sharing a server DSN take separate spool slots, and a restarted worker adopts a free one."""
from __future__ import annotations

import os

from gateway.app import default_recorder
from gateway.config import GatewayConfig
from tests.gateway_fixture import free_port


def test_workers_take_free_spool_slots(tmp_path):
    cfg = GatewayConfig(storage={"dsn": f"http://default:pw@127.0.0.1:{free_port()}/tagway",
                                 "spool_dir": str(tmp_path / "spool")})
    first, second = default_recorder(cfg), default_recorder(cfg)
    try:
        dirs = {os.path.basename(first.spool.directory), os.path.basename(second.spool.directory)}
        assert dirs == {"worker-0", "worker-1"}
    finally:
        first.shutdown()
    third = default_recorder(cfg)  # the first worker's slot is free again: its replacement takes it
    try:
        assert os.path.basename(third.spool.directory) == "worker-0"
    finally:
        second.shutdown()
        third.shutdown()


def test_a_restart_with_fewer_workers_takes_over_the_missing_workers_spools(tmp_path):
    """Two workers spooled while ClickHouse was down; restarted with one, the gateway only opened worker-0: the 16
    spans in worker-1 were never sent, counted or mentioned. Now the restarted process moves every free slot's files
    (and what its write-ahead log held) into its own; a slot still held by a running worker is left alone."""
    from exporters.recording import WAL_DIR  # noqa: PLC0415
    from exporters.rows import EncodedBatch  # noqa: PLC0415
    from exporters.spool import Spool  # noqa: PLC0415
    from exporters.wal import WriteAheadLog  # noqa: PLC0415

    spool_root = tmp_path / "spool"
    cfg = GatewayConfig(storage={"dsn": f"http://default:pw@127.0.0.1:{free_port()}/tagway",
                                 "spool_dir": str(spool_root)})
    row = b'{"TraceId":"t","SpanName":"chat m"}\n'
    for slot, files in ((0, 2), (1, 3), (2, 1)):
        s = Spool(str(spool_root / f"worker-{slot}"), fsync=False)
        for _ in range(files):
            s.write(EncodedBatch.of("otel_traces", row * 4, 4))
        s.close()
    wal = WriteAheadLog(str(spool_root / "worker-1" / WAL_DIR))  # a killed worker's last chunk, never batched
    wal.chunk(0, 5, row * 5)
    held = Spool(str(spool_root / "worker-2"), fsync=False)  # a worker that still runs
    recorder = default_recorder(cfg)
    try:
        mine = recorder.spool
        assert os.path.basename(mine.directory) == "worker-0"
        assert mine.pending_files == 2 + 3 + 1 and mine.pending_spans() == 2 * 4 + 3 * 4 + 5
        assert not [n for n in os.listdir(spool_root / "worker-1") if n.endswith(".spool")]
        assert held.pending_files == 1  # not taken from a running worker
    finally:
        recorder.shutdown()
        held.close()
