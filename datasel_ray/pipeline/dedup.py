"""Dedup phase: ``features/`` (+ ``samples/``) → ``dedup/`` as a partitioned pipeline (no process holds a feature
column). Runs after extract and before aggregate, so that with ``select.dedup`` the methods are fitted and select
on the kept rows (``dedup/kept/``) with the same code.

Steps (tasks on ``aggregate.executor``; each step's results kept under ``dedup/_work/`` until the phase ends, so a
killed run resumes per task):

1. *exact* — tasks over ``samples/`` shards: a digest of each row's image bytes and normalised turns
   (:mod:`datasel_ray.dedup.exact`); *driver*: groups of equal digests (N digests of 16 bytes), lowest row id kept;
2. *semantic* (:mod:`datasel_ray.dedup.semantic`, SemDeDup / NeMo Curator) — *partition tasks* gather the seeded
   k-means training rows (unit, ``dedup.feature``); *driver*: faiss spherical k-means; *partition tasks*: each
   row (exact-dropped rows excepted) assigned to its nearest centroid with its cosine to it, written into its
   cluster's regroup bucket; *bucket tasks* (at most ``aggregate.partition_bytes`` of vectors, a larger cluster
   alone): the bucket spilled to local disk one file per cluster, then per cluster the members ranked and
   compared in blocks read from that file (pairwise cosine in at most ``dedup.workspace_bytes``, so no task
   holds a cluster, however large), drop at ``>= 1 - eps``; each writes its member file (the online lookup);
3. *driver*: ``dropped``, ``pairs``, ``groups``, ``tasks`` tables and ``meta.json``; with ``select.dedup``,
   *shard tasks* copy the kept rows of every feature shard into ``dedup/kept/``.

The shard is the unit of every per-row kernel and the cluster (rows in row-id order before ranking) the unit of
the pairwise kernel, so outputs do not depend on the partition size or the executor, and equal
:func:`datasel_ray.dedup.semantic.semantic_dedup` run in one process on the same centroids.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.dedup import exact as exact_pass
from datasel_ray.dedup import semantic
from datasel_ray.io import layout
from datasel_ray.io.images import row_image_bytes
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.pipeline.feature_store import column_to_numpy, vector_column
from datasel_ray.pipeline.fit.context import FitContext, Partition, bucket_files, bucket_plan, write_buckets
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

MIN_ROWS_PER_CLUSTER = 40  # faiss k-means warns below 39 training points per centroid
SAMPLE_FILES_PER_TASK = 8
REGROUP_SPLIT = 4  # the assignment writes buckets of partition_bytes / REGROUP_SPLIT (estimated)
# a spilled cluster whose unit float32 rows fit in this is read once and compared in memory; a larger one block by
# block from its file (the same blocks either way: per-block file reads cost a mapping each)
HOLD_CLUSTER_BYTES = 256 << 20


def dedup_dir(run_dir) -> Location:
    return run_dir / layout.DEDUP


def kept_features(run_dir) -> Location:
    """``dedup/kept/``: the feature shards of the rows the dedup phase kept (written with ``select.dedup``)."""
    return dedup_dir(run_dir) / layout.KEPT


def num_clusters(cfg: RunConfig, n: int) -> int:
    """Clusters of the semantic pass over ``n`` rows: ``min(dedup.num_clusters, max(1, n // 40))``."""
    return int(max(1, min(cfg.dedup.num_clusters, n // MIN_ROWS_PER_CLUSTER)))


def kmeans_seed(cfg: RunConfig) -> int:
    return cfg.dedup.seed if cfg.dedup.seed is not None else derive_seed(cfg.seed, "dedup", "kmeans")


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class FeatureSpec:
    """Which vectors a task reads: ``feature`` (``dedup.feature``) and the ``last_token`` width ``hidden`` that
    splits a COINCIDE vector into its halves."""

    feature: str
    hidden: int


@dataclass(frozen=True, eq=False)
class DigestTask:
    """Digests of every row of some ``samples/`` shard ``files``, reading ``io_threads`` rows' images at a time
    (``pool.io_threads``: each image is a round trip on object storage)."""

    files: tuple[str, ...]
    io_threads: int = 1


@dataclass(frozen=True, eq=False)
class GatherTask:
    """Unit vectors of rows ``want`` (int64 store positions) of ``part`` (k-means training rows), ``width`` wide."""

    part: Partition
    spec: FeatureSpec
    want: np.ndarray
    width: int


@dataclass(frozen=True, eq=False)
class AssignTask:
    """Nearest centroid of every row of ``part`` outside ``excluded``, written into its ``regroup`` bucket under
    ``work`` (files: ``.npy`` paths written by the driver)."""

    part: Partition
    spec: FeatureSpec
    centroids: str
    regroup: str
    excluded: str
    work: str


@dataclass(frozen=True, eq=False)
class ClustersTask:
    """SemDeDup on the clusters of regroup buckets ``bucket`` under ``work``; members written to ``members``."""

    work: str
    bucket: tuple[int, ...]
    members: str
    ranking: str
    eps: float
    workspace_bytes: int


@dataclass(frozen=True, eq=False)
class KeptTask:
    """The rows of feature shard ``src`` not in ``dropped`` (a sorted row-id ``.npy``), written to ``dst``."""

    src: str
    dst: str
    dropped: str


def _digests(task: DigestTask) -> dict[str, np.ndarray]:
    """Digest (S16) of every row of some ``samples/`` shards: its images' bytes + normalised turns. Ingest
    stores it (``content_digest``) when it read every image of the row; only the other rows (images not decoded
    at ingest: ``pool.check_images: false``; samples written before the column existed) have their images read
    here."""
    def digest(row: dict) -> bytes:
        if row.get(schema.CONTENT_DIGEST) is not None:
            return row[schema.CONTENT_DIGEST]
        conv = row[schema.CONVERSATIONS]
        return exact_pass.row_digest(row_image_bytes(row), exact_pass.normalise_text(json.loads(conv) if conv else []))

    ids, out = [], []
    with ThreadPoolExecutor(task.io_threads, thread_name_prefix="dedup-io") as threads:
        for path in task.files:
            loc = Location.parse(path)
            with loc.open_input() as handle:
                stored = schema.CONTENT_DIGEST in pq.ParquetFile(handle).schema_arrow.names
            columns = [schema.ROW_ID, schema.CONVERSATIONS, *([schema.CONTENT_DIGEST] if stored else [])]
            t = loc.read_parquet(columns)
            if not stored or t.column(schema.CONTENT_DIGEST).null_count:  # some rows need their images
                t = loc.read_parquet([*columns, schema.IMAGES])
            ids.append(column_to_numpy(t.column(schema.ROW_ID)).astype(np.int64))
            out.extend(threads.map(digest, t.to_pylist()))
    return {schema.ROW_ID: np.concatenate(ids) if ids else np.zeros(0, np.int64),
            "digest": np.array(out, dtype=f"S{exact_pass.DIGEST_BYTES}")}


def _read_feature(path: str, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, ``spec.feature`` vectors as stored) of one shard."""
    column = semantic.source_column(spec.feature)
    cols = read_shard(path, [column])
    return cols[schema.ROW_ID].astype(np.int64), semantic.feature_vectors(spec.feature, cols[column], spec.hidden)


def _gather(task: GatherTask) -> dict[str, np.ndarray]:
    """Unit rows at positions ``task.want`` of the partition (k-means training rows)."""
    from datasel_ray.clustering import normalize_rows

    pos_out, x_out = [], []
    for path, pos in zip(task.part.files, task.part.pos):
        wanted = np.flatnonzero(np.isin(pos, task.want))
        if len(wanted):
            unit = normalize_rows(_read_feature(path, task.spec)[1])
            pos_out.append(pos[wanted])
            x_out.append(unit[wanted])
    return {"pos": np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64),
            "x": np.concatenate(x_out) if x_out else np.zeros((0, task.width), np.float32)}


def _assign(task: AssignTask) -> dict[str, np.ndarray]:
    """Nearest centroid and cosine to it of every row of the partition not dropped by the exact pass; the rows
    (stored vectors) written into their cluster's regroup bucket."""
    from datasel_ray.clustering import assign_nearest, normalize_rows

    centroids = Location.parse(task.centroids).read_npy()
    regroup = Location.parse(task.regroup).read_npy()
    excluded = Location.parse(task.excluded).read_npy()
    pos_all, lab_all, ids_all, raw_all, cos_all = [], [], [], [], []
    for path, pos in zip(task.part.files, task.part.pos):
        ids, vectors = _read_feature(path, task.spec)
        keep = ~np.isin(pos, excluded)
        raw = vectors[keep]
        unit = normalize_rows(raw)
        labels = assign_nearest(unit, centroids)
        pos_all.append(pos[keep])
        lab_all.append(labels)
        ids_all.append(ids[keep])
        raw_all.append(raw)
        cos_all.append(np.einsum("ij,ij->i", unit, centroids[labels]).astype(np.float32))
    labels = np.concatenate(lab_all)
    write_buckets(Location.parse(task.work), task.part.key, labels, regroup, np.concatenate(ids_all),
                  np.concatenate(raw_all), {layout.COS_CENTROID: np.concatenate(cos_all)})
    return {"pos": np.concatenate(pos_all), "cluster": labels}


@dataclass
class _SpilledCluster:
    """One cluster of a bucket on local disk: ``path`` holds its stored vectors (``dtype``[m, width], rows in
    row-id order, raw binary); ``row_id`` (sorted) and ``cos`` in memory."""

    path: str
    row_id: np.ndarray
    cos: np.ndarray
    dtype: np.dtype
    width: int

    def rows(self, index: np.ndarray | slice) -> np.ndarray:
        """Stored vectors of the members at ``index`` (positions in row-id order), read through a mapping that is
        closed again at once: only the rows asked for stay in memory."""
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(len(self.row_id), self.width))
        try:
            return np.array(mapped[index])
        finally:
            del mapped


def _spill_bucket(work: Location, buckets: list[int], folder: str) -> list[tuple[int, _SpilledCluster]]:
    """The rows of regroup ``buckets`` under ``work``, one file per cluster under ``folder`` (rows in row-id
    order), in cluster order. The part files' keys are read first; then each part file's vectors are written
    into their clusters' files, one part file at a time: the task never holds a cluster, only one part file
    (one partition's rows of the bucket)."""
    import os

    from datasel_ray.io.vectors import vector_numpy

    files = bucket_files(work, buckets)
    keys = [f.read_parquet([schema.ROW_ID, layout.CLUSTER, layout.COS_CENTROID]) for f in files]
    ids = np.concatenate([column_to_numpy(k.column(schema.ROW_ID)) for k in keys]).astype(np.int64)
    labels = np.concatenate([column_to_numpy(k.column(layout.CLUSTER)) for k in keys]).astype(np.int64)
    cos = np.concatenate([column_to_numpy(k.column(layout.COS_CENTROID)) for k in keys])
    order = np.lexsort((ids, labels))
    clusters, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    slot = np.empty(len(order), dtype=np.int64)  # each row's position within its cluster, in row-id order
    slot[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    spilled: dict[int, _SpilledCluster] = {}
    first = 0
    for f, k in zip(files, keys):
        rows = np.arange(first, first + k.num_rows)
        first += k.num_rows
        vectors = vector_numpy(f.read_parquet([layout.VECTOR]).column(layout.VECTOR))
        for c in np.unique(labels[rows]):
            here = rows[labels[rows] == c]
            at = int(np.searchsorted(clusters, c))
            entry = spilled.get(int(c))
            if entry is None:
                members = order[starts[at]:starts[at] + sizes[at]]
                entry = spilled[int(c)] = _SpilledCluster(os.path.join(folder, f"cluster-{int(c)}.bin"), ids[members],
                                                          cos[members], vectors.dtype, vectors.shape[1])
                np.memmap(entry.path, dtype=entry.dtype, mode="w+", shape=(len(members), entry.width)).flush()
            mapped = np.memmap(entry.path, dtype=entry.dtype, mode="r+", shape=(len(entry.row_id), entry.width))
            mapped[slot[here]] = vectors[here - rows[0]]
            mapped.flush()
            del mapped
        del vectors
    return [(int(c), spilled[int(c)]) for c in clusters]


def _clusters(task: ClustersTask) -> dict[str, np.ndarray]:
    """SemDeDup on every cluster of one bucket; writes the bucket's member file (rows grouped by cluster, in
    row-id order). The bucket is spilled to local disk cluster by cluster (:func:`_spill_bucket`) and each
    cluster compared in blocks read from there, so the task's memory does not grow with the largest cluster."""
    import shutil
    import tempfile

    from datasel_ray.clustering import normalize_rows

    folder = tempfile.mkdtemp(prefix="datasel-dedup-")
    try:
        spilled = _spill_bucket(Location.parse(task.work), list(task.bucket), folder)
        parts: dict[str, list[np.ndarray]] = {}
        for c, cluster in spilled:
            if len(cluster.row_id) * cluster.width * 4 <= HOLD_CLUSTER_BYTES:  # read once, blocks from memory
                read = (lambda idx, unit=normalize_rows(cluster.rows(slice(None))): unit[idx])
            else:  # every block read from the cluster's file
                read = (lambda idx, cl=cluster: normalize_rows(cl.rows(idx)))
            res = semantic.cluster_dedup(None, cluster.row_id, cluster.cos, task.ranking, task.eps,
                                         task.workspace_bytes, read_rows=read, width=cluster.width)
            for name, value in vars(res).items():
                parts.setdefault(name, []).append(value)
            parts.setdefault("member_cluster", []).append(np.full(len(cluster.row_id), c, dtype=np.int64))
            parts.setdefault("pair_cluster", []).append(np.full(len(res.pair_a), c, dtype=np.int64))
        chunk = max(1, semantic.block_rows(spilled[0][1].width, task.workspace_bytes)) if spilled else 1

        def write_members(handle) -> None:
            writer = None
            for c, cluster in spilled:
                for lo in range(0, len(cluster.row_id), chunk):
                    hi = min(len(cluster.row_id), lo + chunk)
                    table = pa.table({schema.ROW_ID: pa.array(cluster.row_id[lo:hi], pa.int64()),
                                      layout.CLUSTER: pa.array(np.full(hi - lo, c, dtype=np.int64)),
                                      layout.VECTOR: vector_column(cluster.rows(slice(lo, hi)))})
                    if writer is None:
                        writer = pq.ParquetWriter(handle, table.schema, use_dictionary=False, compression={
                            schema.ROW_ID: "zstd", layout.CLUSTER: "zstd", layout.VECTOR: "none"})
                    writer.write_table(table)
            if writer is not None:
                writer.close()

        Location.parse(task.members).write_with(write_members)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sizes = np.array([len(cluster.row_id) for _, cluster in spilled], dtype=np.int64)
    out = {name: np.concatenate(values) for name, values in parts.items()}
    out.update({"cluster": np.array([c for c, _ in spilled], dtype=np.int64),
                "offset": (np.cumsum(sizes) - sizes).astype(np.int64), "size": sizes})
    return out


def _copy_kept(task: KeptTask) -> dict[str, np.ndarray]:
    """The rows of one feature shard that dedup kept, written to ``dedup/kept/<shard name>`` (none: no file)."""
    table = Location.parse(task.src).read_parquet()
    dropped = Location.parse(task.dropped).read_npy()
    keep = ~np.isin(column_to_numpy(table.column(schema.ROW_ID)).astype(np.int64), dropped)
    if keep.any():
        Location.parse(task.dst).write_parquet(table.filter(pa.array(keep)))
    return {"rows": np.array([int(keep.sum())], dtype=np.int64)}


# ------------------------------------------------------------------------------------------ driver
def _exact(ctx: FitContext, work: Location) -> tuple[np.ndarray, np.ndarray]:
    """(dropped bool[N], representative int64[N]) of the exact pass, in ``pos`` order."""
    store = ctx.store
    files = [str(f) for f in (ctx.run_dir / "samples").list(".parquet")]
    if not files:
        raise RuntimeError(f"No parquet files in {ctx.run_dir / 'samples'}: run the ingest phase first")
    chunks = [files[i:i + SAMPLE_FILES_PER_TASK] for i in range(0, len(files), SAMPLE_FILES_PER_TASK)]
    results = ctx.map("dedup:exact", _digests, [DigestTask(tuple(c), ctx.cfg.pool.io_threads) for c in chunks],
                      [f"{i:05d}" for i in range(len(chunks))], unit="tasks", work=work / "exact")
    ids = np.concatenate([r[schema.ROW_ID] for r in results])
    digests = np.concatenate([r["digest"] for r in results])
    found = np.isin(ids, store.row_ids)  # rows quarantined at extract have no features: not in the pool
    ids, digests = ids[found], digests[found]
    if len(ids) != store.n:
        raise RuntimeError(f"dedup: samples/ holds {len(ids)} of the {store.n} feature rows (stale samples/?)")
    by_digest = np.lexsort((ids, digests))
    (dedup_dir(ctx.run_dir) / layout.DIGESTS).write_parquet(pa.table({
        schema.ROW_ID: pa.array(ids[by_digest], pa.int64()),
        "digest": _digest_column(digests[by_digest])}))
    pos = np.searchsorted(store.row_ids, ids)
    ordered = np.empty(store.n, dtype=digests.dtype)
    ordered[pos] = digests
    return exact_pass.exact_groups(ordered, store.row_ids)


def _semantic(ctx: FitContext, out: Location, work: Location, excluded: np.ndarray) -> dict:
    """The partitioned semantic pass over the rows not in ``excluded`` (sorted positions); returns the
    concatenated bucket results and a summary."""
    from datasel_ray.clustering import assign_nearest, kmeans_train_rows, train_spherical_kmeans

    cfg, store = ctx.cfg.dedup, ctx.store
    column = semantic.source_column(cfg.feature)
    store.require([column, schema.LAST_TOKEN] if cfg.feature == "coincide_visual" else [column])
    hidden = store.widths.get(schema.LAST_TOKEN, 0)
    d = store.widths[column] // (2 if cfg.feature == "coincide_visual" else 1)
    spec = FeatureSpec(cfg.feature, hidden)
    n_left = store.n - len(excluded)
    k = num_clusters(ctx.cfg, n_left)
    seed = kmeans_seed(ctx.cfg)
    candidates = np.setdiff1d(np.arange(store.n), excluded)
    rows = kmeans_train_rows(len(candidates), k, cfg.train_sample, seed)
    train_pos = candidates if rows is None else candidates[rows]
    if len(train_pos) * d * 4 > ctx.cfg.aggregate.driver_bytes:
        raise ValueError(f"dedup: k-means training would hold {len(train_pos)} x {d} floats on the driver, over "
                         f"aggregate.driver_bytes={ctx.cfg.aggregate.driver_bytes}: lower dedup.train_sample")
    parts = ctx.partitions([column])
    got = ctx.map("dedup:train-rows", _gather, [GatherTask(p, spec, train_pos, d) for p in parts],
                  [p.key for p in parts], work=work / "train-rows")
    pos = np.concatenate([r["pos"] for r in got])
    train = np.ascontiguousarray(np.concatenate([r["x"] for r in got])[np.argsort(pos, kind="stable")])
    del got
    import faiss

    centroids = train_spherical_kmeans(train, k, cfg.niter, seed, faiss.get_num_gpus() > 0)
    (out / layout.CENTROIDS).write_npy(centroids)
    estimated = np.bincount(assign_nearest(train, centroids), minlength=k) * (n_left / max(1, len(train)))
    del train
    row_bytes = store.row_bytes([column]) * d // store.widths[column] + 8
    regroup = bucket_plan(estimated, row_bytes, max(1, ctx.partition_bytes // REGROUP_SPLIT))
    (work / "regroup.npy").write_npy(regroup)
    (work / "excluded.npy").write_npy(np.asarray(excluded, dtype=np.int64))
    items = [AssignTask(p, spec, str(out / layout.CENTROIDS), str(work / "regroup.npy"),
                        str(work / "excluded.npy"), str(work / "buckets")) for p in parts]
    labels = np.full(store.n, -1, dtype=np.int64)
    for r in ctx.map("dedup:assign", _assign, items, [p.key for p in parts], work=work / "assign"):
        labels[r["pos"]] = r["cluster"]
    size = np.bincount(labels[labels >= 0], minlength=k).astype(np.int64)
    regroup_rows = np.bincount(regroup, weights=size, minlength=int(regroup.max()) + 1)
    bucket_of_regroup = bucket_plan(regroup_rows, row_bytes, ctx.partition_bytes)
    buckets = bucket_of_regroup[regroup]
    filled = np.flatnonzero(regroup_rows > 0)
    bucket_ids = np.unique(bucket_of_regroup[filled])
    items = [ClustersTask(str(work / "buckets"), tuple(int(r) for r in filled[bucket_of_regroup[filled] == b]),
                          str(layout.members_file(out, b)), cfg.ranking, float(cfg.eps), int(cfg.workspace_bytes))
             for b in bucket_ids]
    results = ctx.map("dedup:clusters", _clusters, items, [f"{int(b):05d}" for b in bucket_ids], unit="buckets",
                      work=work / "clusters")
    offset = np.zeros(k, dtype=np.int64)
    for r in results:
        if not np.array_equal(r["size"], size[r["cluster"]]):
            raise RuntimeError("dedup: a bucket's cluster sizes differ from the assignment (stale work files)")
        offset[r["cluster"]] = r["offset"]
    (out / layout.CLUSTERS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(k, dtype=np.int64), layout.SIZE: size,
        layout.BUCKET: np.where(size > 0, buckets, -1).astype(np.int64), layout.OFFSET: offset}))
    names = ["row_id", "dropped", "similarity", "duplicate_of", "representative", "member_cluster", "pair_a",
             "pair_b", "pair_sim", "pair_cluster"]
    merged = {name: np.concatenate([r[name] for r in results]) if results else np.zeros(0) for name in names}
    summary = {"feature": cfg.feature, "clusters": k, "nonempty_clusters": int((size > 0).sum()),
               "kmeans_seed": seed, "kmeans_train_rows": int(len(train_pos)), "buckets": int(len(bucket_ids)),
               "largest_cluster": int(size.max()) if k else 0}
    return {"result": merged, "summary": summary}


def _digest_column(digests: np.ndarray) -> pa.Array:
    """S16 digests as a fixed_size_binary(16) column, byte for byte (``tolist`` would strip trailing zero bytes)."""
    data = np.ascontiguousarray(digests, dtype=f"S{exact_pass.DIGEST_BYTES}")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(exact_pass.DIGEST_BYTES), len(data),
                                                [None, pa.py_buffer(data.tobytes())])


def run_dedup(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    from datasel_ray.pipeline.aggregate import make_context

    started = time.monotonic()
    ctx = make_context(cfg, run_dir, quiet, features=run_dir / "features")
    store = ctx.store
    out = dedup_dir(run_dir)
    out.mkdir()
    work = out / layout.WORK
    n = store.n
    ids = store.row_ids
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    if cfg.dedup.exact:
        exact_dropped, exact_rep = _exact(ctx, work)
    else:
        exact_dropped, exact_rep = np.zeros(n, dtype=bool), ids.copy()
    timings["exact"] = round(time.monotonic() - t0, 3)

    dropped_pos: list[np.ndarray] = [np.flatnonzero(exact_dropped)]
    rep = exact_rep.copy()
    dup_of = np.where(exact_dropped, exact_rep, -1)
    sim = np.where(exact_dropped, np.float32(1.0), np.float32(np.nan)).astype(np.float32)
    which = np.where(exact_dropped, layout.PASS_EXACT, "").astype(object)
    cluster = np.full(n, -1, dtype=np.int64)
    pair_a = [exact_rep[exact_dropped]]
    pair_b = [ids[exact_dropped]]
    pair_sim = [np.ones(int(exact_dropped.sum()), dtype=np.float32)]
    pair_pass = [np.full(int(exact_dropped.sum()), layout.PASS_EXACT, dtype=object)]
    pair_cluster = [np.full(int(exact_dropped.sum()), -1, dtype=np.int64)]
    semantic_summary: dict = {}
    t0 = time.monotonic()
    if cfg.dedup.semantic and n - int(exact_dropped.sum()) > 0:
        sem = _semantic(ctx, out, work, np.flatnonzero(exact_dropped))
        r, semantic_summary = sem["result"], sem["summary"]
        pos = np.searchsorted(ids, r["row_id"].astype(np.int64))
        cluster[pos] = r["member_cluster"]
        d = r["dropped"].astype(bool)
        dropped_pos.append(pos[d])
        rep[pos] = r["representative"]
        dup_of[pos[d]] = r["duplicate_of"][d]
        sim[pos[d]] = r["similarity"][d]
        which[pos[d]] = layout.PASS_SEMANTIC
        pair_a.append(r["pair_a"].astype(np.int64))
        pair_b.append(r["pair_b"].astype(np.int64))
        pair_sim.append(r["pair_sim"].astype(np.float32))
        pair_pass.append(np.full(len(r["pair_a"]), layout.PASS_SEMANTIC, dtype=object))
        pair_cluster.append(r["pair_cluster"].astype(np.int64))
        # an exact duplicate's representative may itself be a semantic duplicate: follow it to the kept row
        exact_rows = np.flatnonzero(exact_dropped)
        if len(exact_rows):
            rep_pos = np.searchsorted(ids, rep[exact_rows])
            rep[exact_rows] = rep[rep_pos]
    timings["semantic"] = round(time.monotonic() - t0, 3)

    dropped = np.zeros(n, dtype=bool)
    dropped[np.concatenate(dropped_pos)] = True
    names, codes = store.task_names, store.task_codes
    task_col = pc.take(pa.array(names.tolist(), pa.string()), pa.array(codes))
    d_rows = np.flatnonzero(dropped)
    (out / layout.DROPPED).write_parquet(pa.table({
        schema.ROW_ID: pa.array(ids[d_rows], pa.int64()), schema.TASK: task_col.take(pa.array(d_rows)),
        layout.REPRESENTATIVE: pa.array(rep[d_rows], pa.int64()),
        layout.DUPLICATE_OF: pa.array(dup_of[d_rows], pa.int64()),
        layout.SIMILARITY: pa.array(sim[d_rows], pa.float32()),
        layout.PASS: pa.array(which[d_rows].tolist(), pa.string()),
        layout.CLUSTER: pa.array(cluster[d_rows], pa.int64())}))
    (out / layout.PAIRS).write_parquet(pa.table({
        "row_a": pa.array(np.concatenate(pair_a), pa.int64()), "row_b": pa.array(np.concatenate(pair_b), pa.int64()),
        layout.SIMILARITY: pa.array(np.concatenate(pair_sim), pa.float32()),
        layout.PASS: pa.array(np.concatenate(pair_pass).tolist(), pa.string()),
        layout.CLUSTER: pa.array(np.concatenate(pair_cluster), pa.int64())}))
    # groups: every kept row with at least one dropped row resolving to it
    rep_of_dropped = rep[d_rows]
    reps, inverse = np.unique(rep_of_dropped, return_inverse=True)
    n_exact = np.bincount(inverse, weights=(which[d_rows] == layout.PASS_EXACT), minlength=len(reps))
    n_sem = np.bincount(inverse, minlength=len(reps)) - n_exact
    rep_pos = np.searchsorted(ids, reps)
    (out / layout.GROUPS).write_parquet(pa.table({
        layout.REPRESENTATIVE: pa.array(reps, pa.int64()), schema.TASK: task_col.take(pa.array(rep_pos)),
        layout.SIZE: pa.array(1 + n_exact.astype(np.int64) + n_sem.astype(np.int64)),
        layout.PASS_EXACT: pa.array(n_exact.astype(np.int64)), layout.PASS_SEMANTIC: pa.array(n_sem.astype(np.int64))}))
    T = len(names)
    is_exact = dropped & (which == layout.PASS_EXACT)
    is_sem = dropped & (which == layout.PASS_SEMANTIC)
    task_table = pa.table({
        schema.TASK: pa.array(names.tolist(), pa.string()),
        "rows": np.bincount(codes, minlength=T).astype(np.int64),
        "kept": np.bincount(codes[~dropped], minlength=T).astype(np.int64),
        "dropped_exact": np.bincount(codes[is_exact], minlength=T).astype(np.int64),
        "dropped_semantic": np.bincount(codes[is_sem], minlength=T).astype(np.int64),
        "groups": np.bincount(codes[rep_pos], minlength=T).astype(np.int64)})
    (out / layout.TASKS).write_parquet(task_table)

    kept_rows = n - int(dropped.sum())
    if cfg.select.dedup:
        t0 = time.monotonic()
        kept = kept_features(run_dir)  # a resumed run keeps the shards its finished tasks wrote
        kept.mkdir()
        (work / "dropped.npy").write_npy(np.sort(ids[d_rows]))
        items = [KeptTask(f, str(kept / Location.parse(f).name), str(work / "dropped.npy")) for f in store.files]
        copied = ctx.map("dedup:kept", _copy_kept, items, [f"{i:05d}" for i in range(len(items))], unit="shards",
                         work=work / "kept")
        if sum(int(c["rows"][0]) for c in copied) != kept_rows:
            raise RuntimeError("dedup: the kept shards do not hold the kept rows (stale work files)")
        timings["kept"] = round(time.monotonic() - t0, 3)
    result = {"rows": int(n), "kept": int(kept_rows), "dropped": int(dropped.sum()),
              "dropped_exact": int(is_exact.sum()), "dropped_semantic": int(is_sem.sum()),
              "groups": int(len(reps)), "executor": ctx.executor.name, **semantic_summary,
              "kept_features": bool(cfg.select.dedup), "step_seconds": timings,
              "seconds": round(time.monotonic() - started, 3)}
    work.delete()
    (out / layout.META).write_json({**result, "config": cfg.dedup.model_dump(mode="json")})
    return result


def pool_rows(cfg: RunConfig, run_dir: RunDir, store_rows: int) -> int:
    """Rows of the whole pool the budget is a share of: the dedup phase's row count with ``select.dedup`` (the
    store then holds the kept rows only), else ``store_rows``."""
    if not cfg.select.dedup:
        return store_rows
    meta = dedup_dir(run_dir) / layout.META
    if not meta.exists():
        raise RuntimeError(f"select.dedup is true but {meta} does not exist: run the dedup phase first")
    return int(meta.read_json()["rows"])
