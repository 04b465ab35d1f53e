"""The embedded store's inserts read rows as plain types and convert them in INSERT ... SELECT (exporters/store.py):
the same values as the driver's own insert, expressions of DEFAULT columns kept, a table's new columns seen after
a migration run by any client of the process, bad rows refused as before."""
from __future__ import annotations

import orjson
import pytest

from exporters.insert_errors import may_be_poison
from exporters.rows import encode_spans
from exporters.store import StoreError, _settings_clause, connect, plain_read, plain_type
from tests.replay_support import call_span, unique
from tests.test_export_rows import _spans


def test_plain_type_drops_every_low_cardinality_wrapper():
    assert plain_type("LowCardinality(String)") == "String"
    assert plain_type("Map(LowCardinality(String), String)") == "Map(String, String)"
    assert plain_type("Array(Map(LowCardinality(String), String))") == "Array(Map(String, String))"
    assert plain_type("LowCardinality(Nullable(String))") == "Nullable(String)"
    assert plain_type("Tuple(LowCardinality(String), LowCardinality(String))") == "Tuple(String, String)"
    assert plain_type("Nullable(Float64)") == "Nullable(Float64)"


def test_plain_read_only_where_it_changes_nothing():
    assert plain_read([("a", "LowCardinality(String)", ""), ("n", "UInt8", ""), ("x", "String", "ALIAS")]) == \
        ("`a`, `n`", "`a` String, `n` UInt8")
    assert plain_read([("a", "String", ""), ("n", "UInt8", "")]) is None  # nothing to gain
    assert plain_read([("a", "LowCardinality(String)", ""), ("t", "DateTime", "DEFAULT")]) is None
    assert plain_read([("a", "LowCardinality(String)", ""), ("t", "String", "MATERIALIZED")]) is None


def test_settings_are_sent_as_the_driver_sends_them():
    assert _settings_clause({"max_threads": 1, "insert_deduplicate": True, "skip": None,
                             "insert_deduplication_token": "tagway-ab'c"}) == \
        "max_threads = 1, insert_deduplicate = 1, insert_deduplication_token = 'tagway-ab\\'c'"
    with pytest.raises(StoreError, match="not a ClickHouse setting name"):
        _settings_clause({"max_threads = 1; DROP TABLE x --": 1})


def test_the_rows_file_is_removed_whatever_happens(chdb_store, tmp_path, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    chdb_store.insert_json_rows("otel_traces", encode_spans(_spans()).body)
    with pytest.raises(StoreError):
        chdb_store.insert_json_rows("otel_traces", b'{"Duration": "not a number"}\n')
    assert list(tmp_path.iterdir()) == []


def _rows(store, table: str) -> list[tuple]:
    return store.query_rows(f"SELECT * FROM {table} ORDER BY SpanId")[0]


def test_spans_read_back_as_the_drivers_own_insert_stores_them(chdb_store):
    """Events, links, maps and LowCardinality columns: a twin table filled through clickhouse-connect's own
    JSONEachRow insert holds exactly the same rows."""
    batch = encode_spans(_spans())
    chdb_store.command("CREATE TABLE plain_twin AS otel_traces")
    chdb_store.command("CREATE TABLE plain_mine AS otel_traces")
    chdb_store.insert_json_rows("plain_mine", batch.body)
    chdb_store._client.raw_insert("plain_twin", insert_block=batch.body, fmt="JSONEachRow")  # the driver's path
    mine, twin = _rows(chdb_store, "plain_mine"), _rows(chdb_store, "plain_twin")
    assert len(mine) == 2 and mine == twin
    child = next(r for r in chdb_store.query("SELECT * FROM plain_mine") if r["SpanName"] == "chat m")
    assert child["Events.Name"] == ["first-chunk"] and child["Links.Attributes"] == [{"why": "replay"}]
    assert child["SpanAttributes"]["seq"] == '["a","b"]' and child["StatusCode"] == "Error"


def test_a_default_expression_is_computed_as_before(chdb_store):
    chdb_store.command("CREATE TABLE plain_defaults (a LowCardinality(String), c String DEFAULT concat(a, '!')) "
                       "ENGINE = MergeTree ORDER BY a")
    chdb_store.insert_json_rows("plain_defaults", b'{"a": "x"}\n')
    assert chdb_store.query_rows("SELECT a, c FROM plain_defaults")[0] == [("x", "x!")]


def test_a_column_added_by_any_client_of_the_process_is_filled(chdb_store):
    chdb_store.command("CREATE TABLE plain_grows (a LowCardinality(String)) ENGINE = MergeTree ORDER BY a")
    chdb_store.insert_json_rows("plain_grows", b'{"a": "1"}\n')
    other = connect(chdb_store.dsn, role="plain-test")  # a client of its own, as the store API's pools are
    try:
        other.command("ALTER TABLE plain_grows ADD COLUMN b LowCardinality(String)")
    finally:
        other.close()
    chdb_store.insert_json_rows("plain_grows", b'{"a": "2", "b": "B"}\n')
    assert chdb_store.query_rows("SELECT a, b FROM plain_grows ORDER BY a")[0] == [("1", ""), ("2", "B")]


def test_a_bad_row_is_refused_as_the_rows_fault(chdb_store):
    row = orjson.loads(encode_spans(_spans()).body.splitlines()[0])
    bad = orjson.dumps({**row, "Duration": "not a number"})
    with pytest.raises(StoreError) as e:
        chdb_store.insert_json_rows("otel_traces", bad)
    assert may_be_poison(e.value), str(e.value)  # a data error, set aside after its retries, as before


def test_a_resent_batch_with_its_token_is_stored_once_through_the_views(chdb_store):
    customer = unique("plain")
    spans = [call_span(customer=customer, intent="refund", user=f"u{i}", answer="ok") for i in range(3)]
    body = b"\n".join(orjson.dumps(s) for s in spans) + b"\n"
    for _ in range(2):  # a spool batch sent again after a crash between insert and unlink
        chdb_store.insert_json_rows("otel_traces", body, settings={"insert_deduplication_token": "tagway-plain-1"})
    assert chdb_store.query_rows(f"SELECT count() FROM llm_calls WHERE customer = '{customer}'")[0] == [(3,)]
    ids = ", ".join(f"'{s['TraceId']}'" for s in spans)
    assert chdb_store.query_rows(f"SELECT count() FROM otel_traces WHERE TraceId IN ({ids})")[0] == [(3,)]


def test_a_batch_spanning_too_many_days_may_be_its_rows_fault_and_too_many_parts_is_not(chdb_store):
    """TOO_MANY_PARTS (252) is a state of the table (wait), except when one insert spans more day partitions than
    max_partitions_per_insert_block: then halving the batch helps, so it may be poison (it was retried for ever)."""
    import time  # noqa: PLC0415

    now = int(time.time())
    rows = b"".join(orjson.dumps({"Timestamp": f"{now + day * 86400}.000000000", "TraceId": unique("days"),
                                  "SpanId": "ab" * 8, "SpanName": "x", "Duration": 1}) + b"\n" for day in range(101))
    with pytest.raises(StoreError) as e:  # the real engine's refusal: 101 days in one block
        chdb_store.insert_json_rows("otel_traces", rows)
    assert e.value.code == 252 and may_be_poison(e.value), str(e.value)[:300]
    assert not may_be_poison(StoreError("Code: 252. DB::Exception: Too many parts (3001) in table 'x'. Merges are "
                                        "processing significantly slower than inserts. (TOO_MANY_PARTS)"))
