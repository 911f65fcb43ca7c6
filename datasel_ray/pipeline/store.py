"""The feature store as partitions: ``features/`` shards read one at a time, never a whole column.

A :class:`FeatureStore` knows, from one read of the scalar columns, every row's id, task and shard; vector
columns are only ever decoded one shard at a time (by the partition tasks of the aggregate and select phases).

* **Shard**: one ``features/*.parquet`` file as the extract phase wrote it. The shard is the unit of every
  per-row kernel (projection, normalisation, assignment), so numbers do not depend on how shards are grouped.
* **Partition**: consecutive shards whose vector bytes stay under ``aggregate.partition_bytes``; one task each.

Rows are identified by their position in row-id order (``pos``); a shard covers the positions of its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasel_ray import schema
from datasel_ray.io.storage import Location
from datasel_ray.io.vectors import VectorType
from datasel_ray.pipeline.feature_store import column_to_numpy

__all__ = ["FeatureStore", "Partition", "read_shard"]


@dataclass(frozen=True)
class Partition:
    """Consecutive shards ``shards`` (indices into :attr:`FeatureStore.files`) processed by one task."""

    index: int
    shards: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.index:05d}"


def read_shard(path: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns of one shard as numpy (vectors as 2-D arrays in their stored dtype), in the shard's row order."""
    table = Location.parse(path).read_parquet(list(dict.fromkeys([schema.ROW_ID, *columns])))
    return {name: column_to_numpy(table.column(name)) for name in table.column_names}


class FeatureStore:
    """Row index of ``features/``: ids, tasks and shard of every row (scalars only), plus column widths.

    Attributes:
        files: shard paths (str), sorted by name (= row order of the extract phase).
        row_ids: int64[N] ascending; ``pos`` of a row is its index here.
        task_names: sorted unique tasks; task_codes: int64[N] index into task_names of each row's task;
        tasks: object[N] task of each row (built from the codes on access).
        shard_pos: per shard, int64 positions of its rows in the
            shard's own row order (the order :func:`read_shard` returns).
        widths: {vector column: width}; dtypes: {column: pyarrow value type}.
    """

    def __init__(self, features: Location):
        files = features.list(".parquet")
        if not files:
            raise RuntimeError(f"No parquet files in {features}: run the extract phase first")
        self.files = [str(f) for f in files]
        ids, local_codes, first_seen = [], [], {}
        for f in files:
            with f.open_input() as handle:
                t = pq.read_table(handle, columns=[schema.ROW_ID, schema.TASK])
            ids.append(column_to_numpy(t.column(schema.ROW_ID)).astype(np.int64))
            # per shard: its few distinct task strings, then codes (no per-row Python or unicode strings)
            encoded = t.column(schema.TASK).combine_chunks().dictionary_encode()
            lut = np.array([first_seen.setdefault(name, len(first_seen)) for name in encoded.dictionary.to_pylist()],
                           dtype=np.int64)
            local_codes.append(lut[encoded.indices.to_numpy(zero_copy_only=False)])
        with files[0].open_input() as handle:
            arrow_schema = pq.ParquetFile(handle).schema_arrow
        self.columns = list(arrow_schema.names)
        self.widths = {f.name: f.type.width if isinstance(f.type, VectorType) else f.type.list_size
                       for f in arrow_schema if isinstance(f.type, VectorType) or pa.types.is_fixed_size_list(f.type)}
        self.itemsize = {f.name: np.dtype(f.type.dtype_name).itemsize if isinstance(f.type, VectorType)
                         else f.type.value_type.bit_width // 8 for f in arrow_schema if f.name in self.widths}
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        self.row_ids = all_ids[order]
        del all_ids
        if len(self.row_ids) > 1 and np.any(np.diff(self.row_ids) == 0):
            raise RuntimeError(f"{features}: a row id appears in more than one shard")
        pos_of = np.empty(len(order), dtype=np.int64)
        pos_of[order] = np.arange(len(order))
        starts = np.cumsum([0] + [len(a) for a in ids])
        self.shard_pos = [pos_of[starts[i]:starts[i + 1]].copy() for i in range(len(files))]
        del pos_of, ids
        seen = list(first_seen)
        self.task_names = np.array(sorted(seen), dtype=str)
        rank = np.empty(len(seen), dtype=np.int64)
        rank[np.argsort(np.array(seen, dtype=str), kind="stable")] = np.arange(len(seen))
        self.task_codes = rank[np.concatenate(local_codes)[order]]

    @property
    def tasks(self) -> np.ndarray:
        """object[N]: the task of each row (the T names shared, not one string per row); built on each call."""
        return self.task_names.astype(object)[self.task_codes]

    @property
    def n(self) -> int:
        return len(self.row_ids)

    def require(self, columns: list[str]) -> None:
        """RuntimeError naming the missing feature columns (e.g. TIVE gradients not extracted)."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise RuntimeError(f"features/ has no column(s) {', '.join(missing)}: re-run extract with the feature "
                               f"families these methods need (e.g. tive.enabled=true)")

    def row_bytes(self, columns: list[str]) -> int:
        """Bytes per row of ``columns`` as stored (vectors: width x item size; scalars: 8)."""
        return sum(self.widths[c] * self.itemsize[c] if c in self.widths else 8 for c in columns)

    def partitions(self, columns: list[str], partition_bytes: int) -> list[Partition]:
        """Consecutive shards grouped so that each partition's ``columns`` stay under ``partition_bytes``
        (a shard larger than the bound is a partition of its own)."""
        per_row = max(1, self.row_bytes(columns))
        sizes = [len(p) for p in self.shard_pos]
        out: list[Partition] = []
        current: list[int] = []
        used = 0
        for i, rows in enumerate(sizes):
            if current and used + rows * per_row > partition_bytes:
                out.append(Partition(len(out), tuple(current)))
                current, used = [], 0
            current.append(i)
            used += rows * per_row
        if current:
            out.append(Partition(len(out), tuple(current)))
        return out

    def scalars(self, columns: list[str], executor, progress=None) -> dict[str, np.ndarray]:
        """Scalar columns of every row in ``pos`` order (one task per shard group; no vector is decoded)."""
        for c in columns:
            if c in self.widths:
                raise ValueError(f"{c} is a vector column; FeatureStore.scalars reads scalar columns only")
        self.require(columns)
        parts = self.partitions(columns, 64 << 20)
        results = executor.map(_read_scalars, [(tuple(self.files[s] for s in p.shards), tuple(columns))
                                               for p in parts], progress=progress)
        out: dict[str, np.ndarray] = {}
        for c in columns:
            values = np.concatenate([r[c] for r in results])
            ids = np.concatenate([r[schema.ROW_ID] for r in results])
            pos = np.searchsorted(self.row_ids, ids)
            arr = np.empty(self.n, dtype=values.dtype)
            arr[pos] = values
            out[c] = arr
        return out


def _read_scalars(item: tuple[tuple[str, ...], tuple[str, ...]]) -> dict[str, np.ndarray]:
    files, columns = item
    parts = [read_shard(f, list(columns)) for f in files]
    return {c: np.concatenate([p[c] for p in parts]) for c in [schema.ROW_ID, *columns]}
