"""Aggregate phase: ``features/`` → ``stats/`` (per-task and per-cluster tables, centroids, faiss index).

Outputs (all keyed so that the select phase and the online scorer reuse them without recomputation):

* ``tasks.parquet``: per task, from Ray Data ``groupby("task").aggregate(...)``: count, mean/std τ, mean
  informativeness, mean token lengths, mean answer loss (and mean gradient norm with TIVE).
* ``coincide_clusters.parquet`` + ``coincide_centroids.npy`` + ``coincide_centroids.faiss`` +
  ``coincide_assignments.parquet``: spherical k-means clusters with size, density D, transferability S and
  selection probability P (COINCIDE Eq. 5-6, reference variant by default).
* ``datatailor_clusters.parquet`` + ``datatailor_means.npy`` + ``datatailor_assignments.parquet``: Ward
  clusters inside each task with size, inter-cluster association A (DataTailor Eq. 4-5) and mean vector.
* ``tive_tasks.parquet`` + ``tive_task_mean_grad.npy`` (when gradients were extracted): task value and the
  mean normalised projected gradient per task (TIVE Eq. 4-5).
* ``meta.json``: row count, dimensions, layer count, cluster counts, and the config used.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.pipeline import ray_adapter
from datasel_ray.pipeline.feature_store import feature_columns, load_features, vector_column
from datasel_ray.pipeline.progress import Progress
from datasel_ray.seeds import derive_seed

TASK_STAT_COLUMNS = {
    schema.TAU: ["mean", "std"],
    schema.INFORMATIVENESS: ["mean", "std"],
    schema.N_TURNS: ["mean"],
    schema.N_IMAGE_TOKENS: ["mean"],
    schema.N_TEXT_TOKENS: ["mean"],
    schema.N_ANSWER_TOKENS: ["mean"],
    schema.ANSWER_LOSS: ["mean"],
}


def coincide_layer_count(vector_dim: int, hidden: int) -> int:
    """Hooked layers in a COINCIDE vector of ``vector_dim`` = n_layers · 2 · hidden (o_proj outputs are hidden-wide)."""
    if vector_dim % (2 * hidden):
        raise ValueError(f"coincide_vector width {vector_dim} is not a multiple of 2 x hidden ({hidden})")
    return vector_dim // (2 * hidden)


def write_faiss_index(loc: Location, vectors: np.ndarray) -> None:
    """An inner-product index over unit-normalised ``vectors`` (nearest centroid by cosine)."""
    import faiss

    from datasel_ray.clustering import normalize_rows

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(normalize_rows(vectors.astype(np.float32)), dtype=np.float32))
    loc.write_bytes(faiss.serialize_index(index).tobytes())


def task_statistics(feats: dict[str, np.ndarray]) -> pa.Table:
    columns = {schema.TASK: pa.array(feats[schema.TASK].astype(str))}
    wanted = dict(TASK_STAT_COLUMNS)
    if schema.GRAD_NORM in feats:
        wanted[schema.GRAD_NORM] = ["mean"]
    for name in wanted:
        columns[name] = pa.array(np.asarray(feats[name], dtype=np.float64))
    table = ray_adapter.groupby_aggregate(pa.table(columns), schema.TASK, wanted)
    table = table.rename_columns(["count" if c == "count()" else c for c in table.column_names])
    return table.sort_by(schema.TASK)


def aggregate_coincide(cfg: RunConfig, feats: dict[str, np.ndarray], stats: Location) -> dict:
    from datasel_ray.clustering import cluster_means, spherical_kmeans
    from datasel_ray.methods import coincide

    x = feats[schema.COINCIDE_VECTOR]
    n = x.shape[0]
    n_layers = coincide_layer_count(x.shape[1], feats[schema.LAST_TOKEN].shape[1])
    k = cfg.coincide.num_clusters or coincide.default_num_clusters(n)
    seed = cfg.coincide.seed if cfg.coincide.seed is not None else derive_seed(cfg.seed, "coincide", "kmeans")
    centroids, labels = spherical_kmeans(x, k, niter=cfg.coincide.niter, seed=seed,
                                         train_sample=cfg.coincide.train_sample, reduce_dim=cfg.coincide.reduce_dim,
                                         reduce_method=cfg.coincide.reduce_method)
    k = centroids.shape[0]
    if cfg.coincide.reduce_dim is not None:
        centroids = cluster_means(x, labels, k).astype(np.float32)
    size = np.bincount(labels, minlength=k)
    nonempty = np.flatnonzero(size)
    S = np.zeros(k)
    S[nonempty] = coincide.transferability(centroids[nonempty], n_layers, cfg.coincide.transferability,
                                           cfg.coincide.cos_threshold)
    D = coincide.density(x, labels, k, cfg.coincide.sigma)
    P = coincide.selection_probability(S, D, cfg.coincide.temperature)
    stats.mkdir()
    (stats / "coincide_clusters.parquet").write_parquet(pa.table({
        "cluster": np.arange(k, dtype=np.int64), "size": size.astype(np.int64), "density": D,
        "transferability": S, "probability": P, "centroid": vector_column(centroids)}))
    (stats / "coincide_centroids.npy").write_npy(centroids.astype(np.float32))
    write_faiss_index(stats / "coincide_centroids.faiss", centroids)
    (stats / "coincide_assignments.parquet").write_parquet(pa.table({
        schema.ROW_ID: feats[schema.ROW_ID], "cluster": labels.astype(np.int64)}))
    return {"clusters": int(k), "nonempty_clusters": int(len(nonempty)), "n_layers": n_layers, "kmeans_seed": seed}


def aggregate_datatailor(cfg: RunConfig, feats: dict[str, np.ndarray], stats: Location) -> dict:
    from datasel_ray.clustering import cluster_means
    from datasel_ray.methods import datatailor

    h = feats[schema.LAST_TOKEN]
    names, tindex = np.unique(feats[schema.TASK].astype(str), return_inverse=True)
    task_rows = [np.flatnonzero(tindex == t) for t in range(len(names))]
    labels, cluster_task = datatailor.cluster_tasks(h, task_rows, cfg.datatailor, derive_seed(cfg.seed, "datatailor"))
    k = len(cluster_task)
    size = np.bincount(labels, minlength=k)
    means = cluster_means(h, labels, k)
    A = datatailor.association(means, cluster_task)
    (stats / "datatailor_clusters.parquet").write_parquet(pa.table({
        "cluster": np.arange(k, dtype=np.int64), schema.TASK: pa.array(names[cluster_task].astype(str)),
        "size": size.astype(np.int64), "association": A, "mean": vector_column(means.astype(np.float32))}))
    (stats / "datatailor_means.npy").write_npy(means.astype(np.float32))
    (stats / "datatailor_assignments.parquet").write_parquet(pa.table({
        schema.ROW_ID: feats[schema.ROW_ID], "cluster": labels.astype(np.int64)}))
    return {"clusters": int(k), "tasks": int(len(names))}


def aggregate_tive(cfg: RunConfig, feats: dict[str, np.ndarray], stats: Location) -> dict:
    from datasel_ray.methods import tive

    names, codes = np.unique(feats[schema.TASK].astype(str), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    values = tive.task_values(feats[schema.GRAD_NORM], codes, mode=cfg.tive.task_value)
    mean_grad = tive.task_mean_gradients(feats[schema.GRAD_PROJ], codes)
    sizes = np.bincount(codes, minlength=len(names)).astype(np.int64)
    (stats / "tive_tasks.parquet").write_parquet(pa.table({
        schema.TASK: pa.array(names), "size": sizes, "task_value": np.asarray(values, dtype=np.float64),
        "mean_gradient_norm": np.linalg.norm(mean_grad, axis=1).astype(np.float64)}))
    (stats / "tive_task_mean_grad.npy").write_npy(mean_grad.astype(np.float32))
    return {"tasks": int(len(names)), "proj_dim": int(mean_grad.shape[1]), "task_value_mode": cfg.tive.task_value}


def run_aggregate(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    started = time.monotonic()
    available = feature_columns(run_dir)
    has_grads = schema.GRAD_PROJ in available
    columns = [schema.TASK, *TASK_STAT_COLUMNS, schema.COINCIDE_VECTOR, schema.LAST_TOKEN]
    if has_grads:
        columns += [schema.GRAD_PROJ, schema.GRAD_NORM]
    feats = load_features(run_dir, columns)
    n = len(feats[schema.ROW_ID])
    stats = run_dir / "stats"
    steps = ["tasks", "coincide", "datatailor"] + (["tive"] if has_grads else [])
    progress = Progress("aggregate", len(steps), run_dir / "progress.json", quiet=quiet, unit="steps")
    stats.mkdir()
    result: dict = {"rows": n}
    timings: dict[str, float] = {}
    for step in steps:
        t0 = time.monotonic()
        if step == "tasks":
            table = task_statistics(feats)
            (stats / "tasks.parquet").write_parquet(table)
            result["tasks"] = table.num_rows
        elif step == "coincide":
            result["coincide"] = aggregate_coincide(cfg, feats, stats)
        elif step == "datatailor":
            result["datatailor"] = aggregate_datatailor(cfg, feats, stats)
        else:
            result["tive"] = aggregate_tive(cfg, feats, stats)
        timings[step] = round(time.monotonic() - t0, 3)
        progress.update(1)
    progress.finish()
    result["step_seconds"] = timings
    result["seconds"] = round(time.monotonic() - started, 3)
    (stats / "meta.json").write_json({**result, "coincide_dim": int(feats[schema.COINCIDE_VECTOR].shape[1]),
                                      "hidden": int(feats[schema.LAST_TOKEN].shape[1]),
                                      "config": cfg.model_dump(mode="json", include={"coincide", "datatailor", "tive",
                                                                                      "seed"})})
    return result
