"""DataTailor over partitions: no process holds the ``last_token`` column.

Where each step runs:

1. *driver*: per-row scalars (informativeness, τ, turns) and tasks. Tasks up to ``dense_max_rows`` rows are
   clustered whole by the exact Ward tree; larger tasks are split into pre-clusters first: *partition tasks*
   gather a seeded training sample, the *driver* trains the pre-cluster k-means, *partition tasks* assign every
   row and return mergeable pre-cluster sums, the *driver* runs weighted Ward on the pre-cluster means (App. B.1);
2. *partition tasks* regroup rows by group (a small task, or one Ward cluster of a large task) into buckets;
3. *bucket tasks*: Ward of each small task, then per Ward cluster the blocked distance sums of uniqueness U
   (Eq. 3) and the cluster sum; they write the member files the online scorer reads;
4. *driver*: cluster means, association A (Eq. 4), representativeness R (Eq. 5), within-task ranks and the
   combined score (Eq. 6); select: task budgets (Eq. 7 / App. Eq. 14) and top-k per task.

Sums of fp16 rows are exact in float64 (see :func:`~datasel_ray.clustering.precluster_sums`), and every cluster
kernel runs on the cluster's rows in row-id order, so results do not depend on partitioning or executor.
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
from datasel_ray.methods import datatailor
from datasel_ray.methods.registry import SelectionMethod
from datasel_ray.pipeline.feature_store import column_to_numpy, vector_column
from datasel_ray.pipeline.fit.context import (TASK_SCORE_THRESHOLD, FitContext, MethodSelection, Partition,
                                              bucket_plan, read_bucket, write_buckets)
from datasel_ray.pipeline.fit.state import MemberCache, POOL_MATCH_TOLERANCE, percentile, read_columns
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "datatailor"
SCALARS = [schema.INFORMATIVENESS, schema.TAU, schema.N_TURNS]


class DataTailor(SelectionMethod):
    """DataTailor (Yu et al., ICCV 2025): informativeness, uniqueness, representativeness; per-task budgets.
    Files: ``stats/datatailor/`` (:data:`~datasel_ray.io.layout.CLUSTERS`, means, rows, member files); column
    and summary names below."""

    name = NAME
    description = "DataTailor: informativeness, uniqueness, representativeness; per-task budgets."
    columns = (schema.LAST_TOKEN, schema.INFORMATIVENESS, schema.TAU, schema.N_TURNS)
    fits = True
    scored = True
    config_section = "datatailor"

    # columns of stats/datatailor/clusters.parquet (besides layout.CLUSTER, SIZE, BUCKET, OFFSET and the task)
    ASSOCIATION = "association"
    PAIR_SUM = "pair_sum"
    V_SUM = "v_sum"
    # per-row value columns: stats/datatailor/rows.parquet (all but informativeness) and scores.parquet
    INFORMATIVENESS = "informativeness"
    UNIQUENESS = "uniqueness"
    REPRESENTATIVENESS = "representativeness"
    RANK_INFORMATIVENESS = "rank_informativeness"
    RANK_UNIQUENESS = "rank_uniqueness"
    RANK_REPRESENTATIVENESS = "rank_representativeness"
    # summary.json keys
    TASK_BUDGET = "task_budget"
    TASK_TAU = "task_tau"

    def fit(self, ctx: FitContext) -> dict:
        return fit(ctx)

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        return select(ctx, budget)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> DataTailorState:
        return DataTailorState.load(run_dir, cfg, summary, cache)


def _seed(ctx: FitContext) -> int:
    return derive_seed(ctx.cfg.seed, "datatailor")


# ------------------------------------------------------------------------------------------ partition tasks
@dataclass(frozen=True, eq=False)
class GatherTask:
    """Gather rows ``want`` (int64 store positions) of ``part``'s ``last_token`` as float32 (``width`` wide)."""

    part: Partition
    want: np.ndarray
    width: int


@dataclass(frozen=True, eq=False)
class PreassignTask:
    """Assign the rows of the large tasks in ``part`` to their task's nearest pre-centroid: ``codes`` holds the
    task code of each shard's rows, ``centroids`` the pre-centroid file of each large task code."""

    part: Partition
    codes: tuple[np.ndarray, ...]
    centroids: dict[int, str]


