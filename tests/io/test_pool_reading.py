"""Streaming split of pool files: blocks read back exactly the records of the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasel_ray.io import pool as pool_io
from datasel_ray.io.pool import PoolError, list_pool_files, plan_blocks, read_block


@pytest.fixture
def records():
    tricky = 'quote " brace { } bracket [ ] backslash \\ unicode é'
    return [{"id": i, "conversations": [{"from": "human", "value": tricky * (i % 3)}]} for i in range(37)] + [7, "x"]


@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_is_split_while_streaming(tmp_path, monkeypatch, records, chunk, indent):
    monkeypatch.setattr(pool_io, "_SCAN_CHUNK", chunk)
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False))
    blocks = plan_blocks(list_pool_files(str(path)), records_per_block=6)
    assert len(blocks) == 7
    assert [r.value for b in blocks for r in read_block(b)] == records
    assert [r.record_index for b in blocks for r in read_block(b)] == list(range(len(records)))


def test_jsonl_broken_line_is_a_record_not_a_failed_read(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text('{"id": 1}\n{"id": 2\n\n{"id": 3}\n')
    out = [r for b in plan_blocks(list_pool_files(str(path)), 2) for r in read_block(b)]
    assert [r.record_index for r in out] == [0, 1, 2]
    assert out[1].value is None and "not valid JSON" in out[1].error
    assert out[2].value == {"id": 3}


def test_not_an_array_and_truncated_files_are_refused(tmp_path):
    (tmp_path / "a.json").write_text('{"id": 1}')
    with pytest.raises(PoolError, match="one JSON array"):
        plan_blocks(list_pool_files(str(tmp_path / "a.json")), 10)
    (tmp_path / "b.json").write_text('[{"id": 1}, {"id": 2')
    with pytest.raises(PoolError, match="not closed"):
        plan_blocks(list_pool_files(str(tmp_path / "b.json")), 10)


def test_missing_pool_is_a_clear_error(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        list_pool_files(str(tmp_path / "nope.json"))


class _GroupSpy:
    """Counts the row groups decoded through ``pq.ParquetFile``; a whole-file ``read`` fails the test."""

    def __init__(self, monkeypatch):
        import pyarrow.parquet as pq

        self.groups: list[list[int]] = []
        spy = self

        class SpyParquetFile(pq.ParquetFile):
            def read_row_groups(self, row_groups, *args, **kwargs):
                spy.groups.append(list(row_groups))
                return super().read_row_groups(row_groups, *args, **kwargs)

            def read(self, *args, **kwargs):
                raise AssertionError("read the whole parquet file")

        monkeypatch.setattr(pq, "ParquetFile", SpyParquetFile)


def _parquet_pool(tmp_path, n=45, group=7):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(n)]
    path = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return path, rows


def test_parquet_blocks_decode_only_their_row_groups(tmp_path, monkeypatch):
    path, rows = _parquet_pool(tmp_path)  # groups of 7 rows: [0-6] [7-13] ... [42-44]
    blocks = plan_blocks(list_pool_files(str(path)), records_per_block=10)
    spy = _GroupSpy(monkeypatch)
    read = [[r.value for r in read_block(b)] for b in blocks]
    assert [v for block in read for v in block] == rows
    assert spy.groups == [[0, 1], [1, 2], [2, 3, 4], [4, 5], [5, 6]]


def test_read_parquet_records_keeps_the_order_and_reads_only_needed_groups(tmp_path, monkeypatch):
    from datasel_ray.io.storage import Location

    path, rows = _parquet_pool(tmp_path)
    spy = _GroupSpy(monkeypatch)
    table = pool_io.read_parquet_records(Location.parse(str(path)), np.array([44, 3, 5, 3, 15]))
    assert table.to_pylist() == [rows[44], rows[3], rows[5], rows[3], rows[15]]
    assert spy.groups == [[0, 2, 6]]
    with pytest.raises(PoolError, match=r"record indices must be in \[0, 45\), got 3..45"):
        pool_io.read_parquet_records(Location.parse(str(path)), np.array([3, 45]))
