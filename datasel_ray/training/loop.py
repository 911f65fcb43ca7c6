"""The one training loop: seeded data order, learning-rate schedule, AdamW and the answer-token loss (pure torch).

Used by the TIVE warm-up (:func:`datasel_ray.training.lora.train_lora`, LoRA parameters, epochs, gradient
accumulation, DDP ranks) and by full fine-tuning (:func:`datasel_ray.training.finetune.finetune`: the built
models' pretraining and the quality benchmark; a fixed number of steps). Both describe their run as a
:class:`TrainPlan` and an :class:`LrSchedule`, build the optimizer with :func:`adamw` and call :func:`train`.

The loss is :func:`~datasel_ray.models.answer_loss.answer_cross_entropy` (``"batch"``: the mean over every
answer token of a batch). An optimizer step is a group of batches whose mean loss is backpropagated (one batch
without accumulation); a batch without an answer token (possible only after truncation) is left out of its
step, and a step left with no batch makes no update and no log entry (it still counts in the schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from datasel_ray.models.answer_loss import IGNORE_INDEX, answer_cross_entropy
from datasel_ray.models.vlm import PreparedSample, collate

ScheduleKind = Literal["constant", "cosine", "linear"]
SCHEDULE_KINDS = ("constant", "cosine", "linear")


# -- data order --------------------------------------------------------------------------------------------
def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """Seeded permutation of ``n`` sample indices for ``epoch`` (depends on ``(seed, epoch)`` only)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


@dataclass(frozen=True)
class TrainPlan:
    """The batches of a run: ``epochs[e][s]`` is optimizer step ``s`` of epoch ``e``, a list of index arrays
    into the samples (one per accumulated batch). Steps are numbered across epochs for the schedule."""

    epochs: tuple[tuple[tuple[np.ndarray, ...], ...], ...]

    @property
    def total_steps(self) -> int:
        return sum(len(steps) for steps in self.epochs)


# -- schedule ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LrSchedule:
    """Learning rate of optimizer step ``step`` (0-based): a linear warm-up over ``warmup_steps`` steps to the
    base lr, then ``kind`` (constant; cosine or linear decay to ``min_lr_ratio`` · lr at ``total_steps``).

    ``progress`` says where the decay is read, and is kept per caller so that each one's runs stay bit for bit:
    ``"at_step"`` (fine-tuning, HF ``get_cosine_schedule_with_warmup`` as the Trainer applies it: progress 0 at
    the first step after warm-up, never quite reaching the end) or ``"after_step"`` (the warm-up: the schedule
    evaluated one step later, progress 1, so lr ``min_lr_ratio`` · lr, at the last step).
    """

    kind: ScheduleKind
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    progress: Literal["at_step", "after_step"] = "at_step"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"Unknown lr schedule {self.kind!r}. Choose from: {', '.join(SCHEDULE_KINDS)}.")
        if self.progress not in ("at_step", "after_step"):
            raise ValueError(f"Unknown schedule progress {self.progress!r}. Choose from: after_step, at_step.")

    def lr(self, base_lr: float, step: int) -> float:
        after = self.progress == "after_step"
        if self.warmup_steps and step < self.warmup_steps:
            return base_lr * ((step + 1) / self.warmup_steps) if after else base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return base_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps + int(after)) / span)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * factor)


# -- optimizer ---------------------------------------------------------------------------------------------
def adamw(params: Sequence[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 0.01, decay_vectors: bool = True) -> torch.optim.AdamW:
    """AdamW on ``params``; with ``decay_vectors=False`` parameters of fewer than 2 dims (biases, norms) get no
    weight decay (a second parameter group). One group otherwise, in ``params`` order."""
    params = list(params)
    if not params:
        raise ValueError("the model has no trainable parameter")
    if decay_vectors:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# -- the loop ----------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    """Per optimizer step: loss (mean answer-token CE over its batches), lr and gradient norm (before
    clipping); per epoch: the mean step loss. Rank-local values."""

    step_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    samples_seen: int = 0

    @property
    def steps(self) -> int:
        return len(self.step_loss)


def train(
    model: torch.nn.Module,
    samples: Sequence[PreparedSample],
    pad_token_id: int,
    plan: TrainPlan,
    optimizer: torch.optim.Optimizer,
    schedule: LrSchedule,
    base_lr: float,
    *,
    device: torch.device | str,
    forward_model: torch.nn.Module | None = None,
    max_grad_norm: float | None = None,
    ranks_in_step: bool = False,
    log: TrainLog | None = None,
    on_step: Callable[[int, int, float, int], None] | None = None,
    on_epoch: Callable[[int, TrainLog], None] | None = None,
) -> TrainLog:
    """Run ``plan``: for each step, the mean answer-token loss of its batches is backpropagated, gradients are
    clipped to ``max_grad_norm`` (None: measured only), the lr is ``schedule.lr(base_lr, step)`` and the
    ``optimizer`` steps. ``model`` holds the trainable parameters; ``forward_model`` (default ``model``, e.g. a
    DDP wrapper) is called. ``ranks_in_step``: every rank must run every batch (DDP), so a batch without an
    answer token is run with a zero loss instead of being left out. The model is left in eval mode; the
    gradients of the last step stay on the parameters.

    ``on_step(epoch, step, loss, samples_in_step)`` after each optimizer step (``step`` 0-based in the plan);
    ``on_epoch(epoch, log)`` after each epoch. Returns ``log`` (a new :class:`TrainLog` by default) filled in.
    """
    forward = forward_model if forward_model is not None else model
    params = [p for p in model.parameters() if p.requires_grad]  # model order: the gradient norm sums in it
    dtype = next(model.parameters()).dtype
    log = log if log is not None else TrainLog()
    step = -1
    forward.train()
    for epoch, steps in enumerate(plan.epochs):
        losses = []
        for group in steps:
            step += 1
            optimizer.zero_grad(set_to_none=True)
            values, seen = [], 0
            for indices in group:
                batch = collate([samples[int(i)] for i in indices], pad_token_id)
                labels = batch.labels.to(device)
                if not ranks_in_step and not bool((labels[:, 1:] != IGNORE_INDEX).any()):
                    continue
                out = forward(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                              **batch.image_kwargs(device, dtype), use_cache=False)
                loss = answer_cross_entropy(out.logits, labels, "batch")
                if not torch.isfinite(loss):  # no answer token on this rank; keep DDP in step with a zero gradient
                    loss = out.logits.sum() * 0.0
                (loss / len(group)).backward()
                values.append(float(loss.detach()))
                seen += len(indices)
            if not values:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
            lr = schedule.lr(base_lr, step)
            for group_params in optimizer.param_groups:
                group_params["lr"] = lr
            optimizer.step()
            value = float(np.mean(values))
            losses.append(value)
            log.step_loss.append(value)
            log.lr.append(lr)
            log.grad_norm.append(float(norm))
            log.samples_seen += seen
            if on_step is not None:
                on_step(epoch, step, value, seen)
        log.epoch_loss.append(float(np.mean(losses)) if losses else math.nan)
        if on_epoch is not None:
            on_epoch(epoch, log)
    forward.eval()
    return log
