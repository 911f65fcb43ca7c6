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

import functools

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.io.storage import Location
from datasel_ray.methods import coincide
from datasel_ray.pipeline.executor import load_result, save_result
from datasel_ray.pipeline.feature_store import column_to_numpy, vector_column
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection, bucket_plan, read_bucket, write_buckets
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "coincide"
REGROUP_SPLIT = 4  # the assignment writes buckets of partition_bytes / REGROUP_SPLIT (estimated)


def layer_count(vector_dim: int, hidden: int) -> int:
    """Hooked layers in a COINCIDE vector of ``vector_dim`` = n_layers · 2 · hidden (o_proj outputs are hidden-wide)."""
    if vector_dim % (2 * hidden):
        raise ValueError(f"coincide_vector width {vector_dim} is not a multiple of 2 x hidden ({hidden})")
    return vector_dim // (2 * hidden)


def kmeans_seed(ctx: FitContext) -> int:
    cfg = ctx.cfg.coincide
    return cfg.seed if cfg.seed is not None else derive_seed(ctx.cfg.seed, "coincide", "kmeans")


@functools.lru_cache(maxsize=4)
def _load_npz(path: str) -> dict[str, np.ndarray]:
    return load_result(Location.parse(path))


def load_projection(stats: Location) -> tuple[np.ndarray, np.ndarray] | None:
    """The ``(A, b)`` clustering projection of a run (None without ``reduce_dim``)."""
    loc = stats / layout.PROJECTION
    if not loc.exists():
        return None
    data = _load_npz(str(loc))
    return data["A"], data["b"]


