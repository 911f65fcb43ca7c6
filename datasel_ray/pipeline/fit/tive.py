"""TIVE over partitions: no process holds the ``grad_proj`` column.

Where each step runs:

1. *driver*: gradient norms (scalars) → task values v_t (Eq. 4);
2. *shard-group tasks*: per-task sums of the row-normalised projected gradients (mergeable partials; groups of a
   fixed :data:`SUM_GROUP_SHARDS` shards, summed in shard order, so the task means do not depend on partitioning);
   *driver*: merge in group order, one partial file at a time → task-mean gradients (Eq. 3);
3. *partition tasks* (hold only the T task means): instance values ``I_i = ĝ_i · mean_t`` (Eq. 3);
4. select — *driver*: task budgets ∝ v_t, the seeded within-task draw (Sec. 3.3) and each row's inclusion
   probability under that draw (:func:`~datasel_ray.methods.tive.inclusion_probability`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.io.storage import Location
from datasel_ray.methods import tive
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "tive"
SUM_GROUP_SHARDS = 32


def _task_sums(item: dict) -> dict[str, np.ndarray]:
    total = np.zeros((item["n_tasks"], item["width"]))
    for path, codes in zip(item["files"], item["codes"]):
        g = read_shard(path, [schema.GRAD_PROJ])[schema.GRAD_PROJ]
        total += tive.normalised_task_sums(g, codes, item["n_tasks"])
    return {"sums": total}


def _instance_values(item: dict) -> dict[str, np.ndarray]:
    means = Location.parse(item["means"]).read_npy()
    pos_out, val_out = [], []
    for path, pos, codes in zip(item["files"], item["pos"], item["codes"]):
        g = read_shard(path, [schema.GRAD_PROJ])[schema.GRAD_PROJ]
        val_out.append(tive.instance_values_against(g, codes, means))
        pos_out.append(pos)
    return {"pos": np.concatenate(pos_out), "value": np.concatenate(val_out)}


def fit(ctx: FitContext) -> dict:
    cfg = ctx.cfg.tive
    store = ctx.store
    store.require([schema.GRAD_PROJ, schema.GRAD_NORM])
    k = store.widths[schema.GRAD_PROJ]
    T = len(store.task_names)
    stats = ctx.stats(NAME)
    norms = ctx.scalars([schema.GRAD_NORM])[schema.GRAD_NORM]
    if not np.all(np.isfinite(norms)):
        raise ValueError("tive: grad_norm has NaN/inf values in features/: re-extract the gradients")
    values = tive.task_values(norms, store.task_codes, mode=cfg.task_value)
    sizes = np.bincount(store.task_codes, minlength=T).astype(np.int64)
    groups = [list(range(s, min(s + SUM_GROUP_SHARDS, len(store.files))))
              for s in range(0, len(store.files), SUM_GROUP_SHARDS)]
    items = [{"files": [store.files[s] for s in g], "codes": [store.task_codes[store.shard_pos[s]] for s in g],
              "n_tasks": T, "width": k} for g in groups]
    total = np.zeros((T, k))
    # stored: each T x k partial is read from its file when it is added (not all held at once)
    for r in ctx.map("tive:task-sums", _task_sums, items, [f"{i:05d}" for i in range(len(groups))], stored=True):
        total += r["sums"]
    means = total / np.maximum(sizes, 1)[:, None]
    (stats / layout.TASK_MEAN_GRAD).write_npy(means.astype(np.float32))
    ctx.work(NAME).mkdir()
    means_path = ctx.work(NAME) / "means.npy"
    means_path.write_npy(means)
    parts = store.partitions([schema.GRAD_PROJ], ctx.partition_bytes)
    items = [{"files": [store.files[s] for s in p.shards], "pos": [store.shard_pos[s] for s in p.shards],
              "codes": [store.task_codes[store.shard_pos[s]] for s in p.shards], "means": str(means_path)}
             for p in parts]
    inst = np.empty(store.n, dtype=np.float32)
    for r in ctx.map("tive:instance-values", _instance_values, items, [p.key for p in parts], stored=True):
        inst[r["pos"]] = r["value"]
    (stats / layout.TASKS).write_parquet(pa.table({
        schema.TASK: pa.array(store.task_names.astype(str)), layout.SIZE: sizes, "task_value": values,
        "mean_gradient_norm": np.linalg.norm(means, axis=1)}))
    (stats / layout.ROWS).write_parquet(pa.table({schema.ROW_ID: pa.array(store.row_ids, pa.int64()),
                                                  "instance_value": inst}))
    return {"tasks": int(T), "proj_dim": int(k), "task_value_mode": cfg.task_value}


def select(ctx: FitContext, budget: int) -> MethodSelection:
    cfg = ctx.cfg.tive
    stats = layout.method_stats(ctx.run_dir, NAME)
    if not (stats / layout.ROWS).exists():
        raise RuntimeError(f"{stats / layout.ROWS} is missing: run the aggregate phase with tive.enabled=true")
    rows = (stats / layout.ROWS).read_parquet()
    if not np.array_equal(column_to_numpy(rows.column(schema.ROW_ID)), ctx.store.row_ids):
        raise RuntimeError(f"{stats / layout.ROWS} does not cover the rows of features/: re-run aggregate")
    inst = column_to_numpy(rows.column("instance_value"))
    tasks = (stats / layout.TASKS).read_parquet()
    values = column_to_numpy(tasks.column("task_value"))
    sizes = column_to_numpy(tasks.column(layout.SIZE))
    codes = ctx.store.task_codes
    budgets = tive.task_budgets(values, sizes, budget, overflow=cfg.overflow)
    seed = derive_seed(ctx.cfg.seed, "tive", "sampling")
    selected = tive.draw(inst, codes, budgets, cfg, seed)
    prob = np.zeros(ctx.store.n)
    kappa = {}
    names = ctx.store.task_names.astype(str).tolist()
    for t, name in enumerate(names):
        members = np.flatnonzero(codes == t)
        repeats, rest = divmod(int(budgets[t]), len(members)) if len(members) else (0, 0)
        k_t = float("-inf") if repeats else tive.inclusion_threshold(inst[members], rest, cfg.temperature,
                                                                     cfg.sampling)
        prob[members] = tive.inclusion_probability(inst[members], k_t, cfg.temperature, cfg.sampling)
        kappa[name] = k_t
    value = inst.astype(np.float64)  # one array behind both columns
    columns = {"instance_value": value, "task_value": values[codes], "inclusion_probability": prob,
               layout.SCORE: value}
    summary = {"task_value_mode": cfg.task_value, "overflow": cfg.overflow, "sampling": cfg.sampling,
               "temperature": float(cfg.temperature), "sampling_seed": int(seed),
               "task_budget": dict(zip(names, budgets.tolist())),
               "task_value": dict(zip(names, values.tolist())),
               "task_selected_fraction": {n: int(b) / max(int(s), 1) for n, b, s in zip(names, budgets, sizes)},
               "task_draw_threshold": {n: (None if not np.isfinite(v) else float(v)) for n, v in kappa.items()},
               "task_draw_all": [n for n, v in kappa.items() if v == float("-inf")]}
    return MethodSelection(selected=selected, columns=columns, summary=summary)
