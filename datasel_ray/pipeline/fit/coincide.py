"""COINCIDE over partitions: no process holds the ``coincide_vector`` column.

Where each step runs (``ctx.executor`` = Ray tasks on a cluster, this process for small pools):

1. *driver*: seeded training rows (:func:`~datasel_ray.clustering.kmeans_train_rows`) and, with ``reduce_dim``,
   the projection (random: from the seed alone; PCA: trained on gathered rows);
2. *partition tasks* gather the training rows (projected, unit-normalised); *driver*: faiss spherical k-means
   on them (``train_sample`` x ``reduce_dim`` floats at most) and a regroup plan of clusters (small buckets
   sized from the sample's estimate of the cluster sizes);
3. *partition tasks* (hold only the centroids and the projection): assign every row to its nearest centroid and
   write it into its cluster's regroup bucket (regroup by cluster); *driver*: regroup buckets packed into
   bucket tasks by the actual cluster sizes (each at most ``aggregate.partition_bytes``);
4. *bucket tasks*: per cluster, kernel sums, density D (Eq. 6) and the member file the online scorer reads;
5. *row-block tasks*: transferability S (Eq. 5) as mergeable block sums over the centroids (original-space
   cluster means, written by the bucket tasks, with ``reduce_dim``: the clustering space has no text halves);
   *driver*: P = softmax(S / D / τ) from K scalars;
6. select — *driver*: cluster quotas from sizes (Algorithm 1); *bucket tasks*: greedy MMD prototypes (Eq. 7).

The shard is the unit of every per-row kernel and the cluster (rows in row-id order) the unit of every cluster
kernel, so outputs do not depend on the partition size or the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.methods import coincide
from datasel_ray.methods.registry import SelectionMethod
from datasel_ray.pipeline.executor import load_result, save_result
from datasel_ray.pipeline.feature_store import column_to_numpy, vector_column
from datasel_ray.pipeline.fit.context import (FitContext, MethodSelection, Partition, bucket_plan, read_bucket,
                                              write_buckets)
from datasel_ray.pipeline.fit.state import MemberCache, POOL_MATCH_TOLERANCE, read_columns, selected_lookup, \
    was_selected
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "coincide"


class Coincide(SelectionMethod):
    """COINCIDE (Lee et al., 2024): spherical k-means clusters, transferability/density cluster quotas, greedy
    MMD prototypes. Files: ``stats/coincide/`` (:data:`~datasel_ray.io.layout.CLUSTERS`, centroids, projection,
    assignments, member files) and ``selections/coincide/quotas.parquet``; column names below."""

    name = NAME
    description = "COINCIDE: spherical k-means, transferability/density cluster quotas, greedy MMD."
    columns = (schema.COINCIDE_VECTOR, schema.LAST_TOKEN)
    fits = True
    scored = True
    config_section = "coincide"
    report_clusters = "COINCIDE clusters"

    # columns of stats/coincide/clusters.parquet (besides layout.CLUSTER, SIZE, BUCKET, OFFSET)
    DENSITY = "density"
    TRANSFERABILITY = "transferability"
    PROBABILITY = "probability"
    # columns of selections/coincide/quotas.parquet (besides layout.CLUSTER)
    QUOTA = "quota"
    WHOLE = "whole"
    # scores.parquet column: position in Algorithm 1's selection order (-1: not selected)
    SELECTION_ORDER = "selection_order"
    # summary.json key: per cluster, quota / size
    CLUSTER_SELECTED_FRACTION = "cluster_selected_fraction"

    def fit(self, ctx: FitContext) -> dict:
        return fit(ctx)

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        return select(ctx, budget)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> CoincideState:
        return CoincideState.load(run_dir, cfg, summary, cache)
REGROUP_SPLIT = 4  # the assignment writes buckets of partition_bytes / REGROUP_SPLIT (estimated)


def layer_count(vector_dim: int, hidden: int) -> int:
    """Hooked layers in a COINCIDE vector of ``vector_dim`` = n_layers · 2 · hidden (o_proj outputs are hidden-wide)."""
    if vector_dim % (2 * hidden):
        raise ValueError(f"coincide_vector width {vector_dim} is not a multiple of 2 x hidden ({hidden})")
    return vector_dim // (2 * hidden)


def kmeans_seed(ctx: FitContext) -> int:
    cfg = ctx.cfg.coincide
    return cfg.seed if cfg.seed is not None else derive_seed(ctx.cfg.seed, "coincide", "kmeans")


def load_projection(stats: Location) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``(A, b)`` clustering projection of a run (None without ``reduce_dim``), read from ``stats/``."""
    return read_projection(str(stats / layout.PROJECTION))


