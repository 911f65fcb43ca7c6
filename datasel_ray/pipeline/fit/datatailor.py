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

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.io.storage import Location
from datasel_ray.methods import datatailor
from datasel_ray.pipeline.feature_store import column_to_numpy, vector_column
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection, bucket_plan, read_bucket, write_buckets
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "datatailor"
SCALARS = [schema.INFORMATIVENESS, schema.TAU, schema.N_TURNS]


def _seed(ctx: FitContext) -> int:
    return derive_seed(ctx.cfg.seed, "datatailor")


# ------------------------------------------------------------------------------------------ partition tasks
def _gather(item: dict) -> dict[str, np.ndarray]:
    pos_out, x_out = [], []
    for path, pos in zip(item["files"], item["pos"]):
        keep = np.flatnonzero(np.isin(pos, item["want"]))
        if len(keep):
            x = read_shard(path, [schema.LAST_TOKEN])[schema.LAST_TOKEN]
            pos_out.append(pos[keep])
            x_out.append(np.asarray(x[keep], dtype=np.float32))
    return {"pos": np.concatenate(pos_out) if pos_out else np.zeros(0, np.int64),
            "x": np.concatenate(x_out) if x_out else np.zeros((0, item["width"]), np.float32)}


def _preassign(item: dict) -> dict[str, np.ndarray]:
    """Nearest pre-centroid of every row of a large task; per task, pre-cluster sums and counts."""
    from datasel_ray.clustering import assign_nearest, precluster_sums

    centroids = {int(t): Location.parse(p).read_npy() for t, p in item["centroids"].items()}
    out: dict[str, np.ndarray] = {}
    pos_all, pre_all = [], []
    for path, pos, codes in zip(item["files"], item["pos"], item["codes"]):
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


def _regroup(item: dict) -> dict[str, np.ndarray]:
    group_of_pos = Location.parse(item["groups"]).read_npy(mmap=True)
    buckets = Location.parse(item["buckets"]).read_npy()
    ids, x, v, groups = [], [], [], []
    for path, pos in zip(item["files"], item["pos"]):
        cols = read_shard(path, [schema.LAST_TOKEN, schema.INFORMATIVENESS])
        ids.append(cols[schema.ROW_ID])
        x.append(cols[schema.LAST_TOKEN])
        v.append(cols[schema.INFORMATIVENESS].astype(np.float64))
        groups.append(group_of_pos[pos])
    write_buckets(Location.parse(item["work"]), item["key"], np.concatenate(groups), buckets, np.concatenate(ids),
                  np.concatenate(x), {schema.INFORMATIVENESS: np.concatenate(v)})
    return {"rows": np.array([sum(len(i) for i in ids)])}