@dataclass(frozen=True, eq=False)
class RegroupTask:
    """Write ``part``'s rows into their group's regroup bucket: ``groups`` is the int64[N] group-of-row file,
    ``bucket_plan`` the int64[G] bucket-of-group file, ``regroup`` the regroup folder."""

    part: Partition
    groups: str
    bucket_plan: str
    regroup: str


@dataclass(frozen=True, eq=False)
class ClustersTask:
    """Per group of regroup bucket ``bucket`` (under ``regroup``): Ward clusters where ``ward[group]`` (a
    small task; ``cut``, ``cut_ratio``, ``dense_max_rows`` as :func:`~datasel_ray.clustering.ward_clusters`),
    then U's sums per cluster; the member file ``members``."""

    regroup: str
    bucket: int
    members: str
    ward: tuple[bool, ...]
    cut: str
    cut_ratio: float
    dense_max_rows: int


def _gather(task: GatherTask) -> dict[str, np.ndarray]:
    pos_out, x_out = [], []
    for path, pos in task.part.shards():
        keep = np.flatnonzero(np.isin(pos, task.want))
        if len(keep):
            x = read_shard(path, [schema.LAST_TOKEN])[schema.LAST_TOKEN]
            pos_out.append(pos[keep])
            x_out.append(np.asarray(x[keep], dtype=np.float32))
    return {"pos": np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64),
            "x": np.concatenate(x_out) if x_out else np.zeros((0, task.width), np.float32)}


def _preassign(task: PreassignTask) -> dict[str, np.ndarray]:
    """Nearest pre-centroid of every row of a large task; per task, pre-cluster sums and counts."""
    from datasel_ray.clustering import assign_nearest, precluster_sums

    centroids = {int(t): Location.parse(p).read_npy() for t, p in task.centroids.items()}
    out: dict[str, np.ndarray] = {}
    pos_all, pre_all = [], []
    for (path, pos), codes in zip(task.part.shards(), task.codes):
        big = np.flatnonzero(np.isin(codes, list(centroids)))
        if not len(big):
            continue
        x = read_shard(path, [schema.LAST_TOKEN])[schema.LAST_TOKEN]
        for t in np.unique(codes[big]):
            rows = big[codes[big] == t]
            pre = assign_nearest(x[rows], centroids[int(t)])
            sums, counts = precluster_sums(x[rows], pre, len(centroids[int(t)]))
            out[f"sums_{t}"] = out.get(f"sums_{t}", 0) + sums
            out[f"counts_{t}"] = out.get(f"counts_{t}", 0) + counts
            pos_all.append(pos[rows])
            pre_all.append(pre)
    out["pos"] = np.concatenate(pos_all) if pos_all else np.zeros(0, np.int64)
    out["pre"] = np.concatenate(pre_all) if pre_all else np.zeros(0, np.int64)
    return out


def _regroup(task: RegroupTask) -> dict[str, np.ndarray]:
    group_of_pos = Location.parse(task.groups).read_npy(mmap=True)
    buckets = Location.parse(task.bucket_plan).read_npy()
    ids, x, v, groups = [], [], [], []
    for path, pos in task.part.shards():
        cols = read_shard(path, [schema.LAST_TOKEN, schema.INFORMATIVENESS])
        ids.append(cols[schema.ROW_ID])
        x.append(cols[schema.LAST_TOKEN])
        v.append(cols[schema.INFORMATIVENESS].astype(np.float64))
        groups.append(group_of_pos[pos])
    write_buckets(Location.parse(task.regroup), task.part.key, np.concatenate(groups), buckets, np.concatenate(ids),
                  np.concatenate(x), {schema.INFORMATIVENESS: np.concatenate(v)})
    return {"rows": np.array([sum(len(i) for i in ids)])}