def read_projection(path: str | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``(A, b)`` projection saved at ``path`` (None: no path, or no file there). Read on every call: a
    projection rewritten in the same process (``--force aggregate``) is never served from a stale copy."""
    if path is None:
        return None
    loc = Location.parse(path)
    if not loc.exists():
        return None
    data = load_result(loc)
    return data["A"], data["b"]


def clustering_space(x: np.ndarray, projection: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Rows ``x`` (float[N, F], as stored) in the space the centroids live in: projected (when the run used
    ``reduce_dim``) and unit-normalised, float32[N, d']. The batch assignment and the online scorer both use it."""
    from datasel_ray.clustering import apply_projection, normalize_rows

    if projection is not None:
        x = apply_projection(x, *projection)
    return normalize_rows(x)


# ------------------------------------------------------------------------------------------ partition tasks
@dataclass(frozen=True, eq=False)
class GatherTask:
    """Gather rows ``want`` (int64 store positions, sorted) of ``part``'s ``coincide_vector``: as float32
    (``clustering_space`` False) or in the clustering space (projection file ``projection``, None: no
    projection). ``keep``: where to write every row of the partition in the clustering space (for the
    assignment step), None: not kept. ``width``: the output width (``reduce_dim`` or F)."""

    part: Partition
    want: np.ndarray
    clustering_space: bool
    projection: str | None
    width: int
    keep: str | None = None


@dataclass(frozen=True, eq=False)
class AssignTask:
    """Assign ``part``'s rows to their nearest centroid (``centroids``: the ``.npy`` file) and write them into
    their cluster's regroup bucket (``bucket_plan``: int64[K] file; ``regroup``: the regroup folder). The rows'
    clustering-space vectors are read from ``unit`` when the gather step kept them there, else computed with
    the projection file ``projection`` (None: no projection)."""

    part: Partition
    centroids: str
    bucket_plan: str
    regroup: str
    projection: str | None
    unit: str | None


@dataclass(frozen=True, eq=False)
class ClusterStatsTask:
    """Per cluster of the regroup buckets ``buckets`` (under ``regroup``): kernel sums with ``sigma`` and the
    density; the member file ``members``; with ``mean_columns`` (reduce_dim), the clusters' original-space
    means of those columns into ``means``."""

    regroup: str
    buckets: tuple[int, ...]
    members: str
    means: str
    sigma: float
    mean_columns: np.ndarray | None


@dataclass(frozen=True, eq=False)
class TransferSource:
    """Rows of the transferability input (the non-empty clusters in id order) in ``.npy`` files: row ``p`` is
    row ``row[p]`` of file ``files[file[p]]``, columns ``columns`` (None: all)."""

    files: tuple[str, ...]
    file: np.ndarray
    row: np.ndarray
    columns: np.ndarray | None


@dataclass(frozen=True, eq=False)
class TransferTask:
    """Transferability partial sums of rows ``lo..lo + block`` of ``source`` (``total`` rows) against every
    row (``mode``, ``cos_threshold``: :func:`~datasel_ray.methods.coincide.transferability_block`)."""

    source: TransferSource
    lo: int
    block: int
    total: int
    mode: str
    cos_threshold: float


@dataclass(frozen=True, eq=False)
class PrototypeTask:
    """Greedy MMD prototypes of the clusters ``clusters`` (int64[C]) of one member file ``members``: their
    row ``offsets`` and ``sizes`` in it, their ``quotas`` and ``whole`` flags, kernel width ``sigma``."""

    members: str
    clusters: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    quotas: np.ndarray
    whole: np.ndarray
    sigma: float


def _gather(task: GatherTask) -> dict[str, np.ndarray]:
    """Rows at positions ``task.want`` of the partition, as float32 (in the clustering space when asked). With
    ``task.keep``, the clustering-space vectors of every row of the partition are also written there for the
    assignment step (they are ``reduce_dim`` wide: the projection then runs once per row)."""
    projection = read_projection(task.projection)
    pos_out, x_out, keep = [], [], []
    for path, pos in task.part.shards():
        wanted = np.flatnonzero(np.isin(pos, task.want))
        if not len(wanted) and not task.keep:
            continue
        x = read_shard(path, [schema.COINCIDE_VECTOR])[schema.COINCIDE_VECTOR]
        x = clustering_space(x, projection) if task.clustering_space else np.asarray(x, dtype=np.float32)
        if task.keep:
            keep.append(x)
        pos_out.append(pos[wanted])
        x_out.append(x[wanted])
    if task.keep:
        Location.parse(task.keep).write_npy(np.concatenate(keep))
    return {"pos": np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64),
            "x": np.concatenate(x_out) if x_out else np.zeros((0, task.width), np.float32)}