def clustering_space(x: np.ndarray, projection: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Rows ``x`` (float[N, F], as stored) in the space the centroids live in: projected (when the run used
    ``reduce_dim``) and unit-normalised, float32[N, d']. The batch assignment and the online scorer both use it."""
    from datasel_ray.clustering import apply_projection, normalize_rows

    if projection is not None:
        x = apply_projection(x, *projection)
    return normalize_rows(x)


# ------------------------------------------------------------------------------------------ partition tasks
def _gather(item: dict) -> dict[str, np.ndarray]:
    """Rows at positions ``item["want"]`` of the partition, as float32 (clustering space when ``unit``). With
    ``unit``, the clustering-space vectors of every row of the partition are also kept in ``item["keep"]`` for
    the assignment step (they are ``reduce_dim`` wide: the projection then runs once per row)."""
    projection = _load_npz(item["projection"]) if item["projection"] else None
    pos_out, x_out, keep = [], [], []
    for path, pos in zip(item["files"], item["pos"]):
        wanted = np.flatnonzero(np.isin(pos, item["want"]))
        if not len(wanted) and not item.get("keep"):
            continue
        x = read_shard(path, [schema.COINCIDE_VECTOR])[schema.COINCIDE_VECTOR]
        x = clustering_space(x, (projection["A"], projection["b"]) if projection else None) if item["unit"] \
            else np.asarray(x, dtype=np.float32)
        if item.get("keep"):
            keep.append(x)
        pos_out.append(pos[wanted])
        x_out.append(x[wanted])
    if item.get("keep"):
        Location.parse(item["keep"]).write_npy(np.concatenate(keep))
    width = item["width"]
    return {"pos": np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64),
            "x": np.concatenate(x_out) if x_out else np.zeros((0, width), np.float32)}


def _assign(item: dict) -> dict[str, np.ndarray]:
    """Nearest centroid of every row of the partition; rows written into their cluster's bucket."""
    from datasel_ray.clustering import assign_nearest

    centroids = Location.parse(item["centroids"]).read_npy()
    buckets = Location.parse(item["buckets"]).read_npy()
    kept = Location.parse(item["unit"])
    unit_all = kept.read_npy() if kept.exists() else None
    start = 0
    pos_all, lab_all, ids_all, x_all = [], [], [], []
    for path, pos in zip(item["files"], item["pos"]):
        cols = read_shard(path, [schema.COINCIDE_VECTOR])
        x = cols[schema.COINCIDE_VECTOR]
        if unit_all is not None:
            unit, start = unit_all[start:start + len(x)], start + len(x)
        else:
            unit = clustering_space(x, load_projection(Location.parse(item["stats"])))
        lab_all.append(assign_nearest(unit, centroids))
        pos_all.append(pos)
        ids_all.append(cols[schema.ROW_ID])
        x_all.append(x)
    labels = np.concatenate(lab_all)
    write_buckets(Location.parse(item["work"]), item["key"], labels, buckets, np.concatenate(ids_all),
                  np.concatenate(x_all))
    return {"pos": np.concatenate(pos_all), "cluster": labels}


def _cluster_stats(item: dict) -> dict[str, np.ndarray]:
    """Density and size of every cluster of one bucket; writes the bucket's member file (rows grouped by
    cluster, with each member's kernel sum) and, with ``reduce_dim``, the bucket's original-space cluster means
    (float32, only the columns transferability compares) for the transferability step."""
    bucket = read_bucket(Location.parse(item["work"]), item["bucket"])
    ids, labels, x = bucket[schema.ROW_ID], bucket[layout.CLUSTER], bucket[layout.VECTOR]
    clusters, starts = np.unique(labels, return_index=True)
    bounds = np.append(starts, len(labels))
    kernel_sum = np.zeros(len(labels))
    density = np.zeros(len(clusters))
    cols = item["mean_columns"]
    means = np.zeros((len(clusters), len(cols) if cols is not None else 0), dtype=np.float32)
    for i in range(len(clusters)):
        lo, hi = bounds[i], bounds[i + 1]
        kernel_sum[lo:hi] = coincide.cluster_kernel_sums(x[lo:hi], item["sigma"])
        density[i] = kernel_sum[lo:hi].sum() / ((hi - lo) * (hi - lo))
        if cols is not None:
            means[i] = (x[lo:hi].sum(0, dtype=np.float64) / (hi - lo)).astype(np.float32)[cols]
    if cols is not None:
        Location.parse(item["means"]).write_npy(means)
    Location.parse(item["members"]).write_parquet(pa.table({
        schema.ROW_ID: pa.array(ids, pa.int64()), layout.CLUSTER: pa.array(labels.astype(np.int64)),
        layout.VECTOR: vector_column(x), layout.KERNEL_SUM: pa.array(kernel_sum)}), row_group_rows=256)
    return {"cluster": clusters.astype(np.int64), "size": np.diff(bounds).astype(np.int64),
            "offset": starts.astype(np.int64), "density": density}


class _TransferRows:
    """Rows ``lo..hi`` of the transferability input (the non-empty clusters in id order), read from ``.npy``
    files: row ``p`` is row ``row[p]`` of file ``files[file[p]]``, columns ``columns`` (None: all)."""

    def __init__(self, item: dict):
        self.files, self.file, self.row, self.columns = item["files"], item["file"], item["row"], item["columns"]

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        parts = []
        for f in np.unique(self.file[lo:hi]):
            m = self.file[lo:hi] == f
            data = Location.parse(self.files[int(f)]).read_npy(mmap=True)
            parts.append((np.flatnonzero(m), data[self.row[lo:hi][m]]))
        out = np.empty((hi - lo, parts[0][1].shape[1]), dtype=parts[0][1].dtype)
        for where, rows in parts:
            out[where] = rows
        return coincide.unit_rows(out if self.columns is None else out[:, self.columns])


def _transfer_sums(item: dict) -> dict[str, np.ndarray]:
    """Transferability partial sums (:func:`~datasel_ray.methods.coincide.transferability_block`) of rows
    ``lo..lo + block`` against every row, block by block in the library's order; holds two blocks."""
    rows = _TransferRows(item)
    lo, block, total = item["lo"], item["block"], item["total"]
    a = rows(lo, min(total, lo + block))
    tot = np.zeros(len(a), dtype=np.float64)
    cnt = np.zeros(len(a), dtype=np.int64)
    for t in range(0, total, block):
        b = a if t == lo else rows(t, min(total, t + block))
        part_tot, part_cnt = coincide.transferability_block(a, b, lo - t, item["mode"], item["cos_threshold"])
        tot += part_tot
        cnt += part_cnt
    return {"tot": tot, "cnt": cnt}


def _prototypes(item: dict) -> dict[str, np.ndarray]:
    """Greedy MMD prototypes (or the whole cluster) of every cluster of one bucket with a quota."""
    table = Location.parse(item["members"]).read_parquet([schema.ROW_ID, layout.VECTOR])
    ids = column_to_numpy(table.column(schema.ROW_ID))
    x = column_to_numpy(table.column(layout.VECTOR))
    cl, rid, rank = [], [], []
    for c, off, size, q, whole in zip(item["clusters"], item["offsets"], item["sizes"], item["quotas"],
                                      item["whole"]):
        picks = coincide.cluster_prototypes(x[off:off + size], int(q), bool(whole), item["sigma"])
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


def _gather_rows(ctx: FitContext, step: str, want: np.ndarray, projection: str | None, unit: bool,
                 width: int, keep: Location | None = None) -> np.ndarray:
    items, keys = ctx.partition_items([schema.COINCIDE_VECTOR], want=want, projection=projection, unit=unit,
                                      width=width)
    for item in items:
        item["keep"] = str(keep / f"{item['key']}.npy") if keep is not None else None
    results = ctx.map(step, _gather, items, keys)
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
    keep = work / "unit" if dim != F else None  # projected rows, reused by the assignment
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
    (work / "buckets.npy").write_npy(regroup)

    items, keys = ctx.partition_items([schema.COINCIDE_VECTOR], centroids=str(stats / layout.CENTROIDS),
                                      buckets=str(work / "buckets.npy"), stats=str(stats),
                                      work=str(work / "buckets"))
    for item in items:
        item["unit"] = str(work / "unit" / f"{item['key']}.npy")
    labels = np.empty(n, dtype=np.int64)
    for r in ctx.map("coincide:assign", _assign, items, keys):
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
    items = [{"work": str(work / "buckets"), "bucket": filled[bucket_of_regroup[filled] == b].tolist(),
              "members": str(layout.members_file(stats, b)),
              "means": str(work / "means" / f"{int(b):05d}.npy"), "sigma": float(cfg.sigma),
              "mean_columns": columns if reduced else None} for b in bucket_ids]
    D = np.full(k, np.nan)
    offset = np.zeros(k, dtype=np.int64)
    for r in ctx.map("coincide:clusters", _cluster_stats, items, [f"{int(b):05d}" for b in bucket_ids],
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
        layout.CLUSTER: np.arange(k, dtype=np.int64), layout.SIZE: size, "density": D, "transferability": S,
        "probability": P, layout.BUCKET: buckets.astype(np.int64), layout.OFFSET: offset}))
    for sub in ("buckets", "unit", "means"):
        ctx.work(NAME, sub).delete()
    return {"clusters": int(k), "nonempty_clusters": int(len(nonempty)), "n_layers": n_layers, "kmeans_seed": seed,
            "kmeans_train_rows": int(len(rows)), "cluster_dim": int(dim), "buckets": int(len(bucket_ids))}


