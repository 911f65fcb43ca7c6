"""The partition tasks of the fit steps: typed and frozen; intermediate files read fresh (never a stale copy)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from datasel_ray.io import layout
from datasel_ray.io.storage import Location
from datasel_ray.pipeline.executor import save_result
from datasel_ray.pipeline.fit import coincide, datatailor, tive
from datasel_ray.pipeline.fit.context import Partition


def test_a_projection_rewritten_in_the_same_process_is_read_fresh(tmp_path):
    """``--force aggregate`` in one process rewrites stats/coincide/projection.npz: the next read sees it."""
    stats = Location.parse(str(tmp_path / "stats"))
    assert coincide.load_projection(stats) is None
    save_result(stats / layout.PROJECTION, {"A": np.ones((4, 2), np.float32), "b": np.zeros(2, np.float32)})
    A, _ = coincide.load_projection(stats)
    assert A.sum() == 8
    save_result(stats / layout.PROJECTION, {"A": np.full((4, 2), 3, np.float32), "b": np.zeros(2, np.float32)})
    A, _ = coincide.load_projection(stats)
    assert A.sum() == 24
    (stats / layout.PROJECTION).delete()
    assert coincide.read_projection(str(stats / layout.PROJECTION)) is None


def test_partition_tasks_are_frozen_and_typed():
    part = Partition(key="p0", files=("a.parquet", "b.parquet"), pos=(np.arange(3), np.arange(3, 5)))
    assert [(f, p.tolist()) for f, p in part.shards()] == [("a.parquet", [0, 1, 2]), ("b.parquet", [3, 4])]
    tasks = [
        coincide.GatherTask(part=part, want=np.array([1, 4]), clustering_space=True, projection=None, width=8),
        coincide.AssignTask(part=part, centroids="c.npy", bucket_plan="b.npy", regroup="r", projection=None,
                            unit=None),
        datatailor.RegroupTask(part=part, groups="g.npy", bucket_plan="b.npy", regroup="r"),
        tive.InstanceValuesTask(part=part, codes=(np.zeros(3, np.int64), np.ones(2, np.int64)), means="m.npy"),
    ]
    for task in tasks:
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.part = part  # a task is planned once and never changed afterwards
    assert {f.name: f.type for f in dataclasses.fields(coincide.AssignTask)}["unit"] == "str | None"
