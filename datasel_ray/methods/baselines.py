"""Baselines: random (global / per task) and answer-loss ranking (pure numpy).

Each selector returns a :class:`BaselineResult` with ascending int64 row positions and a float64[N] per-row
score (higher = picked earlier). Deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasel_ray.methods.budget import allocate_proportional, resolve_budget

__all__ = ["BaselineResult", "answer_loss_ranking", "random_global", "random_per_task"]


@dataclass
class BaselineResult:
    """selected: int64[B] ascending row positions; score: float64[N] (higher = better, NaN = unrankable)."""

    selected: np.ndarray
    score: np.ndarray


def _check_n(n) -> int:
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return int(n)


def random_global(n: int, budget: float | int, seed: int) -> BaselineResult:
    """Uniform random subset of ``resolve_budget(budget, n)`` rows; score = random key in [0, 1)."""
    n = _check_n(n)
    B = resolve_budget(budget, n)
    key = np.random.default_rng(seed).random(n)
    order = np.argsort(-key, kind="stable")
    return BaselineResult(np.sort(order[:B]).astype(np.int64), key)


def random_per_task(tasks: np.ndarray, budget: float | int, seed: int) -> BaselineResult:
    """Random subset that keeps the pool's task mix: task budgets ∝ task sizes (largest remainder, capped at the
    task size), uniform random rows within each task (task t uses ``default_rng([seed, t])``)."""
    t = np.asarray(tasks)
    if t.ndim != 1:
        raise ValueError(f"tasks must be a 1-D array [N] of int codes or strings, got shape {t.shape}")
    n = len(t)
    B = resolve_budget(budget, n)
    _, tindex = np.unique(t, return_inverse=True)
    tindex = tindex.reshape(-1)
    sizes = np.bincount(tindex).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    kb = allocate_proportional(sizes.astype(np.float64), B, caps=sizes) if n else sizes
    score = np.zeros(n)
    chosen = []
    for ti in range(len(sizes)):
        rows = np.flatnonzero(tindex == ti)
        key = np.random.default_rng([int(seed), ti]).random(len(rows))
        score[rows] = key
        chosen.append(rows[np.argsort(-key, kind="stable")[:kb[ti]]])
    sel = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
    return BaselineResult(sel, score)


def answer_loss_ranking(loss: np.ndarray, budget: float | int, highest: bool = True) -> BaselineResult:
    """Rank rows by mean answer-token cross-entropy (float[N]); take the ``budget`` highest (or lowest).

    NaN losses (no answer token) rank last either way; ties go to the lowest row position. Ranking by
    perplexity ``exp(loss)`` gives the identical selection. score = loss (NaN kept).
    """
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 1:
        raise ValueError(f"loss must be a 1-D float array [N], got shape {loss.shape}")
    n = len(loss)
    B = resolve_budget(budget, n)
    nan = np.isnan(loss)
    key = np.where(nan, 0.0, -loss if highest else loss)
    order = np.lexsort((np.arange(n), key, nan))
    return BaselineResult(np.sort(order[:B]).astype(np.int64), loss)