def _assign(task: AssignTask) -> dict[str, np.ndarray]:
    """Nearest centroid of every row of the partition; rows written into their cluster's bucket."""
    from datasel_ray.clustering import assign_nearest

    centroids = Location.parse(task.centroids).read_npy()
    buckets = Location.parse(task.bucket_plan).read_npy()
    kept = Location.parse(task.unit) if task.unit is not None else None
    unit_all = kept.read_npy() if kept is not None and kept.exists() else None
    projection = read_projection(task.projection) if unit_all is None else None
    start = 0
    pos_all, lab_all, ids_all, x_all = [], [], [], []
    for path, pos in task.part.shards():
        cols = read_shard(path, [schema.COINCIDE_VECTOR])
        x = cols[schema.COINCIDE_VECTOR]
        if unit_all is not None:
            unit, start = unit_all[start:start + len(x)], start + len(x)
        else:
            unit = clustering_space(x, projection)
        lab_all.append(assign_nearest(unit, centroids))
        pos_all.append(pos)
        ids_all.append(cols[schema.ROW_ID])
        x_all.append(x)
    labels = np.concatenate(lab_all)
    write_buckets(Location.parse(task.regroup), task.part.key, labels, buckets, np.concatenate(ids_all),
                  np.concatenate(x_all))
    return {"pos": np.concatenate(pos_all), "cluster": labels}


def _cluster_stats(task: ClusterStatsTask) -> dict[str, np.ndarray]:
    """Density and size of every cluster of one bucket; writes the bucket's member file (rows grouped by
    cluster, with each member's kernel sum) and, with ``reduce_dim``, the bucket's original-space cluster means
    (float32, only the columns transferability compares) for the transferability step."""
    bucket = read_bucket(Location.parse(task.regroup), list(task.buckets))
    ids, labels, x = bucket[schema.ROW_ID], bucket[layout.CLUSTER], bucket[layout.VECTOR]
    clusters, starts = np.unique(labels, return_index=True)
    bounds = np.append(starts, len(labels))
    kernel_sum = np.zeros(len(labels))
    density = np.zeros(len(clusters))
    cols = task.mean_columns
    means = np.zeros((len(clusters), len(cols) if cols is not None else 0), dtype=np.float32)
    for i in range(len(clusters)):
        lo, hi = bounds[i], bounds[i + 1]
        kernel_sum[lo:hi] = coincide.cluster_kernel_sums(x[lo:hi], task.sigma)
        density[i] = kernel_sum[lo:hi].sum() / ((hi - lo) * (hi - lo))
        if cols is not None:
            means[i] = (x[lo:hi].sum(0, dtype=np.float64) / (hi - lo)).astype(np.float32)[cols]
    if cols is not None:
        Location.parse(task.means).write_npy(means)
    Location.parse(task.members).write_parquet(pa.table({
        schema.ROW_ID: pa.array(ids, pa.int64()), layout.CLUSTER: pa.array(labels.astype(np.int64)),
        layout.VECTOR: vector_column(x), layout.KERNEL_SUM: pa.array(kernel_sum)}), row_group_rows=256)
    return {"cluster": clusters.astype(np.int64), "size": np.diff(bounds).astype(np.int64),
            "offset": starts.astype(np.int64), "density": density}


