"""Streaming split of pool files: blocks read back exactly the records of the file."""

from __future__ import annotations

import json

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
