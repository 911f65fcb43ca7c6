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
- no learning-rate schedule (LESS uses linear decay with 3% warm-up; TIVE LLaVA's cosine): a constant AdamW lr.

The Ray Train wrapper (:mod:`datasel_ray.pipeline.train_adapter`) calls these functions on every worker.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasel_ray.config import LoraConfig
from datasel_ray.models.vlm import PreparedSample, collate

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
def attach_lora(model: torch.nn.Module, lora: LoraConfig, seed: int) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA adapter (``lora`` r/alpha/dropout/target regex); A is seeded.

    Only LoRA parameters are trainable afterwards (peft freezes the base model). The default target regex
    restricts LoRA to the language model (PITFALLS: a bare ``["q_proj", "v_proj"]`` also hits the CLIP tower).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, bias="none")
    peft_model = get_peft_model(model, config)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"tive.lora.target_modules {lora.target_modules!r} matches no module of the model")
    return peft_model


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters, in ``named_parameters`` order (the optimizer's order)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def batch_answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over every answer token of the batch (HF causal-LM convention), fp32.

    logits [B, T, V]; labels int64 [B, T] (-100 outside answer tokens, unshifted). The batch must hold at
    least one answer token.
    """
    target = labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100)


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
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    padded = math.ceil(n / world_size) * world_size
    order = np.concatenate([order, order[: padded - n]])[rank::world_size]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# -- training ----------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    """Per-step and per-epoch losses of one training run (rank-local values)."""

    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    samples_seen: int = 0

    @property
    def steps(self) -> int:
        return len(self.step_loss)


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

    A batch without answer tokens (possible only after truncation) is skipped. Returns the optimizer (its
    state holds the AdamW moments) and the losses.
    """
    forward = forward_model if forward_model is not None else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    dtype = next(model.parameters()).dtype
    log = TrainLog()
    forward.train()
    for epoch in range(epochs):
        losses = []
        for indices in epoch_batches(len(samples), batch_size, epoch, seed, rank, world_size):
            batch = collate([samples[int(i)] for i in indices], pad_token_id)
            labels = batch.labels.to(device)
            if not bool((labels[:, 1:] != -100).any()) and world_size == 1:
                continue
            out = forward(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          **batch.image_kwargs(device, dtype), use_cache=False)
            loss = batch_answer_loss(out.logits, labels)
            if not torch.isfinite(loss):  # no answer token on this rank; keep DDP in step with a zero gradient
                loss = out.logits.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            losses.append(value)
            log.step_loss.append(value)
            log.samples_seen += len(indices)
            if on_step is not None:
                on_step(epoch, log.steps, value, len(indices))
        log.epoch_loss.append(float(np.mean(losses)) if losses else math.nan)
        if on_epoch is not None:
            on_epoch(epoch, log, optimizer)
    forward.eval()
    return optimizer, log


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
