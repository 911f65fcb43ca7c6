"""Location on a local path and on a non-local pyarrow filesystem (Arrow's in-memory mock filesystem)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from datasel_ray.io.storage import Location, read_parquet_dir


@pytest.fixture(params=["local", "mock"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(str(tmp_path / "run"))
    fs, _ = pafs.FileSystem.from_uri("mock:///")
    return Location(fs, "bucket/run", "mock://")


def test_round_trips_and_listing(root):
    (root / "a" / "x.json").write_json({"k": [1, 2]})
    (root / "a" / "y.npy").write_npy(np.arange(5, dtype=np.int64))
    (root / "a" / "z.parquet").write_parquet(pa.table({"row_id": [3, 1]}))
    (root / "a" / "w.parquet").write_parquet(pa.table({"row_id": [7]}))
    assert (root / "a" / "x.json").read_json() == {"k": [1, 2]}
    np.testing.assert_array_equal((root / "a" / "y.npy").read_npy(), np.arange(5))
    assert [f.name for f in (root / "a").list(".parquet")] == ["w.parquet", "z.parquet"]
    assert read_parquet_dir(root / "a").column("row_id").to_pylist() == [7, 3, 1]
    assert read_parquet_dir(root / "missing") is None
    assert (root / "a").is_dir() and (root / "a" / "x.json").is_file()
    (root / "a").delete()
    assert not (root / "a").exists()


def test_overwrite_is_whole_and_leaves_no_temporary_file(root):
    target = root / "f.bin"
    target.write_bytes(b"old")
    target.write_bytes(b"new-content")
    assert target.read_bytes() == b"new-content"
    assert [f.name for f in root.list()] == ["f.bin"]


def test_uri_text_round_trip():
    loc = Location.parse("file:///tmp/some/run")
    assert loc.is_local and str(loc) == "/tmp/some/run"
    assert str(Location.parse("/tmp/x") / "samples") == "/tmp/x/samples"
    with pytest.raises(ValueError, match="must not be empty"):
        Location.parse("")


def test_row_range_reads_only_its_row_groups(root):
    import pyarrow.parquet as pq

    table = pa.table({"row_id": pa.array(np.arange(10, dtype=np.int64)), "text": [f"t{i}" for i in range(10)]})
    loc = root / "samples" / "s.parquet"
    loc.write_parquet(table, row_group_rows=3)
    with loc.open_input() as handle:
        assert pq.ParquetFile(handle).metadata.num_row_groups == 4
    for offset, count in [(0, 3), (3, 3), (4, 5), (9, 1), (0, 10), (8, 5)]:
        assert loc.read_parquet_rows(offset, count).equals(table.slice(offset, count)), (offset, count)
    assert loc.read_parquet_rows(2, 4, ["text"]).column("text").to_pylist() == ["t2", "t3", "t4", "t5"]
    assert loc.read_parquet_rows(10, 3).num_rows == 0
