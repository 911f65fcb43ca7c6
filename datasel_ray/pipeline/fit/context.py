"""What a method's partitioned fit and select need: config, feature store, executor, output folders.

:class:`FitContext` is built once per phase by :mod:`datasel_ray.pipeline.aggregate` /
:mod:`datasel_ray.pipeline.select`. :class:`MethodSelection` is what every method's ``select`` returns: per-row
scalar columns (``pos`` order of the store), the selected positions and the summary fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.pipeline.executor import Executor, resumable_map
from datasel_ray.pipeline.memory import release_free_memory
from datasel_ray.pipeline.progress import Progress
from datasel_ray.pipeline.store import FeatureStore

__all__ = ["FitContext", "MethodSelection", "Partition", "TASK_SCORE_THRESHOLD", "bucket_plan", "read_bucket",
           "write_buckets"]

#: key of every selection's ``summary.json`` (written by :mod:`datasel_ray.pipeline.select`): per task, the
#: lowest main score among its selected rows (None: no selected row with a finite score)
TASK_SCORE_THRESHOLD = "task_score_threshold"


@dataclass
class MethodSelection:
    """A method's selection over the store's rows (arrays in ``pos`` order, length N).

    selected: int64 positions in the method's selection order (repeats allowed only for TIVE oversampling).
    columns: per-row scalar columns for ``scores.parquet`` (must include ``score``).
    summary: JSON-ready fields for ``summary.json`` (thresholds, budgets, variant switches).
    """

    selected: np.ndarray
    columns: dict[str, np.ndarray]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Partition:
    """One partition of the feature store, the input of a partition task: its shard files (paths) and, per
    shard, the positions of the shard's rows in the store (int64 arrays, the ``pos`` order of the store)."""

    key: str
    files: tuple[str, ...]
    pos: tuple[np.ndarray, ...]

    def shards(self):
        """(shard path, its rows' positions) pairs, in store order."""
        return zip(self.files, self.pos)


@dataclass
class FitContext:
    cfg: RunConfig
    run_dir: RunDir
    store: FeatureStore
    executor: Executor
    quiet: bool = False

    def stats(self, method: str) -> Location:
        loc = layout.method_stats(self.run_dir, method)
        loc.mkdir()
        return loc

    def work(self, *names: str) -> Location:
        return self.run_dir / layout.STATS / layout.WORK / "/".join(names)

    @property
    def partition_bytes(self) -> int:
        return int(self.cfg.aggregate.partition_bytes)

    def progress(self, step: str, total: int, unit: str = "partitions") -> Progress:
        return Progress(step, total, self.run_dir / "progress.json", quiet=self.quiet, unit=unit)

    def map(self, step: str, fn, items: list, keys: list[str], unit: str = "partitions",
            work: Location | None = None, stored: bool = False) -> list:
        """:func:`~datasel_ray.pipeline.executor.resumable_map` of one step, with a progress line."""
        progress = self.progress(step, len(items), unit)
        out = resumable_map(self.executor, fn, items, keys, work or self.work(step), progress=progress,
                            stored=stored)
        progress.finish()
        release_free_memory()
        return out

    def scalars(self, columns: list[str]) -> dict[str, np.ndarray]:
        return self.store.scalars(columns, self.executor)

    def partitions(self, columns: list[str]) -> list[Partition]:
        """The store's partitions for reading ``columns`` (each at most ``aggregate.partition_bytes``)."""
        return [Partition(key=p.key, files=tuple(self.store.files[s] for s in p.shards),
                          pos=tuple(self.store.shard_pos[s] for s in p.shards))
                for p in self.store.partitions(columns, self.partition_bytes)]

    def selection_key(self, *parts: Any) -> str:
        """A short hash naming the work folder of a select step (budget + method config)."""
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def bucket_plan(estimated_rows: np.ndarray, row_bytes: int, partition_bytes: int) -> np.ndarray:
    """Groups (clusters or tasks, int ids 0..G-1) packed in id order into buckets of at most ``partition_bytes``
    (estimated) each; a group larger than the bound is a bucket of its own. Returns int64[G] bucket ids."""
    est = np.asarray(estimated_rows, dtype=np.float64) * max(1, row_bytes)
    out = np.zeros(len(est), dtype=np.int64)
    bucket, used = 0, 0.0
    for g, b in enumerate(est):
        if used > 0 and used + b > partition_bytes:
            bucket, used = bucket + 1, 0.0
        out[g] = bucket
        used += b
    return out