def _transfer_rows(source: TransferSource, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo..hi`` of ``source``, unit-normalised (float64)."""
    parts = []
    for f in np.unique(source.file[lo:hi]):
        m = source.file[lo:hi] == f
        data = Location.parse(source.files[int(f)]).read_npy(mmap=True)
        parts.append((np.flatnonzero(m), data[source.row[lo:hi][m]]))
    out = np.empty((hi - lo, parts[0][1].shape[1]), dtype=parts[0][1].dtype)
    for where, rows in parts:
        out[where] = rows
    return coincide.unit_rows(out if source.columns is None else out[:, source.columns])


def _transfer_sums(task: TransferTask) -> dict[str, np.ndarray]:
    """Transferability partial sums (:func:`~datasel_ray.methods.coincide.transferability_block`) of rows
    ``lo..lo + block`` against every row, block by block in the library's order; holds two blocks."""
    lo, block, total = task.lo, task.block, task.total
    a = _transfer_rows(task.source, lo, min(total, lo + block))
    tot = np.zeros(len(a), dtype=np.float64)
    cnt = np.zeros(len(a), dtype=np.int64)
    for t in range(0, total, block):
        b = a if t == lo else _transfer_rows(task.source, t, min(total, t + block))
        part_tot, part_cnt = coincide.transferability_block(a, b, lo - t, task.mode, task.cos_threshold)
        tot += part_tot
        cnt += part_cnt
    return {"tot": tot, "cnt": cnt}


def _prototypes(task: PrototypeTask) -> dict[str, np.ndarray]:
    """Greedy MMD prototypes (or the whole cluster) of every cluster of one bucket with a quota."""
    table = Location.parse(task.members).read_parquet([schema.ROW_ID, layout.VECTOR])
    ids = column_to_numpy(table.column(schema.ROW_ID))
    x = column_to_numpy(table.column(layout.VECTOR))
    cl, rid, rank = [], [], []
    for c, off, size, q, whole in zip(task.clusters, task.offsets, task.sizes, task.quotas, task.whole):
        picks = coincide.cluster_prototypes(x[off:off + size], int(q), bool(whole), task.sigma)
        cl.append(np.full(len(picks), c, dtype=np.int64))
        rid.append(ids[off:off + size][picks])
        rank.append(np.arange(len(picks), dtype=np.int64))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))  # noqa: E731
    return {"cluster": cat(cl), "row_id": cat(rid), "rank": cat(rank)}


# ------------------------------------------------------------------------------------------------- driver
def _check_driver_rows(ctx: FitContext, rows: int, width: int, what: str) -> None:
    need = rows * width * 4
    limit = int(ctx.cfg.aggregate.driver_bytes)
    if need > limit:
        raise ValueError(f"coincide: {what} would hold {rows} x {width} float32 = {need / 2**30:.1f} GiB on the "
                         f"driver (aggregate.driver_bytes = {limit / 2**30:.1f} GiB): set coincide.train_sample "
                         f"(rows k-means trains on) and/or coincide.reduce_dim (dims it clusters in)")


def _unit_file(work: Location, partition_key: str) -> Location:
    """Where the gather step keeps a partition's clustering-space rows for the assignment step."""
    return work / layout.WORK_UNIT / f"{partition_key}.npy"


