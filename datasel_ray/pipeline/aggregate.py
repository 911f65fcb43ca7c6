"""Aggregate phase: ``features/`` → ``stats/`` as a partitioned pipeline (no process holds a feature column).

* ``stats/tasks.parquet``: per task, Ray Data ``groupby("task").aggregate(...)`` reading the shards (in-process:
  the same statistics with numpy): count, mean/std τ, mean/std informativeness, mean token lengths, mean answer
  loss (and mean gradient norm with TIVE).
* ``stats/<method>/``: each method's budget-independent statistics, written by its ``fit`` in
  :mod:`datasel_ray.pipeline.fit` (the method registry lists which); layout in :mod:`datasel_ray.io.layout`.
* ``stats/meta.json``: row count, dimensions, executor, partitions, per-method summaries and the config used.

Partition and bucket tasks run on ``aggregate.executor`` (Ray tasks, or this process for a store that fits in one
partition); each task's result is kept under ``stats/_work/`` until the phase ends, so a killed run resumes
per partition.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.methods.registry import fitted_methods, get_method, registry
from datasel_ray.pipeline.executor import LocalExecutor
from datasel_ray.pipeline.fit.context import FitContext
from datasel_ray.pipeline.memory import release_free_memory
from datasel_ray.pipeline.store import FeatureStore

TASK_STAT_COLUMNS = {
    schema.TAU: ["mean", "std"],
    schema.INFORMATIVENESS: ["mean", "std"],
    schema.N_TURNS: ["mean"],
    schema.N_IMAGE_TOKENS: ["mean"],
    schema.N_TEXT_TOKENS: ["mean"],
    schema.N_ANSWER_TOKENS: ["mean"],
    schema.ANSWER_LOSS: ["mean"],
    schema.GRAD_NORM: ["mean"],
}


def make_context(cfg: RunConfig, run_dir: RunDir, quiet: bool = False, features=None) -> FitContext:
    """Feature store + executor of a run: ``aggregate.executor``, where ``auto`` is Ray when the widest feature
    family of the store needs more than one partition. The store is ``features`` when given, else the rows the
    dedup phase kept with ``select.dedup`` (so every method fits and selects among them), else ``features/``."""
    if features is None:
        from datasel_ray.pipeline.dedup import kept_features

        features = kept_features(run_dir) if cfg.select.dedup else run_dir / "features"
    store = FeatureStore(features)
    kind = cfg.aggregate.executor
    if kind == "auto":
        widest = max((store.row_bytes([c]) for c in store.widths), default=8)
        kind = "ray" if store.n * widest > cfg.aggregate.partition_bytes else "local"
    if kind == "ray":
        from datasel_ray.io.storage import worker_environment
        from datasel_ray.pipeline import ray_adapter

        ray_adapter.ensure_ray(cfg.ray, env=worker_environment(cfg.storage))
        executor = ray_adapter.RayExecutor(num_cpus=cfg.aggregate.num_cpus_per_task)
    else:
        executor = LocalExecutor()
    return FitContext(cfg, run_dir, store, executor, quiet)


def task_statistics(ctx: FitContext) -> pa.Table:
    """Per-task statistics (count, mean/std per column, std with ddof = 1) sorted by task."""
    wanted = {c: ops for c, ops in TASK_STAT_COLUMNS.items() if c in ctx.store.columns}
    if ctx.executor.name == "ray":
        from datasel_ray.pipeline import ray_adapter

        table = ray_adapter.groupby_aggregate_files(ctx.store.files, [schema.TASK, *wanted], schema.TASK, wanted)
        table = table.rename_columns(["count" if c == "count()" else c for c in table.column_names])
        return table.sort_by(schema.TASK)
    sc = ctx.scalars(list(wanted))
    codes = ctx.store.task_codes
    cols: dict[str, object] = {schema.TASK: pa.array(ctx.store.task_names.astype(str)),
                               "count": np.bincount(codes).astype(np.int64)}
    for c, ops in wanted.items():
        v = sc[c].astype(np.float64)
        for op in ops:
            f = np.mean if op == "mean" else (lambda a: np.std(a, ddof=1) if len(a) > 1 else np.nan)
            cols[f"{op}_{c}"] = np.array([f(v[codes == t]) for t in range(len(ctx.store.task_names))])
    return pa.table(cols)


def run_aggregate(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    started = time.monotonic()
    ctx = make_context(cfg, run_dir, quiet)
    stats = run_dir / layout.STATS
    stats.mkdir()
    result: dict = {"rows": ctx.store.n, "executor": ctx.executor.name}
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    table = task_statistics(ctx)
    (stats / layout.TASKS).write_parquet(table)
    result["tasks"] = table.num_rows
    timings["tasks"] = round(time.monotonic() - t0, 3)
    del table
    release_free_memory()
    for name in fitted_methods(cfg.select.methods, cfg.tive.enabled):
        t0 = time.monotonic()
        result[name] = get_method(name).fit(ctx)
        timings[name] = round(time.monotonic() - t0, 3)
        release_free_memory()
    result["step_seconds"] = timings
    result["seconds"] = round(time.monotonic() - started, 3)
    (stats / layout.WORK).delete()
    sections = {cls.config_section for cls in registry().values() if cls.config_section}
    (stats / layout.META).write_json({**result, "widths": ctx.store.widths,
                                      "config": cfg.model_dump(mode="json", include={*sections, "seed", "aggregate"})})
    return result
