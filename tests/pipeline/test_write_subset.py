"""The subset is written in the format ingest read each pool file in, and round-trips the original records."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasel_ray.config import RunConfig
from datasel_ray.io.pool import POOL_FILES
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.ingest import run_ingest
from datasel_ray.pipeline.select import write_subset


def _records(n, tag):
    return [{"id": f"{tag}{i}", "extra": {"k": i}, "conversations": [
        {"from": "human", "value": f"question {i} é"}, {"from": "gpt", "value": f"answer {i}"}]} for i in range(n)]


def _ingest(pool_path, run_dir, **pool):
    cfg = RunConfig.model_validate({"run_dir": str(run_dir), "pool": {
        "path": str(pool_path), "records_per_block": 4, "check_images": False, "executor": "local", **pool}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    run_ingest(cfg, rd, quiet=True)
    return rd


def test_jsonl_pool_with_an_unusual_suffix_round_trips(tmp_path):
    records = _records(10, "t")
    path = tmp_path / "data.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    rd = _ingest(path, tmp_path / "run", format="jsonl")
    recorded = (rd / "samples" / POOL_FILES).read_json()
    assert recorded == {"files": [{"index": 0, "uri": str(path), "format": "jsonl"}]}
    written = write_subset(rd, rd / "subset", np.array([9, 2, 5], dtype=np.int64))
    assert written == [str(rd / "subset" / "data.txt")]
    lines = (rd / "subset" / "data.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [records[2], records[5], records[9]]


def test_json_pool_round_trips(tmp_path):
    records = _records(9, "j")
    path = tmp_path / "pool.dat"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    rd = _ingest(path, tmp_path / "run", format="json")
    write_subset(rd, rd / "subset", np.array([0, 8], dtype=np.int64))
    assert json.loads((rd / "subset" / "pool.dat").read_text()) == [records[0], records[8]]


def test_parquet_pool_round_trips_the_original_rows(tmp_path):
    records = _records(23, "p")
    table = pa.Table.from_pylist(records)
    path = tmp_path / "pool.parquet"
    pq.write_table(table, path, row_group_size=5)
    rd = _ingest(path, tmp_path / "run")
    selected = np.array([1, 7, 22], dtype=np.int64)
    write_subset(rd, rd / "subset", selected)
    out = pq.read_table(str(rd / "subset" / "pool.parquet"))
    assert out.schema == table.schema
    assert out.to_pylist() == [records[1], records[7], records[22]]


def test_run_dirs_without_a_recorded_format_use_the_configured_one(tmp_path):
    records = _records(5, "o")
    path = tmp_path / "data.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rd = _ingest(path, tmp_path / "run", format="jsonl")
    (rd / "samples" / POOL_FILES).delete()
    write_subset(rd, rd / "subset", np.array([3], dtype=np.int64))
    assert [json.loads(x) for x in (rd / "subset" / "data.txt").read_text().splitlines()] == [records[3]]


def test_shards_out_of_source_order_still_give_source_order(tmp_path):
    """Ingest writes shards in source order, and the subset streams them; shards listed in another order are
    held and sorted instead, with the same output."""
    records = _records(12, "o")
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    rd = _ingest(path, tmp_path / "run", format="jsonl")
    shards = sorted((tmp_path / "run" / "samples").glob("*.parquet"))
    assert len(shards) >= 3
    first, last = shards[0], shards[-1]
    swap = first.with_name("swap.tmp")
    first.rename(swap)
    last.rename(first)
    swap.rename(last)
    write_subset(rd, rd / "subset", np.array([11, 0, 6, 1], dtype=np.int64))
    lines = (rd / "subset" / "pool.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [records[0], records[1], records[6], records[11]]