def _gather_rows(ctx: FitContext, step: str, want: np.ndarray, projection: str | None, in_clustering_space: bool,
                 width: int, keep: Location | None = None) -> np.ndarray:
    """Rows ``want`` of ``coincide_vector`` in position order (float32[len(want), width]); with ``keep`` (the
    work folder), every partition's clustering-space rows are also kept for the assignment step."""
    parts = ctx.partitions([schema.COINCIDE_VECTOR])
    tasks = [GatherTask(part=p, want=want, clustering_space=in_clustering_space, projection=projection,
                        width=width, keep=str(_unit_file(keep, p.key)) if keep is not None else None)
             for p in parts]
    results = ctx.map(step, _gather, tasks, [p.key for p in parts])
    pos = np.concatenate([r["pos"] for r in results])
    x = np.concatenate([r["x"] for r in results])
    return np.ascontiguousarray(x[np.argsort(pos, kind="stable")])


def fit(ctx: FitContext) -> dict:
    """Aggregate: clusters, D, S, P and the member files (see the module docstring). Returns a summary."""
    from datasel_ray.clustering import (assign_nearest, fit_projection, kmeans_train_rows, projection_rows,
                                        train_spherical_kmeans)

    cfg = ctx.cfg.coincide
    store = ctx.store
    store.require([schema.COINCIDE_VECTOR, schema.LAST_TOKEN])
    F = store.widths[schema.COINCIDE_VECTOR]
    n_layers = layer_count(F, store.widths[schema.LAST_TOKEN])
    n = store.n
    k = min(cfg.num_clusters if cfg.num_clusters is not None else coincide.default_num_clusters(n), n)
    seed = kmeans_seed(ctx)
    stats = ctx.stats(NAME)
    work = ctx.work(NAME)
    projection_path = None
    dim = F
    if cfg.reduce_dim is not None and cfg.reduce_dim < F:
        dim = int(cfg.reduce_dim)
        train = None
        if cfg.reduce_method == "pca":
            rows = projection_rows(n, cfg.train_sample, seed)
            rows = np.arange(n) if rows is None else rows
            _check_driver_rows(ctx, len(rows), F, "PCA training")
            train = _gather_rows(ctx, "coincide:pca-rows", rows, None, False, F)
        A, b = fit_projection(F, dim, cfg.reduce_method, seed, train)
        save_result(stats / layout.PROJECTION, {"A": A, "b": b})
        projection_path = str(stats / layout.PROJECTION)
    rows = kmeans_train_rows(n, k, cfg.train_sample, seed)
    rows = np.arange(n) if rows is None else rows
    _check_driver_rows(ctx, len(rows), dim, "k-means training")
    keep = work if dim != F else None  # projected rows, reused by the assignment
    train_unit = _gather_rows(ctx, "coincide:train-rows", rows, projection_path, True, dim, keep)
    import faiss

    centroids = train_spherical_kmeans(train_unit, k, cfg.niter, seed, faiss.get_num_gpus() > 0)
    (stats / layout.CENTROIDS).write_npy(centroids)
    estimated = np.bincount(assign_nearest(train_unit, centroids), minlength=k) * (n / len(rows))
    del train_unit
    row_bytes = store.row_bytes([schema.COINCIDE_VECTOR])
    # rows are regrouped into small buckets planned from the k-means sample's estimate of the cluster sizes,
    # which the bucket tasks then combine by the actual sizes: no bucket task holds more than partition_bytes
    # however far the estimate is off (a single cluster larger than the bound is a bucket of its own)
    regroup = bucket_plan(estimated, row_bytes, max(1, ctx.partition_bytes // REGROUP_SPLIT))
    (work / layout.WORK_BUCKET_PLAN).write_npy(regroup)

    parts = ctx.partitions([schema.COINCIDE_VECTOR])
    tasks = [AssignTask(part=p, centroids=str(stats / layout.CENTROIDS),
                        bucket_plan=str(work / layout.WORK_BUCKET_PLAN), regroup=str(work / layout.WORK_REGROUP),
                        projection=projection_path, unit=str(_unit_file(keep, p.key)) if keep is not None else None)
             for p in parts]
    labels = np.empty(n, dtype=np.int64)
    for r in ctx.map("coincide:assign", _assign, tasks, [p.key for p in parts]):
        labels[r["pos"]] = r["cluster"]
    size = np.bincount(labels, minlength=k).astype(np.int64)
    regroup_rows = np.bincount(regroup, weights=size, minlength=int(regroup.max()) + 1)
    bucket_of_regroup = bucket_plan(regroup_rows, row_bytes, ctx.partition_bytes)
    buckets = bucket_of_regroup[regroup]
    (stats / layout.ASSIGNMENTS).write_parquet(pa.table({schema.ROW_ID: pa.array(store.row_ids, pa.int64()),
                                                         layout.CLUSTER: pa.array(labels)}))
    reduced = dim != F  # S then compares original-space cluster means (the clustering space has no text halves)
    columns = coincide.transfer_columns(F, n_layers, cfg.transferability)
    bucket_ids = np.unique(buckets[size > 0])
    filled = np.flatnonzero(regroup_rows > 0)
    tasks = [ClusterStatsTask(regroup=str(work / layout.WORK_REGROUP),
                              buckets=tuple(filled[bucket_of_regroup[filled] == b].tolist()),
                              members=str(layout.members_file(stats, b)), means=str(_means_file(work, b)),
                              sigma=float(cfg.sigma), mean_columns=columns if reduced else None)
             for b in bucket_ids]
    D = np.full(k, np.nan)
    offset = np.zeros(k, dtype=np.int64)
    for r in ctx.map("coincide:clusters", _cluster_stats, tasks, [layout.bucket_key(b) for b in bucket_ids],
                     unit="buckets"):
        c = r["cluster"]
        if not np.array_equal(r["size"], size[c]):
            raise RuntimeError("coincide: a bucket's cluster sizes differ from the assignment (stale work files)")
        D[c], offset[c] = r["density"], r["offset"]
    nonempty = np.flatnonzero(size)
    S = np.zeros(k)
    S[nonempty] = _transferability(ctx, nonempty, buckets, bucket_ids, reduced, columns, stats, work)
    P = coincide.selection_probability(S, D, cfg.temperature)
    (stats / layout.CLUSTERS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(k, dtype=np.int64), layout.SIZE: size, Coincide.DENSITY: D,
        Coincide.TRANSFERABILITY: S, Coincide.PROBABILITY: P, layout.BUCKET: buckets.astype(np.int64),
        layout.OFFSET: offset}))
    for sub in (layout.WORK_REGROUP, layout.WORK_UNIT, layout.WORK_MEANS):
        ctx.work(NAME, sub).delete()
    return {"clusters": int(k), "nonempty_clusters": int(len(nonempty)), "n_layers": n_layers, "kmeans_seed": seed,
            "kmeans_train_rows": int(len(rows)), "cluster_dim": int(dim), "buckets": int(len(bucket_ids))}


