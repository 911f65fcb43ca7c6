"""Reads ``features/`` and ``samples/`` into numpy arrays sorted by row id.

Vector columns (:mod:`datasel_ray.io.vectors`; fixed-size lists of older runs too) come back as 2-D arrays in their stored dtype (fp16 for activations);
methods cast per block where they need more precision.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasel_ray import schema
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import read_parquet_dir
from datasel_ray.io.vectors import VectorType, vector_array, vector_numpy


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A pyarrow column as numpy; vector columns (and fixed-size lists) become 2-D arrays [N, width]."""
    if isinstance(column.type, VectorType):
        return vector_numpy(column)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), width)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.asarray(column.to_pylist(), dtype=object)
    return column.to_numpy(zero_copy_only=False)


def vector_column(values: np.ndarray) -> pa.ExtensionArray:
    """A 2-D array [N, width] as a vector column (:mod:`datasel_ray.io.vectors`; the inverse of
    :func:`column_to_numpy`)."""
    return vector_array(values)


def load_table(run_dir: RunDir, sub: str, columns: list[str] | None = None) -> pa.Table:
    table = read_parquet_dir(run_dir / sub, columns)
    if table is None:
        raise RuntimeError(f"No parquet files in {run_dir / sub}: run the phase that writes it first")
    return table.take(pc.sort_indices(table, [(schema.ROW_ID, "ascending")]))


def load_features(run_dir: RunDir, columns: list[str]) -> dict[str, np.ndarray]:
    """Feature columns (plus row_id) as numpy, sorted by row id."""
    wanted = list(dict.fromkeys([schema.ROW_ID, *columns]))
    present = feature_columns(run_dir)
    missing = [c for c in wanted if present and c not in present]
    if missing:
        raise RuntimeError(f"features/ in {run_dir} has no column(s) {', '.join(missing)}: "
                           f"re-run extract with the feature families these methods need (e.g. tive.enabled=true)")
    table = load_table(run_dir, "features", wanted)  # only these columns are decoded
    return {name: column_to_numpy(table.column(name)) for name in wanted}


def feature_columns(run_dir: RunDir) -> list[str]:
    """Column names of the feature shards (from the first shard's footer); [] when there is none."""
    files = (run_dir / "features").list(".parquet")
    if not files:
        return []
    import pyarrow.parquet as pq

    with files[0].open_input() as handle:
        return pq.ParquetFile(handle).schema_arrow.names
