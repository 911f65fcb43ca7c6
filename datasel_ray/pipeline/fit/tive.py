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

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.methods import tive
from datasel_ray.methods.registry import SelectionMethod
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection, Partition
from datasel_ray.pipeline.fit.state import MemberCache, read_columns
from datasel_ray.pipeline.store import read_shard
from datasel_ray.seeds import derive_seed

NAME = "tive"
SUM_GROUP_SHARDS = 32


class Tive(SelectionMethod):
    """TIVE (Liu et al., 2024): task value from gradient norms, instance value from projected LoRA gradients.
    Files: ``stats/tive/`` (:data:`~datasel_ray.io.layout.TASKS`, task-mean gradients, rows); column and
    summary names below."""

    name = NAME
    description = "TIVE: task value from gradient norms, instance value from projected LoRA gradients."
    columns = (schema.GRAD_PROJ, schema.GRAD_NORM)
    needs_tive = True
    fits = True
    scored = True
    config_section = "tive"
    fit_fields = ("enabled", "task_value")  # the rest of the section decides the warm-up and extract phases

    # columns of stats/tive/tasks.parquet (besides the task and layout.SIZE)
    TASK_VALUE = "task_value"
    MEAN_GRADIENT_NORM = "mean_gradient_norm"
    # column of stats/tive/rows.parquet and scores.parquet
    INSTANCE_VALUE = "instance_value"
    # scores.parquet column (besides TASK_VALUE and INSTANCE_VALUE)
    INCLUSION_PROBABILITY = "inclusion_probability"
    # summary.json keys the online state reads
    TASK_DRAW_THRESHOLD = "task_draw_threshold"
    TASK_DRAW_ALL = "task_draw_all"
    TASK_SELECTED_FRACTION = "task_selected_fraction"
    TEMPERATURE = "temperature"
    SAMPLING = "sampling"

    def fit(self, ctx: FitContext) -> dict:
        return fit(ctx)

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        return select(ctx, budget)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> TiveState:
        return TiveState.load(run_dir, cfg, summary, cache)


@dataclass(frozen=True, eq=False)
class TaskSumsTask:
    """Per-task sums of the row-normalised ``grad_proj`` (float64 [n_tasks, width]) over the shard files
    ``files`` (a fixed group of shards), summed in shard order; ``codes``: each shard's rows' task codes."""

    files: tuple[str, ...]
    codes: tuple[np.ndarray, ...]
    n_tasks: int
    width: int


@dataclass(frozen=True, eq=False)
class InstanceValuesTask:
    """Instance values of ``part``'s rows against the task means in ``means`` (float64 [T, k] ``.npy``);
    ``codes``: each shard's rows' task codes."""

    part: Partition
    codes: tuple[np.ndarray, ...]
    means: str


def _task_sums(task: TaskSumsTask) -> dict[str, np.ndarray]:
    total = np.zeros((task.n_tasks, task.width))
    for path, codes in zip(task.files, task.codes):
        g = read_shard(path, [schema.GRAD_PROJ])[schema.GRAD_PROJ]
        total += tive.normalised_task_sums(g, codes, task.n_tasks)
    return {"sums": total}


def _instance_values(task: InstanceValuesTask) -> dict[str, np.ndarray]:
    means = Location.parse(task.means).read_npy()
    pos_out, val_out = [], []
    for (path, pos), codes in zip(task.part.shards(), task.codes):
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
    tasks = [TaskSumsTask(files=tuple(store.files[s] for s in g),
                          codes=tuple(store.task_codes[store.shard_pos[s]] for s in g), n_tasks=T, width=k)
             for g in groups]
    total = np.zeros((T, k))
    # stored: each T x k partial is read from its file when it is added (not all held at once)
    for r in ctx.map("tive:task-sums", _task_sums, tasks, [f"{i:05d}" for i in range(len(groups))], stored=True):
        total += r["sums"]
    means = total / np.maximum(sizes, 1)[:, None]
    (stats / layout.TASK_MEAN_GRAD).write_npy(means.astype(np.float32))
    ctx.work(NAME).mkdir()
    means_path = ctx.work(NAME) / layout.WORK_TASK_MEANS
    means_path.write_npy(means)
    parts = ctx.partitions([schema.GRAD_PROJ])
    tasks = [InstanceValuesTask(part=p, codes=tuple(store.task_codes[pos] for pos in p.pos), means=str(means_path))
             for p in parts]
    inst = np.empty(store.n, dtype=np.float32)
    for r in ctx.map("tive:instance-values", _instance_values, tasks, [p.key for p in parts], stored=True):
        inst[r["pos"]] = r["value"]
    (stats / layout.TASKS).write_parquet(pa.table({
        schema.TASK: pa.array(store.task_names.astype(str)), layout.SIZE: sizes, Tive.TASK_VALUE: values,
        Tive.MEAN_GRADIENT_NORM: np.linalg.norm(means, axis=1)}))
    (stats / layout.ROWS).write_parquet(pa.table({schema.ROW_ID: pa.array(store.row_ids, pa.int64()),
                                                  Tive.INSTANCE_VALUE: inst}))
    return {"tasks": int(T), "proj_dim": int(k), "task_value_mode": cfg.task_value}