def _means_file(work: Location, bucket: int) -> Location:
    """Where a bucket task writes its clusters' original-space means (``reduce_dim`` only)."""
    return work / layout.WORK_MEANS / f"{layout.bucket_key(bucket)}.npy"


def _transferability(ctx: FitContext, nonempty: np.ndarray, buckets: np.ndarray, bucket_ids: np.ndarray,
                     reduced: bool, columns: np.ndarray, stats: Location, work: Location) -> np.ndarray:
    """S (Eq. 5) of the non-empty clusters, in row-block tasks that read the cluster vectors from disk (the
    buckets' original-space means with ``reduce_dim``, else the centroids): the driver holds K scalars."""
    cfg = ctx.cfg.coincide
    if reduced:  # bucket b's means file holds its non-empty clusters in id order
        file = np.searchsorted(bucket_ids, buckets[nonempty])
        source = TransferSource(files=tuple(str(_means_file(work, b)) for b in bucket_ids), file=file,
                                row=np.arange(len(nonempty)) - np.searchsorted(file, file), columns=None)
    else:
        source = TransferSource(files=(str(stats / layout.CENTROIDS),), file=np.zeros(len(nonempty), dtype=np.int64),
                                row=nonempty, columns=columns)
    block = coincide.TRANSFER_BLOCK
    starts = list(range(0, len(nonempty), block))
    tasks = [TransferTask(source=source, lo=lo, block=block, total=len(nonempty), mode=cfg.transferability,
                          cos_threshold=float(cfg.cos_threshold)) for lo in starts]
    results = ctx.map("coincide:transferability", _transfer_sums, tasks, [f"{lo:08d}" for lo in starts],
                      unit="row blocks")
    return coincide.transferability_from_sums(np.concatenate([r["tot"] for r in results]),
                                              np.concatenate([r["cnt"] for r in results]))


