"""Baselines (random, random per task, answer-loss ranking): per-row scalars only, on the driver; no statistics
to fit and no online state."""

from __future__ import annotations

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.methods import baselines
from datasel_ray.methods.registry import SelectionMethod
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection
from datasel_ray.seeds import derive_seed

__all__ = ["AnswerLoss", "RandomGlobal", "RandomPerTask"]


def _selection(result: baselines.BaselineResult) -> MethodSelection:
    return MethodSelection(selected=result.selected, columns={layout.SCORE: result.score})


class RandomGlobal(SelectionMethod):
    name = "random"
    description = "Uniform random subset."

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        return _selection(baselines.random_global(ctx.store.n, budget, derive_seed(ctx.cfg.seed, "select",
                                                                                   self.name)))


class RandomPerTask(SelectionMethod):
    name = "random_per_task"
    description = "Random subset keeping the pool's task mix."

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        return _selection(baselines.random_per_task(ctx.store.task_codes, budget,
                                                    derive_seed(ctx.cfg.seed, "select", self.name)))


class AnswerLoss(SelectionMethod):
    name = "answer_loss"
    description = "Rank by mean answer-token loss of the reference model (highest first)."
    columns = (schema.ANSWER_LOSS,)

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        loss = ctx.scalars([schema.ANSWER_LOSS])[schema.ANSWER_LOSS]
        return _selection(baselines.answer_loss_ranking(loss, budget))
