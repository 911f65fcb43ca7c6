"""Baselines (random, random per task, answer-loss ranking): per-row scalars only, on the driver."""

from __future__ import annotations


from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.methods import baselines
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection
from datasel_ray.seeds import derive_seed


def fit(ctx: FitContext) -> dict:
    """Baselines have no budget-independent statistics."""
    return {}


def select_baseline(ctx: FitContext, method: str, budget: int) -> MethodSelection:
    seed = derive_seed(ctx.cfg.seed, "select", method)
    if method == "random":
        res = baselines.random_global(ctx.store.n, budget, seed)
    elif method == "random_per_task":
        res = baselines.random_per_task(ctx.store.task_codes, budget, seed)
    elif method == "answer_loss":
        res = baselines.answer_loss_ranking(ctx.scalars([schema.ANSWER_LOSS])[schema.ANSWER_LOSS], budget)
    else:
        raise ValueError(f"{method!r} is not a baseline")
    return MethodSelection(selected=res.selected, columns={layout.SCORE: res.score})