def _clusters(item: dict) -> dict[str, np.ndarray]:
    """Per group of one bucket: Ward (small tasks), then per Ward cluster U's sums and the cluster sum."""
    from datasel_ray.clustering import ward_clusters

    cfg = item["cfg"]
    bucket = read_bucket(Location.parse(item["work"]), item["bucket"])
    ids, groups, x = bucket[schema.ROW_ID], bucket[layout.CLUSTER], bucket[layout.VECTOR]
    v = bucket[schema.INFORMATIVENESS].astype(np.float64)
    local = np.zeros(len(ids), dtype=np.int64)
    gvals, gstarts = np.unique(groups, return_index=True)
    gbounds = np.append(gstarts, len(groups))
    for g, lo, hi in zip(gvals, gbounds[:-1], gbounds[1:]):
        if item["ward"][int(g)]:
            local[lo:hi] = ward_clusters(x[lo:hi], cut=cfg["cut"], cut_ratio=cfg["cut_ratio"],
                                         dense_max_rows=cfg["dense_max_rows"])
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
    Location.parse(item["members"]).write_parquet(pa.table({
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
    work = ctx.work(NAME, "preclusters")
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
        loc = work / f"centroids-{int(t):05d}.npy"
        if not loc.exists():
            items, keys = ctx.partition_items([schema.LAST_TOKEN], want=want, width=d)
            got = ctx.map(f"datatailor:train-rows:{store.task_names[t]}", _gather, items, keys)
            pos = np.concatenate([r["pos"] for r in got])
            xs = np.concatenate([r["x"] for r in got])[np.argsort(pos, kind="stable")]
            del got
            loc.write_npy(train_preclusters(xs, int(min(len(rows), cfg.precluster_size)), seed + int(t)))
            del xs
        centroid_paths[int(t)] = str(loc)
    items, keys = ctx.partition_items([schema.LAST_TOKEN], centroids=centroid_paths)
    for item in items:
        item["codes"] = [store.task_codes[p] for p in item["pos"]]
    # every partition holds pre-cluster sums of every large task (T x m x d float64): merged one array at a time
    results = ctx.map("datatailor:preclusters", _preassign, items, keys, stored=True)
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
    (work / "groups.npy").write_npy(group)
    (work / "buckets.npy").write_npy(buckets)
    items, keys = ctx.partition_items([schema.LAST_TOKEN], groups=str(work / "groups.npy"),
                                      buckets=str(work / "buckets.npy"), work=str(work / "buckets"))
    ctx.map("datatailor:regroup", _regroup, items, keys)
    opts = {"cut": cfg.cut, "cut_ratio": cfg.cut_ratio, "dense_max_rows": cfg.dense_max_rows}
    bucket_ids = np.unique(buckets)
    items = [{"work": str(work / "buckets"), "bucket": int(b), "members": str(layout.members_file(stats, b)),
              "ward": dict(enumerate(group_ward)), "cfg": opts} for b in bucket_ids]
    results = ctx.map("datatailor:clusters", _clusters, items, [f"{int(b):05d}" for b in bucket_ids],
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
    rank_I, rank_U, rank_R = (np.zeros(store.n) for _ in range(3))
    for t in range(T):
        rows = np.flatnonzero(store.task_codes == t)
        rank_I[rows] = datatailor.percentile_rank(v[rows])
        rank_U[rows] = datatailor.percentile_rank(U[rows])
        rank_R[rows] = datatailor.percentile_rank(R[rows])
    score = datatailor.combined_score(rank_I, rank_U, rank_R, sc[schema.N_TURNS])
    (stats / layout.CLUSTERS).write_parquet(pa.table({
        layout.CLUSTER: np.arange(K, dtype=np.int64), schema.TASK: pa.array(store.task_names[cluster_task]),
        layout.SIZE: size, "association": A, "pair_sum": pair_sum, "v_sum": v_sum, layout.BUCKET: bucket_of,
        layout.OFFSET: offset}))
    (stats / layout.MEANS).write_npy(means.astype(np.float32))
    (stats / layout.ROWS).write_parquet(pa.table({
        schema.ROW_ID: pa.array(store.row_ids, pa.int64()), layout.CLUSTER: labels, "uniqueness": U,
        "representativeness": R, "rank_informativeness": rank_I, "rank_uniqueness": rank_U,
        "rank_representativeness": rank_R, layout.SCORE: score}))
    ctx.work(NAME, "buckets").delete()
    return {"clusters": int(K), "tasks": int(T), "large_tasks": int(len(big)), "buckets": int(len(bucket_ids))}


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
    tsize = np.bincount(codes, minlength=T)
    ttau = np.array([sc[schema.TAU][codes == i].astype(np.float64).mean() for i in range(T)])
    kb = datatailor.task_budgets(tsize, ttau, budget)
    score = cols[layout.SCORE]
    chosen = []
    for i in range(T):
        rows = np.flatnonzero(codes == i)
        chosen.append(rows[np.argsort(-score[rows], kind="stable")][:kb[i]])
    selected = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    columns = {layout.CLUSTER: cols[layout.CLUSTER],
               "informativeness": sc[schema.INFORMATIVENESS].astype(np.float64), **{
                   k: cols[k] for k in ("uniqueness", "representativeness", "rank_informativeness",
                                        "rank_uniqueness", "rank_representativeness")}, layout.SCORE: score}
    names = ctx.store.task_names.astype(str).tolist()
    return MethodSelection(selected=selected, columns=columns, summary={
        "task_budget": dict(zip(names, kb.tolist())), "task_tau": dict(zip(names, ttau.round(8).tolist()))})