def load_clusters(stats: Location) -> dict[str, np.ndarray]:
    """``clusters.parquet`` of a run as numpy columns."""
    return read_columns(stats / layout.CLUSTERS)


def select(ctx: FitContext, budget: int) -> MethodSelection:
    """Quotas on the driver, greedy MMD prototypes in bucket tasks; selection in Algorithm 1's order."""
    cfg = ctx.cfg.coincide
    stats = layout.method_stats(ctx.run_dir, NAME)
    if not (stats / layout.CLUSTERS).exists():
        raise RuntimeError(f"{stats / layout.CLUSTERS} is missing: run the aggregate phase first")
    cl = load_clusters(stats)
    size, S, D = cl[layout.SIZE], cl[Coincide.TRANSFERABILITY], cl[Coincide.DENSITY]
    quota, order, whole = coincide.cluster_quotas(size, S, D, budget, cfg.temperature)
    assign = (stats / layout.ASSIGNMENTS).read_parquet()
    if not np.array_equal(column_to_numpy(assign.column(schema.ROW_ID)), ctx.store.row_ids):
        raise RuntimeError(f"{stats / layout.ASSIGNMENTS} does not cover the rows of features/: re-run aggregate "
                           f"(--force aggregate)")
    labels = column_to_numpy(assign.column(layout.CLUSTER))
    active = np.flatnonzero(quota > 0)
    tasks, keys = [], []
    for b in np.unique(cl[layout.BUCKET][active]):
        cs = active[cl[layout.BUCKET][active] == b]
        tasks.append(PrototypeTask(members=str(layout.members_file(stats, b)), clusters=cs,
                                   offsets=cl[layout.OFFSET][cs], sizes=size[cs], quotas=quota[cs], whole=whole[cs],
                                   sigma=float(cfg.sigma)))
        keys.append(layout.bucket_key(b))
    key = ctx.selection_key(NAME, budget, cfg.model_dump())
    results = ctx.map("coincide:prototypes", _prototypes, tasks, keys, unit="buckets",
                      work=layout.selection_dir(ctx.run_dir, NAME) / layout.WORK / key)
    picks: dict[int, np.ndarray] = {}
    for r in results:
        for c in np.unique(r["cluster"]):
            m = r["cluster"] == c
            picks[int(c)] = r["row_id"][m][np.argsort(r["rank"][m])]
    ordered = [picks[int(c)] for c in order if int(c) in picks]
    selected_ids = np.concatenate(ordered) if ordered else np.zeros(0, np.int64)
    selected = np.searchsorted(ctx.store.row_ids, selected_ids)
    rank = np.full(ctx.store.n, -1, dtype=np.int64)
    rank[selected] = np.arange(len(selected))
    P = cl[Coincide.PROBABILITY]
    (layout.selection_dir(ctx.run_dir, NAME) / layout.QUOTAS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(len(size), dtype=np.int64), Coincide.QUOTA: quota, Coincide.WHOLE: whole}))
    columns = {layout.CLUSTER: labels, Coincide.TRANSFERABILITY: S[labels], Coincide.DENSITY: D[labels],
               Coincide.PROBABILITY: P[labels], Coincide.SELECTION_ORDER: rank, layout.SCORE: P[labels]}
    summary = {Coincide.CLUSTER_SELECTED_FRACTION: (quota / np.maximum(size, 1)).round(6).tolist()}
    return MethodSelection(selected=selected, columns=columns, summary=summary)