def _clusters(task: ClustersTask) -> dict[str, np.ndarray]:
    """Per group of one bucket: Ward (small tasks), then per Ward cluster U's sums and the cluster sum."""
    from datasel_ray.clustering import ward_clusters

    bucket = read_bucket(Location.parse(task.regroup), task.bucket)
    ids, groups, x = bucket[schema.ROW_ID], bucket[layout.CLUSTER], bucket[layout.VECTOR]
    v = bucket[schema.INFORMATIVENESS].astype(np.float64)
    local = np.zeros(len(ids), dtype=np.int64)
    gvals, gstarts = np.unique(groups, return_index=True)
    gbounds = np.append(gstarts, len(groups))
    for g, lo, hi in zip(gvals, gbounds[:-1], gbounds[1:]):
        if task.ward[int(g)]:
            local[lo:hi] = ward_clusters(x[lo:hi], cut=task.cut, cut_ratio=task.cut_ratio,
                                         dense_max_rows=task.dense_max_rows)
    order = np.lexsort((ids, local, groups))
    ids, groups, local, x, v = ids[order], groups[order], local[order], x[order], v[order]
    key = groups * (int(local.max()) + 1 if len(local) else 1) + local
    _, starts = np.unique(key, return_index=True)
    bounds = np.append(starts, len(key))
    num = np.zeros(len(ids))
    n_cl = len(starts)
    pair_sum, v_sum = np.zeros(n_cl), np.zeros(n_cl)
    sums = np.zeros((n_cl, x.shape[1]))
    for i in range(n_cl):
        lo, hi = bounds[i], bounds[i + 1]
        num[lo:hi], pair_sum[i] = datatailor.cluster_distance_sums(x[lo:hi], v[lo:hi])
        v_sum[i] = v[lo:hi].sum()
        sums[i] = np.asarray(x[lo:hi], dtype=np.float64).sum(0)
    Location.parse(task.members).write_parquet(pa.table({
        schema.ROW_ID: pa.array(ids, pa.int64()), layout.VECTOR: vector_column(x),
        schema.INFORMATIVENESS: pa.array(v)}), row_group_rows=256)
    return {"row_id": ids, "num": num, "group": groups[starts], "local": local[starts],
            "size": np.diff(bounds).astype(np.int64), "offset": starts.astype(np.int64), "pair_sum": pair_sum,
            "v_sum": v_sum, "sums": sums}


# ------------------------------------------------------------------------------------------------- driver
def _merge(parts) -> np.ndarray:
    """Sum of partial arrays in partition order, holding the total and one part (exact for fp16-row sums)."""
    total = None
    for part in parts:
        total = part.copy() if total is None else np.add(total, part, out=total)
    return total