def _transferability(ctx: FitContext, nonempty: np.ndarray, buckets: np.ndarray, bucket_ids: np.ndarray,
                     reduced: bool, columns: np.ndarray, stats: Location, work: Location) -> np.ndarray:
    """S (Eq. 5) of the non-empty clusters, in row-block tasks that read the cluster vectors from disk (the
    buckets' original-space means with ``reduce_dim``, else the centroids): the driver holds K scalars."""
    cfg = ctx.cfg.coincide
    if reduced:  # bucket b's means file holds its non-empty clusters in id order
        files = [str(work / "means" / f"{int(b):05d}.npy") for b in bucket_ids]
        file = np.searchsorted(bucket_ids, buckets[nonempty])
        row = np.arange(len(nonempty)) - np.searchsorted(file, file)
        source = {"files": files, "file": file, "row": row, "columns": None}
    else:
        source = {"files": [str(stats / layout.CENTROIDS)], "file": np.zeros(len(nonempty), dtype=np.int64),
                  "row": nonempty, "columns": columns}
    block = coincide.TRANSFER_BLOCK
    starts = list(range(0, len(nonempty), block))
    items = [{**source, "lo": lo, "block": block, "total": len(nonempty), "mode": cfg.transferability,
              "cos_threshold": float(cfg.cos_threshold)} for lo in starts]
    results = ctx.map("coincide:transferability", _transfer_sums, items, [f"{lo:08d}" for lo in starts],
                      unit="row blocks")
    return coincide.transferability_from_sums(np.concatenate([r["tot"] for r in results]),
                                              np.concatenate([r["cnt"] for r in results]))


