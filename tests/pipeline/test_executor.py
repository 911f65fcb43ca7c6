"""resumable_map: results persisted per item, reloaded instead of recomputed, and readable lazily."""

import numpy as np
import pytest

from datasel_ray.io.storage import Location
from datasel_ray.pipeline.executor import LocalExecutor, StoredResult, load_result, resumable_map, save_result


def _partials(item: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(item)
    return {"sums": rng.normal(size=(3, 4)), "count": np.array([item])}


def test_stored_results_equal_returned_results_and_read_lazily(tmp_path):
    work = Location.parse(str(tmp_path / "work"))
    returned = resumable_map(LocalExecutor(), _partials, [1, 2, 3], ["a", "b", "c"], work / "one")
    stored = resumable_map(LocalExecutor(), _partials, [1, 2, 3], ["a", "b", "c"], work / "two", stored=True)
    assert all(isinstance(r, StoredResult) for r in stored)
    for item, r in zip([1, 2, 3], returned):  # item order, the values fn returned
        np.testing.assert_array_equal(r["sums"], _partials(item)["sums"])
    for r, s in zip(returned, stored):
        assert set(s) == {"sums", "count"} and "sums" in s and "missing" not in s and len(s) == 2
        np.testing.assert_array_equal(s["sums"], r["sums"])
        np.testing.assert_array_equal(s["count"], r["count"])
    with pytest.raises(KeyError):
        stored[0]["missing"]


def test_finished_items_are_loaded_not_recomputed(tmp_path):
    work = Location.parse(str(tmp_path / "work"))
    first = resumable_map(LocalExecutor(), _partials, [1, 2], ["a", "b"], work)
    calls = []

    def counting(item):
        calls.append(item)
        return _partials(item)

    again = resumable_map(LocalExecutor(), counting, [1, 2, 3], ["a", "b", "c"], work)
    assert calls == [3]
    np.testing.assert_array_equal(again[1]["sums"], first[1]["sums"])
    with pytest.raises(ValueError, match="unique key"):
        resumable_map(LocalExecutor(), _partials, [1, 2], ["a", "a"], work)


def test_save_result_round_trip_is_atomic(tmp_path):
    loc = Location.parse(str(tmp_path / "r.npz"))
    save_result(loc, {"x": np.arange(5.0)})
    assert list((tmp_path).iterdir()) == [tmp_path / "r.npz"]  # no temporary file left behind
    np.testing.assert_array_equal(load_result(loc)["x"], np.arange(5.0))
