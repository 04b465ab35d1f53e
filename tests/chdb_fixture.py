"""The one embedded ClickHouse (chDB) store of a test session.

chDB lets a process open one data path, ever, while any client is open; so every test in a pytest process shares
this store and isolates its data by unique ids (customers, trace ids, run ids) instead of opening fresh stores.
Tests that need a store of their own run the gateway as a subprocess.
"""
from __future__ import annotations

import pytest

from exporters.schema import SchemaSettings, migrate
from exporters.store import Store, connect


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"chdb://{tmp_path_factory.mktemp('chdb') / 'clickhouse'}"


@pytest.fixture(scope="session")
def chdb_store(chdb_dsn: str) -> Store:
    store = connect(chdb_dsn)
    migrate(store, SchemaSettings(rollup_tag_keys=("zone",)))  # the tag rollup's key (tests/test_rollups.py)
    yield store
    store.close()