# ------------------------------------------------------------------------------------------- online state
@dataclass
class CoincideState:
    """COINCIDE's frozen state: clustering-space centroids (+ projection), per-cluster S/D/P/size/quota, member
    files.

    The sample's cluster is its nearest centroid in the run's clustering space (projection + unit norm, as the
    batch assignment). A pool row (a member within :data:`~datasel_ray.pipeline.fit.state.POOL_MATCH_TOLERANCE`
    of the sample) gets the batch decision. A new sample would be selected if its cluster was taken whole, or,
    when the cluster has a quota ``q > 0``, if greedy MMD over the members plus the sample picks it among ``q``
    prototypes (:func:`~datasel_ray.methods.coincide.would_select_new`).
    """

    stats: Location
    centroids: np.ndarray  # float32 [K, d'] unit, clustering space
    projection: tuple[np.ndarray, np.ndarray] | None
    clusters: dict[str, np.ndarray]
    quota: np.ndarray  # int64 [K]
    whole: np.ndarray  # bool [K]
    sigma: float
    pool_ids: np.ndarray
    pool_selected: np.ndarray
    cache: MemberCache = field(default_factory=MemberCache)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> CoincideState:
        stats = layout.method_stats(run_dir, NAME)
        q = read_columns(layout.selection_dir(run_dir, NAME) / layout.QUOTAS)
        ids, sel = selected_lookup(run_dir, NAME)
        return cls(stats=stats, centroids=(stats / layout.CENTROIDS).read_npy().astype(np.float32),
                   projection=load_projection(stats), clusters=load_clusters(stats), quota=q[Coincide.QUOTA],
                   whole=q[Coincide.WHOLE].astype(bool), sigma=float(cfg.coincide.sigma), pool_ids=ids,
                   pool_selected=sel, cache=cache)

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (as the batch assignment) and its cosine, for float[B, F] coincide vectors."""
        from datasel_ray.clustering import assign_nearest

        unit = clustering_space(np.asarray(vectors), self.projection)
        labels = assign_nearest(unit, self.centroids)
        return labels, np.einsum("bd,bd->b", unit, self.centroids[labels])

    def score_new(self, features: dict[str, Any], sample: Any) -> dict:
        """COINCIDE fields of one sample from its ``coincide_vector`` (float[F], fp16 as extracted)."""
        vector = np.asarray(features[schema.COINCIDE_VECTOR])
        labels, cos = self.assign(vector[None])
        c = int(labels[0])
        cl = self.clusters
        size = int(cl[layout.SIZE][c])
        members = self.cache.get(layout.members_file(self.stats, cl[layout.BUCKET][c]), cl[layout.OFFSET][c], size,
                                 [schema.ROW_ID, layout.VECTOR])
        x = np.asarray(vector, dtype=np.float64)
        match = coincide.match_member(x, members[layout.VECTOR], POOL_MATCH_TOLERANCE)
        if match is not None:
            row_id = int(members[schema.ROW_ID][match])
            would, rule = was_selected(self.pool_ids, self.pool_selected, row_id), "pool_row"
        else:
            row_id = None
            would = coincide.would_select_new(x, members[layout.VECTOR], int(self.quota[c]), bool(self.whole[c]),
                                              self.sigma)
            rule = "whole_cluster" if self.whole[c] else "no_quota" if self.quota[c] == 0 else "greedy_mmd"
        return {"cluster": c, "transferability": float(cl[Coincide.TRANSFERABILITY][c]),
                "density": float(cl[Coincide.DENSITY][c]), "probability": float(cl[Coincide.PROBABILITY][c]),
                "distance": float(np.sqrt(max(0.0, 2.0 - 2.0 * float(cos[0])))), "cluster_size": size,
                "cluster_quota": int(self.quota[c]),
                "cluster_selected_fraction": float(self.quota[c] / max(size, 1)), "pool_row_id": row_id,
                "rule": rule, "would_select": bool(would)}
