"""FeatureStore's row index: ids in order, task codes into sorted names, each shard's positions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasel_ray.io.storage import Location
from datasel_ray.pipeline.store import FeatureStore


def _shard(path, ids, tasks):
    pq.write_table(pa.table({"row_id": pa.array(ids, pa.int64()), "task": pa.array(tasks, pa.string()),
                             "tau": np.arange(len(ids), dtype=np.float32)}), path)


def test_row_index_over_shards_that_meet_tasks_in_different_orders(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    # tasks first seen in the order zeta, beta, alpha, é; ids interleaved across shards
    _shard(features / "part-000000.parquet", [4, 0, 7], ["zeta", "beta", "zeta"])
    _shard(features / "part-000001.parquet", [1, 6], ["alpha", "é"])
    _shard(features / "part-000002.parquet", [5, 3, 2], ["beta", "alpha", "zeta"])
    store = FeatureStore(Location.parse(str(features)))
    assert store.row_ids.tolist() == list(range(8))
    assert store.task_names.tolist() == ["alpha", "beta", "zeta", "é"]
    by_id = {4: "zeta", 0: "beta", 7: "zeta", 1: "alpha", 6: "é", 5: "beta", 3: "alpha", 2: "zeta"}
    assert store.tasks.tolist() == [by_id[i] for i in range(8)]
    assert store.task_codes.dtype == np.int64
    assert store.task_names[store.task_codes].tolist() == [by_id[i] for i in range(8)]
    assert [p.tolist() for p in store.shard_pos] == [[4, 0, 7], [1, 6], [5, 3, 2]]


def test_a_row_id_in_two_shards_is_refused(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    _shard(features / "part-000000.parquet", [0, 1], ["a", "a"])
    _shard(features / "part-000001.parquet", [1], ["b"])
    with pytest.raises(RuntimeError, match="more than one shard"):
        FeatureStore(Location.parse(str(features)))
