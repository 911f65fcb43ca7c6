"""Duplicate pool ids: the first row (pool order) is kept, every later one is quarantined as duplicate_id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.validation import first_seen_duplicates
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.ingest import DUPLICATES_SUFFIX, quarantine_duplicate_ids, run_ingest


def _record(sample_id, text):
    rec = {"conversations": [{"from": "human", "value": f"question {text}"}, {"from": "gpt", "value": "answer"}]}
    if sample_id is not None:
        rec["id"] = sample_id
    return rec


def test_first_seen_duplicates_is_independent_of_input_order():
    row_ids = np.array([0, 1, 2, 3, 4, 5, (1 << 40) + 0, (1 << 40) + 1], dtype=np.int64)
    ids = np.array(["a", "b", "a", "", "", "b", "a", "c"], dtype=object)
    dup, first = first_seen_duplicates(row_ids, ids)
    assert row_ids[dup].tolist() == [2, 5, 1 << 40]
    assert row_ids[first].tolist() == [0, 1, 0]
    perm = np.random.default_rng(0).permutation(len(row_ids))
    dup_p, first_p = first_seen_duplicates(row_ids[perm], ids[perm])
    assert row_ids[perm][dup_p].tolist() == [2, 5, 1 << 40]
    assert row_ids[perm][first_p].tolist() == [0, 1, 0]


def test_first_seen_duplicates_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same length"):
        first_seen_duplicates(np.arange(3), np.array(["a", "b"], dtype=object))


@pytest.fixture
def dup_pool(tmp_path):
    """Two JSONL files; ids repeat inside a block, across blocks of one file and across files."""
    pool = tmp_path / "pool"
    pool.mkdir()
    a = ["x", "y", "x", "z", None, None, "y", "w"]  # blocks of 3: [x y x] [z - -] [y w]
    b = ["w", "v", 7, "7"]  # "w" first seen in a.jsonl; 7 and "7" are the same id as text
    (pool / "a.jsonl").write_text("".join(json.dumps(_record(i, k)) + "\n" for k, i in enumerate(a)))
    (pool / "b.jsonl").write_text("".join(json.dumps(_record(i, k)) + "\n" for k, i in enumerate(b)))
    return pool


def _run(pool, run_dir):
    cfg = RunConfig.model_validate({"run_dir": str(run_dir), "pool": {
        "path": str(pool), "records_per_block": 3, "check_images": False, "executor": "local"}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    return rd, run_ingest(cfg, rd, quiet=True)


def _quarantine(rd):
    q = load_table(rd, "quarantine/ingest").sort_by(schema.ROW_ID)
    return [(r[schema.SOURCE_FILE].rsplit("/", 1)[-1], r[schema.SOURCE_INDEX], r[schema.REASON], r[schema.MESSAGE])
            for r in q.to_pylist()]


def test_later_rows_with_a_seen_id_are_quarantined(dup_pool, tmp_path):
    rd, counts = _run(dup_pool, tmp_path / "run")
    a, b = str(dup_pool / "a.jsonl"), str(dup_pool / "b.jsonl")
    msg = "id: {!r} was already used by record {} of {}; ids must be unique in the pool, only the first valid row " \
          "with an id is kept"
    assert _quarantine(rd) == [
        ("a.jsonl", 2, "duplicate_id", msg.format("x", 0, a)),
        ("a.jsonl", 6, "duplicate_id", msg.format("y", 1, a)),
        ("b.jsonl", 0, "duplicate_id", msg.format("w", 7, a)),
        ("b.jsonl", 3, "duplicate_id", msg.format("7", 2, b)),
    ]
    samples = load_table(rd, "samples").sort_by(schema.ROW_ID)
    kept = [(r[schema.SOURCE_FILE].rsplit("/", 1)[-1], r[schema.SOURCE_INDEX], r[schema.SAMPLE_ID])
            for r in samples.to_pylist()]
    assert kept == [("a.jsonl", 0, "x"), ("a.jsonl", 1, "y"), ("a.jsonl", 3, "z"), ("a.jsonl", 4, ""),
                    ("a.jsonl", 5, ""), ("a.jsonl", 7, "w"), ("b.jsonl", 1, "v"), ("b.jsonl", 2, "7")]
    assert counts["by_reason"] == {"duplicate_id": 4}
    assert counts["samples"] == 8 and counts["rows_in"] == 12
    quarantined_raw = load_table(rd, "quarantine/ingest").sort_by(schema.ROW_ID).column(schema.RAW).to_pylist()
    assert json.loads(quarantined_raw[0]) == _record("x", 2)
    assert quarantine_duplicate_ids(rd) == 0  # idempotent: nothing left to move


def test_resume_after_a_lost_shard_gives_the_same_split(dup_pool, tmp_path):
    rd, first = _run(dup_pool, tmp_path / "run")
    before_q, before_s = _quarantine(rd), column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID))
    dup_shards = [f.name for f in (rd / "quarantine" / "ingest").list(".parquet") if f.name.endswith(DUPLICATES_SUFFIX)]
    assert dup_shards == ["00000-0000000000.duplicate_id.parquet", "00000-0000000006.duplicate_id.parquet",
                          "00001-0000000000.duplicate_id.parquet", "00001-0000000003.duplicate_id.parquet"]
    # the shard of a block whose duplicate was already moved, as a killed ingest (or a user) would lose it
    (rd / "samples" / "00000-0000000000.parquet").delete()
    rd, second = _run(dup_pool, tmp_path / "run")
    assert _quarantine(rd) == before_q
    np.testing.assert_array_equal(column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID)), before_s)
    assert second == {**first, "seconds": second["seconds"]}


def test_an_id_first_used_by_a_rejected_row_is_kept_on_its_first_valid_row(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    bad = {"id": "q", "conversations": [{"from": "human", "value": "no answer"}]}
    rows = [bad, _record("q", 1), _record("q", 2)]
    (pool / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rd, counts = _run(pool, tmp_path / "run")
    a = str(pool / "a.jsonl")
    assert [q[:3] for q in _quarantine(rd)] == [("a.jsonl", 0, "no_assistant_turn"), ("a.jsonl", 2, "duplicate_id")]
    assert _quarantine(rd)[1][3].startswith(f"id: 'q' was already used by record 1 of {a};")
    assert load_table(rd, "samples").column(schema.SOURCE_INDEX).to_pylist() == [1]