def select(ctx: FitContext, budget: int) -> MethodSelection:
    cfg = ctx.cfg.tive
    stats = layout.method_stats(ctx.run_dir, NAME)
    if not (stats / layout.ROWS).exists():
        raise RuntimeError(f"{stats / layout.ROWS} is missing: run the aggregate phase with tive.enabled=true")
    rows = (stats / layout.ROWS).read_parquet()
    if not np.array_equal(column_to_numpy(rows.column(schema.ROW_ID)), ctx.store.row_ids):
        raise RuntimeError(f"{stats / layout.ROWS} does not cover the rows of features/: re-run aggregate")
    inst = column_to_numpy(rows.column(Tive.INSTANCE_VALUE))
    tasks = (stats / layout.TASKS).read_parquet()
    values = column_to_numpy(tasks.column(Tive.TASK_VALUE))
    sizes = column_to_numpy(tasks.column(layout.SIZE))
    codes = ctx.store.task_codes
    budgets = tive.task_budgets(values, sizes, budget, overflow=cfg.overflow)
    seed = derive_seed(ctx.cfg.seed, "tive", "sampling")
    selected = tive.draw(inst, codes, budgets, cfg, seed)
    prob, thresholds = tive.draw_inclusion(inst, codes, budgets, cfg.temperature, cfg.sampling)
    names = ctx.store.task_names.astype(str).tolist()
    kappa = dict(zip(names, thresholds.tolist()))
    value = inst.astype(np.float64)  # one array behind both columns
    columns = {Tive.INSTANCE_VALUE: value, Tive.TASK_VALUE: values[codes], Tive.INCLUSION_PROBABILITY: prob,
               layout.SCORE: value}
    summary = {"task_value_mode": cfg.task_value, "overflow": cfg.overflow, Tive.SAMPLING: cfg.sampling,
               Tive.TEMPERATURE: float(cfg.temperature), "sampling_seed": int(seed),
               "task_budget": dict(zip(names, budgets.tolist())),
               Tive.TASK_VALUE: dict(zip(names, values.tolist())),
               Tive.TASK_SELECTED_FRACTION: {n: int(b) / max(int(s), 1) for n, b, s in zip(names, budgets, sizes)},
               Tive.TASK_DRAW_THRESHOLD: {n: (None if not np.isfinite(v) else float(v)) for n, v in kappa.items()},
               Tive.TASK_DRAW_ALL: [n for n, v in kappa.items() if v == float("-inf")]}
    return MethodSelection(selected=selected, columns=columns, summary=summary)


# ------------------------------------------------------------------------------------------- online state
@dataclass
class TiveState:
    """TIVE's frozen state: task values, task-mean normalised gradients and the run's per-task draw thresholds.

    Selection is a seeded draw, so the answer is the inclusion probability under the run's draw
    (:func:`~datasel_ray.methods.tive.inclusion_probability`), not a boolean.
    """

    task_index: dict[str, int]
    task_value: np.ndarray  # float64 [T]
    mean_grad: np.ndarray  # float32 [T, k]
    kappa: dict[str, float | None]
    draw_all: set[str]
    selected_fraction: dict[str, float]
    temperature: float
    sampling: str

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> TiveState:
        stats = layout.method_stats(run_dir, NAME)
        table = read_columns(stats / layout.TASKS)
        names = table[schema.TASK].astype(str).tolist()
        return cls(task_index={t: i for i, t in enumerate(names)},
                   task_value=table[Tive.TASK_VALUE].astype(np.float64),
                   mean_grad=(stats / layout.TASK_MEAN_GRAD).read_npy(),
                   kappa=dict(summary.get(Tive.TASK_DRAW_THRESHOLD, {})),
                   draw_all=set(summary.get(Tive.TASK_DRAW_ALL, [])),
                   selected_fraction=dict(summary.get(Tive.TASK_SELECTED_FRACTION, {})),
                   temperature=float(summary.get(Tive.TEMPERATURE, cfg.tive.temperature)),
                   sampling=str(summary.get(Tive.SAMPLING, cfg.tive.sampling)))

    def score_new(self, features: dict[str, Any], sample: Any) -> dict:
        """TIVE fields of one sample from its ``grad_proj`` (float[k]) and ``task``: instance value (Eq. 3),
        task value (Eq. 4), inclusion probability."""
        task = sample.task
        t = self.task_index[task]
        grad_proj = np.asarray(features[schema.GRAD_PROJ])
        value = float(tive.instance_values_against(grad_proj[None], np.array([t]), self.mean_grad)[0])
        k = self.kappa.get(task)
        kappa = float("-inf") if task in self.draw_all else (float("inf") if k is None else float(k))
        prob = float(tive.inclusion_probability(np.array([value]), kappa, self.temperature, self.sampling)[0])
        return {"instance_value": value, "task_value": float(self.task_value[t]), "inclusion_probability": prob,
                "task_selected_fraction": self.selected_fraction.get(task)}