def load_clusters(stats: Location) -> dict[str, np.ndarray]:
    """``clusters.parquet`` of a run as numpy columns."""
    t = (stats / layout.CLUSTERS).read_parquet()
    return {name: column_to_numpy(t.column(name)) for name in t.column_names}


def select(ctx: FitContext, budget: int) -> MethodSelection:
    """Quotas on the driver, greedy MMD prototypes in bucket tasks; selection in Algorithm 1's order."""
    cfg = ctx.cfg.coincide
    stats = layout.method_stats(ctx.run_dir, NAME)
    if not (stats / layout.CLUSTERS).exists():
        raise RuntimeError(f"{stats / layout.CLUSTERS} is missing: run the aggregate phase first")
    cl = load_clusters(stats)
    size, S, D = cl[layout.SIZE], cl["transferability"], cl["density"]
    quota, order, whole = coincide.cluster_quotas(size, S, D, budget, cfg.temperature)
    assign = (stats / layout.ASSIGNMENTS).read_parquet()
    if not np.array_equal(column_to_numpy(assign.column(schema.ROW_ID)), ctx.store.row_ids):
        raise RuntimeError(f"{stats / layout.ASSIGNMENTS} does not cover the rows of features/: re-run aggregate "
                           f"(--force aggregate)")
    labels = column_to_numpy(assign.column(layout.CLUSTER))
    active = np.flatnonzero(quota > 0)
    items, keys = [], []
    for b in np.unique(cl[layout.BUCKET][active]):
        cs = active[cl[layout.BUCKET][active] == b]
        items.append({"members": str(layout.members_file(stats, b)), "clusters": cs, "offsets": cl[layout.OFFSET][cs],
                      "sizes": size[cs], "quotas": quota[cs], "whole": whole[cs], "sigma": float(cfg.sigma)})
        keys.append(f"{int(b):05d}")
    key = ctx.selection_key(NAME, budget, cfg.model_dump())
    results = ctx.map("coincide:prototypes", _prototypes, items, keys, unit="buckets",
                      work=ctx.run_dir / layout.SELECTIONS / NAME / layout.WORK / key)
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
    P = cl["probability"]
    (ctx.run_dir / layout.SELECTIONS / NAME / layout.QUOTAS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(len(size), dtype=np.int64), "quota": quota, "whole": whole}))
    columns = {layout.CLUSTER: labels, "transferability": S[labels], "density": D[labels], "probability": P[labels],
               "selection_order": rank, layout.SCORE: P[labels]}
    summary = {"cluster_selected_fraction": (quota / np.maximum(size, 1)).round(6).tolist()}
    return MethodSelection(selected=selected, columns=columns, summary=summary)