def write_buckets(work: Location, partition_key: str, group_of_row: np.ndarray, bucket_of_group: np.ndarray,
                  row_ids: np.ndarray, vectors: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> None:
    """Write one partition's rows into per-bucket part files ``work/<bucket>/<partition>.parquet`` (row_id, group
    as ``cluster``, the vector and ``extra`` scalar columns): the regroup-by-key step of the partitioned
    pipeline (NeMo Curator's semantic dedup writes per-cluster partitions the same way)."""
    from datasel_ray.pipeline.feature_store import vector_column

    bucket = bucket_of_group[group_of_row]
    for b in np.unique(bucket):
        rows = np.flatnonzero(bucket == b)
        cols = {schema.ROW_ID: pa.array(row_ids[rows], pa.int64()),
                layout.CLUSTER: pa.array(group_of_row[rows].astype(np.int64)),
                layout.VECTOR: vector_column(vectors[rows])}
        for name, values in (extra or {}).items():
            cols[name] = pa.array(values[rows])
        (work / layout.bucket_key(b) / f"{partition_key}.parquet").write_parquet(pa.table(cols))


def bucket_files(work: Location, bucket: int | list[int]) -> list[Location]:
    """The part files of one regroup bucket (or of several) under ``work``; RuntimeError when a bucket has none
    (the regroup step did not finish)."""
    files = []
    for b in [bucket] if np.isscalar(bucket) else list(bucket):
        found = (work / layout.bucket_key(b)).list(".parquet")
        if not found:
            raise RuntimeError(f"{work}/{layout.bucket_key(b)} has no part files: the regroup step did not finish")
        files.extend(found)
    return files


def read_bucket(work: Location, bucket: int | list[int]) -> dict[str, np.ndarray]:
    """Every part file of one bucket (or of several, read as one) as numpy columns, rows sorted by (cluster,
    row_id). The (row_id, cluster) keys are read first; then each part file's other columns are scattered
    straight into their sorted places, one part file at a time: the task holds the bucket once plus one part
    file, never a second sorted copy."""
    from datasel_ray.io.vectors import VectorType, vector_numpy
    from datasel_ray.pipeline.feature_store import column_to_numpy

    files = bucket_files(work, bucket)
    keys = [f.read_parquet([schema.ROW_ID, layout.CLUSTER]) for f in files]
    ids = np.concatenate([column_to_numpy(k.column(schema.ROW_ID)) for k in keys]).astype(np.int64)
    cluster = np.concatenate([column_to_numpy(k.column(layout.CLUSTER)) for k in keys]).astype(np.int64)
    order = np.lexsort((ids, cluster))
    dest = np.empty(len(order), dtype=np.int64)
    dest[order] = np.arange(len(order))
    out: dict[str, np.ndarray] = {schema.ROW_ID: ids[order], layout.CLUSTER: cluster[order]}
    start = 0
    for f, k in zip(files, keys):
        table = f.read_parquet()
        rows = dest[start:start + k.num_rows]
        for name in table.column_names:
            if name in (schema.ROW_ID, layout.CLUSTER):
                continue
            column = table.column(name)
            values = vector_numpy(column) if isinstance(column.type, VectorType) else column_to_numpy(column)
            if name not in out:
                out[name] = np.empty((len(order), *values.shape[1:]), dtype=values.dtype)
            out[name][rows] = values
        start += k.num_rows
    return out
