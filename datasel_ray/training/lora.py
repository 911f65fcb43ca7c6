"""TIVE warm-up: the per-task warm-up sample and a seeded LoRA training loop (pure torch/peft, no Ray).

TIVE (arXiv 2403.09559, §3.2 "Reference Model Warm-up"; ``RUCAIBox/TIVE`` ``select_warm_up_data.py`` +
``finetune_lora.sh``) trains a LoRA reference model on ``0.08·N/#tasks`` samples of every task, 1 epoch, with the
loss on answer tokens only. LESS (``princeton-nlp/LESS``) does the same on a random 5% and keeps the AdamW
moments for its ``adam`` gradient features (§4 of METHODS.md).

Deviations from the reference code, all deliberate:

- the warm-up sample is drawn with a seed (the reference calls ``random.sample`` without one);
- the optimizer state is saved keyed by parameter *name* (``{"state": {name: {"exp_avg", "exp_avg_sq",
  "step"}}}``), which is what LESS issues #4/#10/#44 show users need (index-keyed state cannot be mapped
  without the training script's parameter order);
- the learning-rate schedule is a choice: constant (the ``cpu`` warm-up preset) or linear warm-up + cosine decay
  to 0 over the optimizer steps (TIVE LLaVA's, the ``reference`` preset); gradient accumulation reaches the
  reference's effective batch (128) on small machines (:data:`datasel_ray.config.WARMUP_PRESETS`).

The Ray Train wrapper (:mod:`datasel_ray.pipeline.train_adapter`) calls these functions on every worker.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from datasel_ray.config import LoraConfig
from datasel_ray.models.vlm import PreparedSample
from datasel_ray.training.loop import LrSchedule, TrainLog, TrainPlan, adamw, epoch_order, train

ADAPTER_DIR = "adapter"
OPTIMIZER_FILE = "optimizer.pt"
WARMUP_IDS_FILE = "warmup_ids.npy"
TRAINING_LOG_FILE = "training_log.json"


# -- warm-up sample ----------------------------------------------------------------------------------------
def warmup_counts(task_sizes: dict[str, int], fraction: float) -> dict[str, int]:
    """Rows drawn per task: ``round(fraction · N / #tasks)``, at least 1, capped at the task size.

    TIVE ``select_warm_up_data.py``: the same count for every task, whatever its size (equal split, not
    proportional). N counts every task's rows.
    """
    if not task_sizes:
        return {}
    per_task = max(1, int(round(fraction * sum(task_sizes.values()) / len(task_sizes))))
    return {task: min(per_task, size) for task, size in sorted(task_sizes.items())}


def select_warmup_rows(row_ids: np.ndarray, tasks: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The warm-up sample: int64 row ids (sorted) drawn without replacement, equally across tasks.

    row_ids int64 [N]; tasks str/object [N]. Each task draws with its own generator seeded from
    ``(seed, task name)``, so a task's draw does not depend on the other tasks or on the row order.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    tasks = np.asarray(tasks).astype(str)
    if row_ids.shape != tasks.shape:
        raise ValueError(f"row_ids and tasks differ in shape: {row_ids.shape} vs {tasks.shape}")
    names, sizes = np.unique(tasks, return_counts=True)
    counts = warmup_counts(dict(zip(names.tolist(), sizes.tolist())), fraction)
    chosen = []
    for task, count in counts.items():
        members = np.sort(row_ids[tasks == task])
        gen = np.random.default_rng([int(seed), *task.encode("utf-8")])
        chosen.append(gen.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


# -- model -------------------------------------------------------------------------------------------------
PROJECTOR_MODULE = "multi_modal_projector"


def attach_lora(model: torch.nn.Module, lora: LoraConfig, seed: int, train_projector: bool = False) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA adapter (``lora`` r/alpha/dropout/target regex); A is seeded.

    Only LoRA parameters are trainable afterwards (peft freezes the base model), plus, with ``train_projector``,
    a trained copy of the multimodal projector saved with the adapter (peft ``modules_to_save``; TIVE's
    LLaVA LoRA recipe trains the projector too). The default target regex restricts LoRA to the language model
    (PITFALLS: a bare ``["q_proj", "v_proj"]`` also hits the CLIP tower).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, bias="none",
                            modules_to_save=[PROJECTOR_MODULE] if train_projector else None)
    peft_model = get_peft_model(model, config)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"tive.lora.target_modules {lora.target_modules!r} matches no module of the model")
    return peft_model


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters`` order (the optimizer's order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


# -- data order --------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[np.ndarray]:
    """This rank's batches (index arrays into the ``n`` samples) for ``epoch``; seeded shuffle.

    The permutation depends on ``(seed, epoch)`` only. For ``world_size > 1`` it is padded by wrapping around to
    a multiple of ``world_size`` (as ``DistributedSampler``) and rank r takes every world_size-th index, so each
    rank runs the same number of steps (a DDP requirement); ``batch_size`` is per rank.
    """
    if n < 1:
        raise ValueError("no training samples")
    order = epoch_order(n, epoch, seed)
    padded = math.ceil(n / world_size) * world_size
    order = np.concatenate([order, order[: padded - n]])[rank::world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# -- training ----------------------------------------------------------------------------------------------
def train_lora(
    model: torch.nn.Module,
    samples: Sequence[PreparedSample],
    pad_token_id: int,
    *,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    forward_model: torch.nn.Module | None = None,
    rank: int = 0,
    world_size: int = 1,
    on_step: Callable[[int, int, float, int], None] | None = None,
    on_epoch: Callable[[int, TrainLog, torch.optim.Optimizer], None] | None = None,
    schedule: str = "constant",
    warmup_ratio: float = 0.0,
    accumulation_steps: int = 1,
) -> tuple[torch.optim.Optimizer, TrainLog]:
    """AdamW on the trainable (LoRA) parameters of ``model``, loss on answer tokens only.

    Args:
        model: the peft model (its trainable parameters are optimised).
        samples: prepared samples (the warm-up sample, rows that failed preprocessing already dropped).
        pad_token_id: padding id for :func:`~datasel_ray.models.vlm.collate`.
        learning_rate / epochs / batch_size: ``tive.learning_rate`` / ``tive.epochs`` / ``tive.warmup_batch_size``
            (batch size per rank).
        seed: data-order seed (:func:`epoch_batches`); the LoRA init is seeded by :func:`attach_lora`.
        forward_model: the module to call (e.g. a DDP wrapper of ``model``); default ``model``.
        on_step: ``(epoch, step, loss, samples_in_step)`` after each optimizer step.
        on_epoch: ``(epoch, log, optimizer)`` after each epoch (checkpointing / reporting).
        schedule / warmup_ratio: ``constant``, or ``cosine``: the lr rises linearly over the first
            ``ceil(warmup_ratio * total optimizer steps)`` steps, then decays by a cosine to 0 at the last step
            (:func:`lr_factor`).
        accumulation_steps: batches whose mean loss makes one optimizer step (the last group of an epoch may
            be shorter); the effective batch is ``batch_size * world_size * accumulation_steps``.

    A batch without answer tokens (possible only after truncation) is skipped. ``step_loss`` holds one value
    per optimizer step (the mean over its batches). Returns the optimizer (its state holds the AdamW moments)
    and the losses.
    """
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"Unknown lr schedule {schedule!r}. Choose from: constant, cosine.")
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, learning_rate)
    plan = TrainPlan(tuple(
        tuple(tuple(batches[lo:lo + accumulation_steps]) for lo in range(0, len(batches), accumulation_steps))
        for batches in (epoch_batches(len(samples), batch_size, epoch, seed, rank, world_size)
                        for epoch in range(epochs))))
    warmup_steps = math.ceil(warmup_ratio * plan.total_steps) if schedule == "cosine" else 0
    lr_schedule = LrSchedule(schedule, plan.total_steps, warmup_steps, progress="after_step")
    log = TrainLog()
    train(model, samples, pad_token_id, plan, optimizer, lr_schedule, learning_rate, device=device,
          forward_model=forward_model, ranks_in_step=world_size > 1, log=log,
          on_step=None if on_step is None else lambda epoch, _step, loss, seen: on_step(epoch, log.steps, loss, seen),
          on_epoch=None if on_epoch is None else lambda epoch, log: on_epoch(epoch, log, optimizer))
    return optimizer, log


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the warm-up's lr at optimizer step ``step`` (0-based) under the cosine schedule:
    ``(step + 1) / warmup_steps`` during warm-up, then ``0.5 * (1 + cos(pi * progress))`` with progress 0 at the
    first step after warm-up and 1 at the last (:class:`~datasel_ray.training.loop.LrSchedule`, ``after_step``)."""
    return LrSchedule("cosine", total_steps, warmup_steps, progress="after_step").lr(1.0, step)


# -- saving ------------------------------------------------------------------------------------------------
def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict:
    """AdamW state keyed by parameter name: ``{"state": {name: {exp_avg, exp_avg_sq, step}}, "param_groups",
    "param_names"}`` (fp32 CPU tensors).

    ``names[i]`` is the name of the optimizer's i-th parameter over all groups in order (:func:`trainable_names`).
    This is the form :meth:`datasel_ray.features.gradients.AdamState.from_named` reads.
    """
    state_dict = optimizer.state_dict()
    if sum(len(g["params"]) for g in state_dict["param_groups"]) != len(names):
        raise ValueError(f"optimizer has {sum(len(g['params']) for g in state_dict['param_groups'])} parameters, "
                         f"got {len(names)} names")
    state = {}
    for index, entry in state_dict["state"].items():
        state[names[int(index)]] = {k: (v.detach().float().cpu().clone() if torch.is_tensor(v) else v)
                                    for k, v in entry.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]]
    return {"state": state, "param_groups": groups, "param_names": list(names)}


def save_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: Sequence[str],
                    out_dir: str | Path, log: dict) -> None:
    """Write ``adapter/`` (peft ``save_pretrained``), ``optimizer.pt`` (name-keyed) and ``training_log.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out / ADAPTER_DIR))
    torch.save(optimizer_state_by_name(optimizer, names), out / OPTIMIZER_FILE)
    (out / TRAINING_LOG_FILE).write_text(json.dumps(log, indent=2, sort_keys=True) + "\n")


def load_optimizer_state(path: str | Path) -> dict:
    """Read ``optimizer.pt`` written by :func:`save_checkpoint` (CPU tensors)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def files_sha256(files: Sequence[tuple[str, bytes]]) -> str:
    """sha256 over ``(relative path, bytes)`` pairs, in path order (a directory checksum)."""
    digest = hashlib.sha256()
    for rel, data in sorted(files):
        digest.update(rel.encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()
