"""Vector columns: the round trip through parquet keeps dtype and values; chunked and reordered reads copy once
into the right rows."""

import numpy as np
import pyarrow as pa
import pytest

from datasel_ray.io.vectors import VectorType, vector_array, vector_numpy


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_through_parquet_keeps_dtype_and_values(tmp_path, dtype):
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).normal(size=(7, 5)).astype(dtype)
    pq.write_table(pa.table({"v": vector_array(x)}), tmp_path / "t.parquet")
    column = pq.read_table(tmp_path / "t.parquet").column("v")
    assert isinstance(column.type, VectorType) and column.type.width == 5
    got = vector_numpy(column)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, x)


def test_chunked_and_ordered_reads_put_each_row_in_its_place():
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 3)).astype(np.float16) for n in (4, 0, 6, 1)]
    column = pa.chunked_array([vector_array(p) for p in parts])
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(vector_numpy(column), whole)
    order = rng.permutation(len(whole))
    np.testing.assert_array_equal(vector_numpy(column, order), whole[order])
    sliced = vector_array(whole).slice(3, 5)  # a chunk with a non-zero offset
    np.testing.assert_array_equal(vector_numpy(sliced), whole[3:8])


def test_vector_array_shares_the_numpy_buffer_and_stays_valid():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    arr = vector_array(x)
    del x  # the arrow buffer keeps the array alive
    np.testing.assert_array_equal(vector_numpy(arr), np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match="2-D"):
        vector_array(np.zeros(3))
