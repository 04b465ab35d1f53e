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
