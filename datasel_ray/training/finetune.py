"""Full-parameter (or projector + LM) supervised fine-tuning of an HF image-text-to-text model, and evaluation.

Plain torch, no Ray. Used to pretrain the built reference models (:mod:`datasel_ray.training.recipes`) and by the
selection-quality benchmark (``benchmarks/quality.py``), which trains the same initialisation on each subset.

Samples are LLaVA-form dicts ``{"conversations": [...], "image": PIL.Image | None, "task": str (optional)}``;
they go through :meth:`VLMProcessor.prepare` (the model's own chat template, answer masks) and :func:`collate`.
The loss is the mean next-token cross-entropy over every answer token of a batch (HF causal-LM convention;
answer tokens include the end-of-turn token), as LLaVA SFT.

Determinism: the data order is a seeded permutation per epoch (``numpy`` generator seeded with
``(seed, epoch)``), ``torch.manual_seed(seed)`` runs before training, and
``torch.use_deterministic_algorithms(True, warn_only=True)`` is set for the duration of :func:`finetune`. On CPU,
with a fixed number of intra-op threads, two runs give bit-identical weights; pass ``num_threads=1`` for
results that do not depend on the machine's thread count.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from datasel_ray.models.answer_loss import IGNORE_INDEX, answer_cross_entropy
from datasel_ray.models.vlm import PreparedSample, VLMProcessor, collate
from datasel_ray.roles import ASSISTANT_ROLES
from datasel_ray.training.loop import LrSchedule, TrainLog, TrainPlan, adamw, epoch_order, train

Schedule = Literal["cosine", "linear", "constant"]
TrainWhat = Literal["all", "projector_lm", "lm", "projector"]


@dataclass
class FinetuneConfig:
    """Optimisation settings of :func:`finetune`.

    steps: optimiser steps (fixed, independent of the data size: epochs = steps * batch_size / n);
    warmup_steps: linear warm-up from 0 to ``lr``, then ``schedule`` decays to ``min_lr_ratio * lr`` at ``steps``;
    train: which parameters get gradients — ``all``; ``projector_lm`` (vision tower frozen, as LLaVA stage 2);
    ``lm``; ``projector`` (LLaVA stage 1);
    num_threads: torch intra-op threads during training (restored afterwards); None keeps the current setting.
    """

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    train: TrainWhat = "all"
    max_length: int | None = None
    num_threads: int | None = None

    def validate(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"Unknown schedule {self.schedule!r}. Choose from: constant, cosine, linear.")
        if self.train not in ("all", "projector_lm", "lm", "projector"):
            raise ValueError(f"Unknown train {self.train!r}. Choose from: all, lm, projector, projector_lm.")
        if not 0 <= self.warmup_steps <= max(self.steps, 0):
            raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")


@dataclass
class FinetuneLog(TrainLog):
    """The loop's :class:`~datasel_ray.training.loop.TrainLog` plus epochs run, wall seconds and the number of
    trainable parameters."""

    epochs: float = 0.0
    seconds: float = 0.0
    trainable_params: int = 0

    def as_dict(self) -> dict:
        return {"step_loss": self.step_loss, "lr": self.lr, "grad_norm": self.grad_norm,
                "samples_seen": self.samples_seen, "epochs": self.epochs, "seconds": self.seconds,
                "trainable_params": self.trainable_params}


def lr_schedule(cfg: FinetuneConfig) -> LrSchedule:
    """The :class:`~datasel_ray.training.loop.LrSchedule` of ``cfg`` (decay read at the step, HF convention)."""
    return LrSchedule(cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio, progress="at_step")


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine / linear / constant."""
    return lr_schedule(cfg).lr(cfg.lr, step)


def prepare_samples(processor: VLMProcessor, samples: Sequence[Any],
                    max_length: int | None = None) -> list[PreparedSample]:
    """Tokenise LLaVA-form sample dicts (or pass :class:`PreparedSample` through) with ``processor``.

    A sample that cannot be prepared (its image span does not fit the context) raises; callers filter first.
    """
    out = []
    for sample in samples:
        if isinstance(sample, PreparedSample):
            out.append(sample)
        else:
            out.append(processor.prepare(sample["conversations"], sample.get("image"), max_length))
    return out