def _large_task_labels(ctx: FitContext, big: np.ndarray, seed: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Pre-cluster path for the large tasks: per row of a large task, its Ward cluster within the task."""
    from datasel_ray.clustering import precluster_train_rows, train_preclusters, ward_from_preclusters

    cfg = ctx.cfg.datatailor
    store = ctx.store
    d = store.widths[schema.LAST_TOKEN]
    work = ctx.work(NAME, layout.WORK_PRECLUSTERS)
    centroid_paths = {}
    for t in big:  # one task's training sample on the driver at a time
        rows = np.flatnonzero(store.task_codes == t)
        pick = precluster_train_rows(len(rows), cfg.precluster_train_rows, seed + int(t))
        want = rows if pick is None else rows[pick]
        need = len(want) * d * 4
        if need > ctx.cfg.aggregate.driver_bytes:
            raise ValueError(f"datatailor: pre-cluster training of task {store.task_names[t]!r} would hold "
                             f"{len(want)} x {d} float32 = {need / 2**30:.1f} GiB on the driver "
                             f"(aggregate.driver_bytes): lower datatailor.precluster_train_rows")
        loc = work / layout.PRECLUSTER_CENTROIDS.format(task=int(t))
        if not loc.exists():
            parts = ctx.partitions([schema.LAST_TOKEN])
            got = ctx.map(f"datatailor:train-rows:{store.task_names[t]}", _gather,
                          [GatherTask(part=p, want=want, width=d) for p in parts], [p.key for p in parts])
            pos = np.concatenate([r["pos"] for r in got])
            xs = np.concatenate([r["x"] for r in got])[np.argsort(pos, kind="stable")]
            del got
            loc.write_npy(train_preclusters(xs, int(min(len(rows), cfg.precluster_size)), seed + int(t)))
            del xs
        centroid_paths[int(t)] = str(loc)
    parts = ctx.partitions([schema.LAST_TOKEN])
    tasks = [PreassignTask(part=p, codes=tuple(store.task_codes[pos] for pos in p.pos), centroids=centroid_paths)
             for p in parts]
    # every partition holds pre-cluster sums of every large task (T x m x d float64): merged one array at a time
    results = ctx.map("datatailor:preclusters", _preassign, tasks, [p.key for p in parts], stored=True)
    pre = np.full(store.n, -1, dtype=np.int64)
    ward_of_pre: dict[int, np.ndarray] = {}
    for t in big:
        sums = _merge(r[f"sums_{t}"] for r in results if f"sums_{t}" in r)
        counts = _merge(r[f"counts_{t}"] for r in results if f"counts_{t}" in r)
        ward_of_pre[int(t)] = ward_from_preclusters(sums, counts, cfg.cut, cfg.cut_ratio)
    for r in results:
        pre[r["pos"]] = r["pre"]
    ward = np.full(store.n, -1, dtype=np.int64)
    for t in big:
        rows = np.flatnonzero(store.task_codes == t)
        ward[rows] = ward_of_pre[int(t)][pre[rows]]
    return ward, ward_of_pre


def fit(ctx: FitContext) -> dict:
    """Aggregate: Ward clusters per task, U, A, R and the combined score of every row (budget-independent)."""
    cfg = ctx.cfg.datatailor
    store = ctx.store
    store.require([schema.LAST_TOKEN, *SCALARS])
    row_bytes = store.row_bytes([schema.LAST_TOKEN]) + 8
    if cfg.dense_max_rows * row_bytes > ctx.partition_bytes:
        raise ValueError(f"aggregate.partition_bytes ({ctx.partition_bytes}) must hold a dense Ward task of "
                         f"datatailor.dense_max_rows ({cfg.dense_max_rows}) rows x {row_bytes} bytes: raise it")
    seed = _seed(ctx)
    stats = ctx.stats(NAME)
    work = ctx.work(NAME)
    sc = ctx.scalars(SCALARS)
    T = len(store.task_names)
    task_size = np.bincount(store.task_codes, minlength=T)
    big = np.flatnonzero(task_size > cfg.dense_max_rows)
    ward = np.full(store.n, -1, dtype=np.int64)
    if len(big):
        ward, _ = _large_task_labels(ctx, big, seed)
    # groups: one per small task (Ward in the bucket task), one per Ward cluster of a large task
    group = np.empty(store.n, dtype=np.int64)
    group_task, group_ward, sizes = [], [], []
    large = set(big.tolist())
    for t in range(T):
        rows = np.flatnonzero(store.task_codes == t)
        if t in large:
            for c in range(int(ward[rows].max()) + 1):
                members = rows[ward[rows] == c]
                group[members] = len(group_task)
                group_task.append(t)
                group_ward.append(False)
                sizes.append(len(members))
        else:
            group[rows] = len(group_task)
            group_task.append(t)
            group_ward.append(True)
            sizes.append(len(rows))
    buckets = bucket_plan(np.array(sizes), row_bytes, ctx.partition_bytes)
    (work / layout.WORK_GROUPS).write_npy(group)
    (work / layout.WORK_BUCKET_PLAN).write_npy(buckets)
    regroup = str(work / layout.WORK_REGROUP)
    parts = ctx.partitions([schema.LAST_TOKEN])
    ctx.map("datatailor:regroup", _regroup,
            [RegroupTask(part=p, groups=str(work / layout.WORK_GROUPS),
                         bucket_plan=str(work / layout.WORK_BUCKET_PLAN), regroup=regroup) for p in parts],
            [p.key for p in parts])
    bucket_ids = np.unique(buckets)
    tasks = [ClustersTask(regroup=regroup, bucket=int(b), members=str(layout.members_file(stats, b)),
                          ward=tuple(group_ward), cut=cfg.cut, cut_ratio=cfg.cut_ratio,
                          dense_max_rows=cfg.dense_max_rows) for b in bucket_ids]
    results = ctx.map("datatailor:clusters", _clusters, tasks, [layout.bucket_key(b) for b in bucket_ids],
                      unit="buckets")
    # global cluster ids, task-major: (task, group, local label) in order
    rec = []
    for b, r in zip(bucket_ids, results):
        for i in range(len(r["group"])):
            rec.append((group_task[int(r["group"][i])], int(r["group"][i]), int(r["local"][i]), int(b), i))
    rec.sort()
    K = len(rec)
    cluster_task = np.array([t for t, *_ in rec], dtype=np.int64)
    size = np.zeros(K, dtype=np.int64)
    offset, bucket_of = np.zeros(K, dtype=np.int64), np.zeros(K, dtype=np.int64)
    pair_sum, v_sum = np.zeros(K), np.zeros(K)
    means = np.zeros((K, store.widths[schema.LAST_TOKEN]))
    labels = np.empty(store.n, dtype=np.int64)
    num = np.empty(store.n)
    by_bucket = {int(b): r for b, r in zip(bucket_ids, results)}
    for c, (_, _, _, b, i) in enumerate(rec):
        r = by_bucket[b]
        size[c], offset[c], bucket_of[c] = r["size"][i], r["offset"][i], b
        pair_sum[c], v_sum[c] = r["pair_sum"][i], r["v_sum"][i]
        means[c] = r["sums"][i] / r["size"][i]
        lo = r["offset"][i]
        pos = np.searchsorted(store.row_ids, r["row_id"][lo:lo + size[c]])
        labels[pos] = c
        num[pos] = r["num"][lo:lo + size[c]]
    v = sc[schema.INFORMATIVENESS].astype(np.float64)
    U = _uniqueness_by_cluster(num, labels, pair_sum, size, v_sum, cfg.uniqueness)
    A = datatailor.association(means, cluster_task)
    R = datatailor.representativeness(A[labels], v, labels, cfg.representativeness)
    rank_I, rank_U, rank_R, score = datatailor.task_ranks_and_score(v, U, R, sc[schema.N_TURNS],
                                                                    _task_rows(store.task_codes, T))
    (stats / layout.CLUSTERS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(K, dtype=np.int64), schema.TASK: pa.array(store.task_names[cluster_task]),
        layout.SIZE: size, DataTailor.ASSOCIATION: A, DataTailor.PAIR_SUM: pair_sum, DataTailor.V_SUM: v_sum,
        layout.BUCKET: bucket_of, layout.OFFSET: offset}))
    (stats / layout.MEANS).write_npy(means.astype(np.float32))
    (stats / layout.ROWS).write_parquet(pa.table({
        schema.ROW_ID: pa.array(store.row_ids, pa.int64()), layout.CLUSTER: labels, DataTailor.UNIQUENESS: U,
        DataTailor.REPRESENTATIVENESS: R, DataTailor.RANK_INFORMATIVENESS: rank_I,
        DataTailor.RANK_UNIQUENESS: rank_U, DataTailor.RANK_REPRESENTATIVENESS: rank_R, layout.SCORE: score}))
    ctx.work(NAME, layout.WORK_REGROUP).delete()
    return {"clusters": int(K), "tasks": int(T), "large_tasks": int(len(big)), "buckets": int(len(bucket_ids))}


def _task_rows(codes: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """Per task code, its rows' positions (ascending)."""
    return [np.flatnonzero(codes == t) for t in range(n_tasks)]


def _uniqueness_by_cluster(num, labels, pair_sum, size, v_sum, mode) -> np.ndarray:
    from datasel_ray.clustering import cluster_order

    order, starts = cluster_order(labels, len(size))
    U = np.empty(len(num))
    for c in range(len(size)):
        rows = order[starts[c]:starts[c + 1]]
        U[rows] = datatailor.cluster_uniqueness(num[rows], pair_sum[c], int(size[c]), v_sum[c], mode)
    return U


def select(ctx: FitContext, budget: int) -> MethodSelection:
    """Task budgets ∝ N_t · τ̄_t² and the top-k rows of each task by score (ties: lowest row position)."""
    stats = layout.method_stats(ctx.run_dir, NAME)
    if not (stats / layout.ROWS).exists():
        raise RuntimeError(f"{stats / layout.ROWS} is missing: run the aggregate phase first")
    t = (stats / layout.ROWS).read_parquet()
    if not np.array_equal(column_to_numpy(t.column(schema.ROW_ID)), ctx.store.row_ids):
        raise RuntimeError(f"{stats / layout.ROWS} does not cover the rows of features/: re-run aggregate "
                           f"(--force aggregate)")
    cols = {name: column_to_numpy(t.column(name)) for name in t.column_names if name != schema.ROW_ID}
    sc = ctx.scalars([schema.INFORMATIVENESS, schema.TAU])
    codes = ctx.store.task_codes
    T = len(ctx.store.task_names)
    task_rows = _task_rows(codes, T)
    tsize = np.bincount(codes, minlength=T)
    ttau = datatailor.task_tau_means(sc[schema.TAU], task_rows)
    kb = datatailor.task_budgets(tsize, ttau, budget)
    score = cols[layout.SCORE]
    selected, _ = datatailor.top_k_per_task(score, task_rows, kb)
    columns = {layout.CLUSTER: cols[layout.CLUSTER],
               DataTailor.INFORMATIVENESS: sc[schema.INFORMATIVENESS].astype(np.float64), **{
                   k: cols[k] for k in (DataTailor.UNIQUENESS, DataTailor.REPRESENTATIVENESS,
                                        DataTailor.RANK_INFORMATIVENESS, DataTailor.RANK_UNIQUENESS,
                                        DataTailor.RANK_REPRESENTATIVENESS)}, layout.SCORE: score}
    names = ctx.store.task_names.astype(str).tolist()
    return MethodSelection(selected=selected, columns=columns, summary={
        DataTailor.TASK_BUDGET: dict(zip(names, kb.tolist())),
        DataTailor.TASK_TAU: dict(zip(names, ttau.round(8).tolist()))})


# ------------------------------------------------------------------------------------------- online state
@dataclass
class DataTailorState:
    """DataTailor's frozen state: Ward-cluster means, association and pair sums; per-task sorted pool values;
    member files.

    U, R, within-task percentile ranks and the combined score against the nearest Ward cluster of the sample's
    task; a pool row gets the batch decision and its batch values; a new sample would be selected when its
    score reaches the task's lowest selected score.
    """

    stats: Location
    means: np.ndarray  # float32 [K, d]
    clusters: dict[str, np.ndarray]
    pool: dict[str, dict[str, np.ndarray]]  # task -> component -> sorted pool values (float64)
    thresholds: dict[str, float | None]
    uniqueness_mode: str
    representativeness_mode: str
    pool_ids: np.ndarray
    pool_selected: np.ndarray
    pool_values: dict[str, np.ndarray]  # row-id order: informativeness, uniqueness, representativeness, score
    cache: MemberCache = field(default_factory=MemberCache)

    COMPONENTS = (DataTailor.INFORMATIVENESS, DataTailor.UNIQUENESS, DataTailor.REPRESENTATIVENESS, layout.SCORE)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> DataTailorState:
        stats = layout.method_stats(run_dir, NAME)
        scores = read_columns(layout.selection_dir(run_dir, NAME) / layout.SCORES,
                              [schema.ROW_ID, schema.TASK, layout.SELECTED, *cls.COMPONENTS])
        order = np.argsort(scores[schema.ROW_ID], kind="stable")
        tasks = scores[schema.TASK].astype(str)
        pool = {str(t): {name: np.sort(scores[name][tasks == t].astype(np.float64)) for name in cls.COMPONENTS}
                for t in np.unique(tasks)}
        return cls(stats=stats, means=(stats / layout.MEANS).read_npy(),
                   clusters=read_columns(stats / layout.CLUSTERS), pool=pool,
                   thresholds=dict(summary.get(TASK_SCORE_THRESHOLD, {})),
                   uniqueness_mode=cfg.datatailor.uniqueness,
                   representativeness_mode=cfg.datatailor.representativeness,
                   pool_ids=scores[schema.ROW_ID][order], pool_selected=scores[layout.SELECTED][order],
                   pool_values={k: scores[k][order].astype(np.float64) for k in cls.COMPONENTS}, cache=cache)

    def _members(self, c: int) -> dict[str, np.ndarray]:
        cl = self.clusters
        return self.cache.get(layout.members_file(self.stats, cl[layout.BUCKET][c]), cl[layout.OFFSET][c],
                              int(cl[layout.SIZE][c]), [schema.ROW_ID, layout.VECTOR, schema.INFORMATIVENESS])

    def score_new(self, features: dict[str, Any], sample: Any) -> dict:
        """DataTailor fields of one sample from its ``last_token`` state (float[d], fp16 as extracted) and
        ``informativeness``, with the sample's ``task`` and ``n_turns``."""
        informativeness = float(features[schema.INFORMATIVENESS])
        n_turns, task = sample.n_turns, sample.task
        h = np.asarray(features[schema.LAST_TOKEN], dtype=np.float64)
        candidates = np.flatnonzero(self.clusters[schema.TASK].astype(str) == task)
        dist = np.linalg.norm(self.means[candidates].astype(np.float64) - h, axis=1)
        near = candidates[np.argsort(dist, kind="stable")[:3]]
        scale = max(float(np.linalg.norm(h)), 1e-12)
        for c in near:  # a pool row may sit nearer another cluster's mean than its own Ward cluster's
            m = self._members(int(c))
            d = np.linalg.norm(m[layout.VECTOR].astype(np.float64) - h, axis=1)
            j = int(np.argmin(d))
            if d[j] / scale <= POOL_MATCH_TOLERANCE:
                row_id = int(m[schema.ROW_ID][j])
                i = int(np.searchsorted(self.pool_ids, row_id))
                vals = {k: float(v[i]) for k, v in self.pool_values.items()}
                return self._result(int(c), float(np.linalg.norm(self.means[c] - h)), informativeness, vals, task,
                                    row_id, bool(self.pool_selected[i]), "pool_row")
        c = int(near[0])
        m = self._members(c)
        U = datatailor.uniqueness_new(h, m[layout.VECTOR], m[schema.INFORMATIVENESS],
                                      float(self.clusters[DataTailor.PAIR_SUM][c]), self.uniqueness_mode)
        R = float(datatailor.representativeness_value(self.clusters[DataTailor.ASSOCIATION][c], informativeness,
                                                      self.clusters[DataTailor.V_SUM][c],
                                                      self.representativeness_mode))
        pool = self.pool[task]
        ranks = {k: percentile(pool[k], v) for k, v in ((DataTailor.INFORMATIVENESS, informativeness),
                                                        (DataTailor.UNIQUENESS, U),
                                                        (DataTailor.REPRESENTATIVENESS, R))}
        score = float(datatailor.combined_score(ranks[DataTailor.INFORMATIVENESS], ranks[DataTailor.UNIQUENESS],
                                                ranks[DataTailor.REPRESENTATIVENESS], n_turns))
        threshold = self.thresholds.get(task)
        vals = {DataTailor.INFORMATIVENESS: float(informativeness), DataTailor.UNIQUENESS: U,
                DataTailor.REPRESENTATIVENESS: R, layout.SCORE: score}
        return self._result(c, float(dist[np.searchsorted(candidates, c)]), informativeness, vals, task, None,
                            bool(threshold is not None and score >= threshold), "score_threshold")

    def _result(self, c: int, dist: float, informativeness: float, vals: dict, task: str, row_id, would: bool,
                rule: str) -> dict:
        pool = self.pool[task]
        ranks = {rank: percentile(pool[k], vals[k]) for rank, k in (
            (DataTailor.RANK_INFORMATIVENESS, DataTailor.INFORMATIVENESS),
            (DataTailor.RANK_UNIQUENESS, DataTailor.UNIQUENESS),
            (DataTailor.RANK_REPRESENTATIVENESS, DataTailor.REPRESENTATIVENESS))}
        u = vals[DataTailor.UNIQUENESS]
        return {"cluster": c, "distance": dist, "informativeness": float(informativeness),
                "uniqueness": None if not np.isfinite(u) else u,
                "representativeness": vals[DataTailor.REPRESENTATIVENESS], **ranks, "score": vals[layout.SCORE],
                "score_percentile": percentile(pool[layout.SCORE], vals[layout.SCORE]),
                "threshold": self.thresholds.get(task), "pool_row_id": row_id, "rule": rule, "would_select": would}