def set_trainable(model: torch.nn.Module, train: TrainWhat) -> int:
    """Set ``requires_grad`` by ``train`` (see :class:`FinetuneConfig`); return the trainable parameter count.

    Parameter groups are found by name: ``vision_tower`` / ``multi_modal_projector`` / everything else (the LM).
    """
    total = 0
    for name, param in model.named_parameters():
        vision = "vision_tower" in name or "vision_model" in name
        projector = "multi_modal_projector" in name or "mm_projector" in name
        lm = not (vision or projector)
        on = {"all": True, "projector_lm": projector or lm, "lm": lm, "projector": projector}[train]
        param.requires_grad_(on)
        total += param.numel() if on else 0
    if total == 0:
        raise ValueError(f"train={train!r} leaves no trainable parameter in {type(model).__name__}")
    return total


def batch_indices(n: int, steps: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of indices; epochs are consecutive seeded permutations, batches may straddle them."""
    if n < 1:
        raise ValueError("no training samples")
    need = steps * batch_size
    chunks, epoch, have = [], 0, 0
    while have < need:
        chunks.append(epoch_order(n, epoch, seed))
        have += n
        epoch += 1
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


@contextmanager
def deterministic_torch(num_threads: int | None):
    """Deterministic algorithms (warn only) and optionally a fixed thread count; both restored on exit."""
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det, warn_only=previous_warn)
        if num_threads is not None:
            torch.set_num_threads(previous_threads)


def _model_inputs(batch, device, dtype) -> dict:
    return {"input_ids": batch.input_ids.to(device), "attention_mask": batch.attention_mask.to(device),
            **batch.image_kwargs(device, dtype)}


def finetune(
    model: torch.nn.Module,
    processor: VLMProcessor,
    samples: Sequence[Any],
    config: FinetuneConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneLog:
    """Train ``model`` in place for ``config.steps`` AdamW steps on ``samples``; loss on answer tokens only.

    ``samples``: LLaVA-form dicts (see module docstring) or :class:`PreparedSample` (preprocess once with
    :func:`prepare_samples` when training several models on the same data). Parameters outside
    ``config.train`` are frozen (``requires_grad=False``) and stay so after the call; the model is left in
    eval mode. A step whose batch has no answer token (only possible after truncation) makes no update and
    no log entry (:func:`~datasel_ray.training.loop.train`). ``on_step(step, loss)`` is called after each step.
    """
    config.validate()
    prepared = prepare_samples(processor, samples, config.max_length)
    log = FinetuneLog()
    if config.steps == 0:
        return log
    start = time.perf_counter()
    device = next(model.parameters()).device
    with deterministic_torch(config.num_threads):
        torch.manual_seed(config.seed)
        log.trainable_params = set_trainable(model, config.train)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, config.lr, config.betas, config.weight_decay, decay_vectors=False)
        batches = batch_indices(len(prepared), config.steps, config.batch_size, config.seed)
        plan = TrainPlan((tuple((indices,) for indices in batches),))
        train(model, prepared, processor.pad_token_id, plan, optimizer, lr_schedule(config), config.lr,
              device=device, max_grad_norm=config.max_grad_norm, log=log,
              on_step=None if on_step is None else lambda _epoch, step, loss, _seen: on_step(step, loss))
    log.epochs = log.samples_seen / len(prepared)
    log.seconds = time.perf_counter() - start
    return log


# ------------------------------------------------------------------------------------------------ evaluation
def normalize_answer(text: str) -> str:
    """Exact-match normalisation: strip and lower-case."""
    return text.strip().lower()


def _answer_spans(answer_mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in ``answer_mask`` (one per assistant turn)."""
    mask = np.asarray(answer_mask, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@torch.no_grad()
def greedy_answer(model, processor: VLMProcessor, prepared: PreparedSample, start: int,
                  max_new_tokens: int) -> str:
    """Greedy decoding (``generate``, no sampling) from the prompt ``prepared.input_ids[:start]``; the text
    up to the first end-of-sequence token, special tokens removed."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = torch.from_numpy(np.ascontiguousarray(prepared.input_ids[:start], dtype=np.int64))[None].to(device)
    kwargs = {}
    if prepared.pixel_values is not None:
        kwargs = collate([prepared], processor.pad_token_id).image_kwargs(device, dtype)
    eos = processor.tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=processor.pad_token_id,
                         **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return processor.tokenizer.decode(new, skip_special_tokens=True)


@torch.no_grad()
def evaluate_answers(model, processor: VLMProcessor, samples: Sequence[dict], batch_size: int = 32,
                     max_length: int | None = None, verify: bool = False, accuracy: bool = True) -> dict:
    """Per-task exact-match accuracy of greedy answers and mean answer loss on held-out ``samples``.

    Every assistant turn is one item, answered with the gold conversation before it as context (teacher-forced
    history, as LLaVA's multi-turn evaluation). An item is correct when the greedily decoded answer equals the
    gold answer after :func:`normalize_answer`.

    Fast path (exact): one teacher-forced forward pass per batch. When the argmax at every answer position,
    end-of-turn token included, equals the gold token, greedy decoding reproduces the gold answer token for
    token, so the item is correct without generating. Only the other items are decoded with
    the KV-cached :func:`greedy_answer` (they may still match after normalisation, e.g. a different tokenisation of the same
    text). ``verify=True`` decodes every item (the reference path; tests compare the two). ``accuracy=False``
    measures the loss only: nothing is decoded and every accuracy is NaN (for free-form answers, where exact
    match says nothing and decoding is the evaluation's cost).

    Returns ``{"accuracy": {task: acc}, "loss": {task: mean CE over answer tokens of the task's samples,
    each sample weighted equally}, "n_items": {task: n}, "n_samples": {task: n}, "accuracy_mean": mean over
    tasks, "loss_mean": mean over tasks}``. Samples without ``task`` count as task ``"all"``.
    """
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = processor.tokenizer.eos_token_id
    correct: dict[str, list[bool]] = defaultdict(list)
    losses: dict[str, list[float]] = defaultdict(list)
    for lo in range(0, len(samples), batch_size):
        chunk = samples[lo:lo + batch_size]
        prepared = prepare_samples(processor, chunk, max_length)
        batch = collate(prepared, processor.pad_token_id)
        out = model(**_model_inputs(batch, device, dtype), use_cache=False)
        logits = out.logits.float()
        pred = logits[:, :-1].argmax(-1).cpu()
        row_losses = answer_cross_entropy(logits, batch.labels.to(logits.device), "row")
        pending: list[tuple[str, int, str, tuple]] = []
        for b, (sample, prep) in enumerate(zip(chunk, prepared)):
            task = sample.get("task", "all") if isinstance(sample, dict) else "all"
            ids = batch.input_ids[b]
            if bool((batch.labels[b, 1:] != IGNORE_INDEX).any()):
                losses[task].append(float(row_losses[b]))
            if not accuracy:
                continue
            gold_texts = _gold_answers(sample)
            for k, (start, end) in enumerate(_answer_spans(prep.answer_mask)):
                if start < 1:
                    continue
                forced_ok = bool(torch.equal(pred[b, start - 1:end - 1], ids[start:end]))
                ends_with_eos = int(ids[end - 1]) == eos
                if forced_ok and ends_with_eos and not verify:
                    correct[task].append(True)
                    continue
                gold = gold_texts[k] if k < len(gold_texts) else processor.tokenizer.decode(
                    ids[start:end].tolist(), skip_special_tokens=True)
                slot = len(correct[task])
                correct[task].append(False)
                pending.append((task, slot, gold, (prep, start, end - start + 4)))
        for task, slot, gold, item in pending:
            text = greedy_answer(model, processor, *item)
            correct[task][slot] = normalize_answer(text) == normalize_answer(gold)
    tasks = sorted(set(correct) | set(losses))
    acc = {t: float(np.mean(correct[t])) if correct[t] else math.nan for t in tasks}
    loss = {t: float(np.mean(losses[t])) if losses[t] else math.nan for t in tasks}
    return {
        "accuracy": acc,
        "loss": loss,
        "n_items": {t: len(correct[t]) for t in tasks},
        "n_samples": {t: len(losses[t]) for t in tasks},
        "accuracy_mean": float(np.nanmean(list(acc.values()))) if accuracy and tasks else math.nan,
        "loss_mean": float(np.nanmean(list(loss.values()))) if tasks else math.nan,
    }


def _gold_answers(sample) -> list[str]:
    if not isinstance(sample, dict):
        return []
    return [str(t.get("value", "")) for t in sample["conversations"]
            if str(t.get("from", t.get("role", ""))).lower() in ASSISTANT_ROLES]
