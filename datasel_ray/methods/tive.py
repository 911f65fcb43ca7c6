"""TIVE: task-level and instance-level value estimation from projected LoRA gradients.

Liu et al., "Less is More: Data Value Estimation for Visual Instruction Tuning" (arXiv 2403.09559),
section 3.2 (Eq. 2-4) and 3.3 ("Selecting Data based on Estimated Values"). Reference code:
``RUCAIBox/TIVE`` ``select_data_TIVE.py``. Pure numpy: no torch, Ray or I/O.

Inputs (one row per pool sample, all aligned):

- ``grad_proj``: float32 [N, k], random projection of the sample's LoRA gradient (``features.gradients``).
- ``grad_norm``: float32 [N], L2 norm of the *unprojected* gradient (fp32).
- ``tasks``: [N] task labels (int codes or strings); tasks are indexed in ``np.unique`` order.

Defaults follow the reference code; the paper's variants are switches (``TiveConfig``):

- Task value ``v_t``: reference ``mean_{i in t} ||g_i||_2`` (``mode="norm"``); the paper's Eq. 4 /
  Algorithm 1 use the self-influence ``mean ||g_i||^2`` (``mode="sq_norm"``).
- Task budget ``n_t ∝ v_t`` (not weighted by the task size ``N_t``, as in both paper and code), rounded by
  largest remainder so that the budgets sum exactly to the requested size (the reference truncates with
  ``int()`` and under-fills). A task whose share exceeds its size is capped and the excess redistributed
  (``overflow="cap"``, default, no duplicates) or, as in the reference, repeated (``overflow="oversample"``).
- Instance value ``I_i = ĝ_i · mean_{j in t} ĝ_j`` with ``ĝ`` the row-normalised projected gradient. This is
  the paper's Eq. 3 and the reference code's N x N mean (``j = i`` included), computed in O(N k). The paper's
  Eq. 2 excludes ``j = i`` while keeping the ``1/|D_t|`` factor; the two differ by the constant ``1/|D_t|``
  within a task, which changes neither the softmax sampling nor a top-k.
- Within-task sampling: ``n_t`` draws without replacement from ``softmax(I / λ)``, ``λ = 1000`` (reference
  ``q = 0.001``). With ``I ∈ [-1, 1]`` this is almost uniform; ``sampling="topk"`` takes the largest ``I``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from datasel_ray.config import TiveConfig
from datasel_ray.methods.budget import allocate_proportional

TaskValueMode = Literal["norm", "sq_norm"]
Overflow = Literal["cap", "oversample"]
Sampling = Literal["softmax", "topk"]

# Rows per chunk in the O(N k) passes; bounds the temporary float64 copy to ~chunk * k * 8 bytes.
_CHUNK_ROWS = 16384


@dataclass(frozen=True)
class TiveResult:
    """Outcome of :func:`select`.

    ``selected`` holds row positions (int64, ascending). Under ``overflow="oversample"`` a row may appear
    more than once (the reference's duplication of small tasks); under ``"cap"`` every row appears at most once.
    Per-task arrays are indexed like ``task_names`` (``np.unique`` order of the input labels).
    """

    selected: np.ndarray  # int64 [M], M == budget
    instance_value: np.ndarray  # float32 [N], I_i
    task_names: np.ndarray  # [T] unique task labels
    task_value: np.ndarray  # float64 [T], v_t
    task_size: np.ndarray  # int64 [T], N_t
    task_budget: np.ndarray  # int64 [T], n_t (sums to M)
    task_value_mode: str
    overflow: str
    sampling: str
    temperature: float
    seed: int

    def summary(self) -> dict:
        """JSON-ready description of the run: variant switches and per-task values and budgets."""
        return {
            "method": "tive",
            "selected": int(self.selected.size),
            "unique_selected": int(np.unique(self.selected).size),
            "task_value_mode": self.task_value_mode,
            "overflow": self.overflow,
            "sampling": self.sampling,
            "temperature": self.temperature,
            "seed": self.seed,
            "tasks": {
                str(name): {"value": float(v), "size": int(s), "budget": int(b)}
                for name, v, s, b in zip(self.task_names, self.task_value, self.task_size, self.task_budget)
            },
        }


# --------------------------------------------------------------------------------------------- task level
def task_values(grad_norm: np.ndarray, tasks: np.ndarray, mode: TaskValueMode = "norm") -> np.ndarray:
    """Per-task value ``v_t`` (paper Eq. 4, reference ``select_data_TIVE.py``).

    Args:
        grad_norm: float [N], ``||g_i||_2`` of the unprojected gradient.
        tasks: int [N] task codes in ``[0, T)``.
        mode: ``"norm"`` (reference): ``mean ||g||_2``; ``"sq_norm"`` (paper's self-influence): ``mean ||g||^2``.

    Returns:
        float64 [T] with ``T = tasks.max() + 1``; a task code with no rows gets 0.
    """
    if mode not in ("norm", "sq_norm"):
        raise ValueError(f"Unknown task value mode '{mode}'. Choose from: norm, sq_norm")
    codes = _as_codes(tasks)
    norms = np.asarray(grad_norm, dtype=np.float64)
    if norms.shape != codes.shape:
        raise ValueError(f"grad_norm has shape {norms.shape}, tasks has shape {codes.shape}")
    per_row = norms if mode == "norm" else norms * norms
    sizes = np.bincount(codes)
    sums = np.bincount(codes, weights=per_row, minlength=sizes.size)
    return np.divide(sums, sizes, out=np.zeros_like(sums), where=sizes > 0)


def task_budgets(values: np.ndarray, task_sizes: np.ndarray, total: int, overflow: Overflow = "cap") -> np.ndarray:
    """Per-task sample counts ``n_t ∝ v_t`` summing exactly to ``total`` (largest remainder).

    Args:
        values: float [T], non-negative task values. If all are 0 the tasks are weighted equally.
        task_sizes: int [T], ``N_t``.
        total: requested subset size.
        overflow: ``"cap"`` (default): ``n_t <= N_t``, the excess goes to the uncapped tasks in proportion to
            their values (needs ``total <= sum N_t``). ``"oversample"`` (reference): no cap; a task with
            ``n_t >= N_t`` is later repeated ``n_t // N_t`` times plus a draw of ``n_t % N_t`` rows
            (see :func:`select`). A task with ``N_t = 0`` never gets budget.

    Returns:
        int64 [T], sums to ``total``.
    """
    weights = np.asarray(values, dtype=np.float64)
    sizes = np.asarray(task_sizes, dtype=np.int64)
    if weights.ndim != 1 or weights.shape != sizes.shape:
        raise ValueError(f"values {weights.shape} and task_sizes {sizes.shape} must be 1-D of equal length")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("task values must be finite and non-negative")
    if np.any(sizes < 0):
        raise ValueError("task_sizes must be non-negative")
    total = int(total)
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    weights = np.where(sizes > 0, weights, 0.0)
    if weights.sum() <= 0:
        weights = (sizes > 0).astype(np.float64)
    if overflow == "cap":
        if total > sizes.sum():
            raise ValueError(f"total ({total}) exceeds the pool size ({int(sizes.sum())}) with overflow='cap'")
        budgets = allocate_proportional(weights, total, caps=sizes)
    elif overflow == "oversample":
        if total > 0 and sizes.sum() == 0:
            raise ValueError("cannot oversample from an empty pool")
        budgets = allocate_proportional(weights, total, caps=None)
    else:
        raise ValueError(f"Unknown overflow '{overflow}'. Choose from: cap, oversample")
    budgets = np.asarray(budgets, dtype=np.int64)
    if budgets.sum() != total:  # durable contract with budget.allocate_proportional
        raise AssertionError(f"allocated {int(budgets.sum())} rows for a budget of {total}")
    return budgets


# ----------------------------------------------------------------------------------------- instance level
def task_mean_gradients(grad_proj: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Mean of the row-normalised projected gradients per task (the paper's "task gradient", Eq. 3).

    Args:
        grad_proj: float [N, k]. All-zero rows (no answer token) contribute a zero vector.
        tasks: int [N] task codes in ``[0, T)``.

    Returns:
        float32 [T, k]; rows of tasks with no samples are 0. Stored in stats/ for online scoring.
    """
    codes = _as_codes(tasks)
    sums, sizes = _normalised_task_sums(_as_matrix(grad_proj, codes), codes)
    return (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32)


def instance_values(grad_proj: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Instance value ``I_i = ĝ_i · mean_{j in t(i)} ĝ_j`` in O(N k) (paper Eq. 3; reference incl. ``j = i``).

    Equals ``mean_j (ĝ ĝᵀ)_{ij}`` over the rows of i's task, the reference's N x N formulation.

    Args:
        grad_proj: float [N, k] projected gradients.
        tasks: int [N] task codes in ``[0, T)``.

    Returns:
        float32 [N] in ``[-1, 1]``; 0 for all-zero gradient rows.
    """
    codes = _as_codes(tasks)
    g = _as_matrix(grad_proj, codes)
    sums, sizes = _normalised_task_sums(g, codes)
    return instance_values_against(g, codes, sums / np.maximum(sizes, 1)[:, None])


def normalised_task_sums(grad_proj: np.ndarray, tasks: np.ndarray, n_tasks: int) -> np.ndarray:
    """float64 [n_tasks, k] sums of the row-normalised gradients of each task code: the mergeable partial of
    the task-mean gradient (partials of disjoint row sets add up)."""
    codes = _as_codes(tasks)
    return _normalised_task_sums(_as_matrix(grad_proj, codes), codes, n_tasks)[0]


def instance_values_against(grad_proj: np.ndarray, tasks: np.ndarray, task_means: np.ndarray) -> np.ndarray:
    """``I_i = ĝ_i · task_means[t(i)]`` (float32 [N]) for rows ``grad_proj`` (float [N, k]) against the frozen
    task-mean normalised gradients ``task_means`` (float [T, k]): the batch form of Eq. 3 and its online form."""
    codes = _as_codes(tasks)
    g = _as_matrix(grad_proj, codes)
    means = np.asarray(task_means, dtype=np.float64)
    out = np.empty(g.shape[0], dtype=np.float64)
    for start in range(0, g.shape[0], _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        out[start:stop] = np.einsum("ik,ik->i", _row_normalise(g[start:stop]), means[codes[start:stop]])
    return out.astype(np.float32)


def task_members(tasks: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """Per task code ``0..n_tasks-1``, its rows' positions in ascending order (int64 arrays)."""
    codes = _as_codes(tasks)
    sizes = np.bincount(codes, minlength=n_tasks).astype(np.int64)
    return np.split(np.argsort(codes, kind="stable"), np.cumsum(sizes)[:-1])


def split_task_budget(budget: int, size: int) -> tuple[int, int]:
    """A task's budget ``n_t`` over its ``N_t = size`` rows: ``(n_t // N_t, n_t % N_t)`` full repeats of every
    row (only ``oversample`` budgets exceed the size) and the rows left to draw; ``(0, 0)`` for an empty task."""
    return divmod(int(budget), int(size)) if size else (0, 0)


def draw(instance_value: np.ndarray, tasks: np.ndarray, budgets: np.ndarray, config: TiveConfig,
         seed: int) -> np.ndarray:
    """The budgeted draw of Sec. 3.3: per task ``t``, ``n_t // N_t`` full repeats (``oversample`` only) plus
    :func:`sample_within_task` of the rest with ``np.random.default_rng([seed, t])``, rows in row order.

    Args: instance_value float [N]; tasks int [N] codes in [0, T); budgets int [T]. Returns int64 positions,
    ascending (with repeats under ``oversample``).
    """
    inst = np.asarray(instance_value)
    picks = []
    for t, (rows, n_t) in enumerate(zip(task_members(tasks, len(budgets)), budgets)):
        repeats, rest = split_task_budget(n_t, rows.size)
        picks.extend([rows] * repeats)
        rng = np.random.default_rng([seed, t])
        picks.append(rows[sample_within_task(inst[rows], rest, config.temperature, config.sampling, rng)])
    return np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, dtype=np.int64)


def draw_inclusion(instance_value: np.ndarray, tasks: np.ndarray, budgets: np.ndarray, temperature: float,
                   sampling: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """Each row's probability of being in :func:`draw`'s selection (float64 [N]) and each task's key threshold
    κ_t (float64 [T]; ``-inf``: every row is taken, ``+inf``: none): a task with full repeats takes every row,
    otherwise :func:`inclusion_threshold` of the rest to draw and :func:`inclusion_probability` under it.

    Args: instance_value float [N]; tasks int [N] codes in [0, T); budgets int [T] (as :func:`draw`).
    """
    inst = np.asarray(instance_value)
    prob = np.zeros(inst.shape[0])
    kappa = np.zeros(len(budgets))
    for t, (rows, n_t) in enumerate(zip(task_members(tasks, len(budgets)), budgets)):
        repeats, rest = split_task_budget(n_t, rows.size)
        k_t = float("-inf") if repeats else inclusion_threshold(inst[rows], rest, temperature, sampling)
        prob[rows] = inclusion_probability(inst[rows], k_t, temperature, sampling)
        kappa[t] = k_t
    return prob, kappa


def _gumbel_inclusion(z: np.ndarray, kappa: float) -> np.ndarray:
    """P(z + G > κ) for standard Gumbel G: ``1 - exp(-exp(z - κ))`` (float64)."""
    return -np.expm1(-np.exp(np.clip(z - kappa, -700.0, 700.0)))


def inclusion_threshold(values: np.ndarray, n: int, temperature: float, sampling: Sampling) -> float:
    """The key threshold κ of one task's draw of ``n`` of ``len(values)`` rows (see
    :func:`inclusion_probability`): for ``softmax``, the κ with ``Σ_i P(v_i/λ + G_i > κ) = n`` (bisection); for
    ``topk``, the ``n``-th largest value. ``+inf`` when ``n = 0``, ``-inf`` when ``n >= len(values)``."""
    v = np.asarray(values, dtype=np.float64)
    if n <= 0 or v.size == 0:
        return float("inf")
    if n >= v.size:
        return float("-inf")
    if sampling == "topk":
        return float(np.sort(v)[::-1][n - 1])
    z = v / temperature
    lo, hi = float(z.min()) - 50.0, float(z.max()) + 50.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _gumbel_inclusion(z, mid).sum() > n:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def inclusion_probability(values: np.ndarray, kappa: float, temperature: float, sampling: Sampling) -> np.ndarray:
    """Probability that a row of instance value ``v`` is in its task's draw (float64 [M]).

    ``softmax`` (reference): the Gumbel-top-k draw keeps a row when ``v/λ + G > κ``, where κ is the task's key
    threshold (:func:`inclusion_threshold`); a sample's inclusion probability is ``1 - exp(-exp(v/λ - κ))``, and
    over the task's rows these sum to the task budget (the Poisson approximation of sampling without
    replacement; exact as the task grows). ``topk``: 1 when ``v >= κ`` else 0.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(kappa):
        return np.full(v.shape, 0.0 if kappa > 0 else 1.0)
    if sampling == "topk":
        return (v >= kappa).astype(np.float64)
    return _gumbel_inclusion(v / temperature, kappa)


def sample_within_task(
    values: np.ndarray,
    n: int,
    temperature: float = 1000.0,
    sampling: Sampling = "softmax",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw ``n`` of ``len(values)`` positions without replacement.

    ``sampling="softmax"`` (reference): successive draws from ``softmax(values / temperature)`` (the
    distribution of ``np.random.choice(p=w, replace=False)``), implemented with the Gumbel-top-k trick:
    ``argsort(values / temperature + Gumbel noise)[:n]``. Deterministic for a seeded ``rng``; ties in the
    keys resolve to the lower position. ``sampling="topk"``: the ``n`` largest values, ties to the lower
    position; ``rng`` and ``temperature`` are unused.

    Args:
        values: float [M] instance values of one task.
        n: number of positions, ``0 <= n <= M``.
        temperature: λ > 0.
        rng: numpy Generator; required for ``"softmax"``.

    Returns:
        int64 [n], positions into ``values`` in draw order (descending key).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    if not 0 <= n <= v.size:
        raise ValueError(f"n must be in [0, {v.size}], got {n}")
    if sampling == "topk":
        keys = v
    elif sampling == "softmax":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if rng is None:
            raise ValueError("softmax sampling needs a seeded numpy Generator (rng)")
        keys = v / temperature + rng.gumbel(size=v.size)
    else:
        raise ValueError(f"Unknown sampling '{sampling}'. Choose from: softmax, topk")
    return np.argsort(-keys, kind="stable")[:n].astype(np.int64)


# ------------------------------------------------------------------------------------------------ select
def select(
    grad_proj: np.ndarray,
    grad_norm: np.ndarray,
    tasks: np.ndarray,
    budget: int,
    config: TiveConfig | None = None,
    seed: int = 0,
) -> TiveResult:
    """TIVE selection of ``budget`` rows (paper section 3.3; reference ``select_data_TIVE.py``).

    Args:
        grad_proj: float [N, k] projected LoRA gradients.
        grad_norm: float [N] unprojected gradient norms.
        tasks: [N] task labels (any sortable dtype).
        budget: subset size (rows; under ``oversample`` it counts duplicates).
        config: variant switches ``task_value``, ``overflow``, ``sampling``, ``temperature``.
        seed: root seed; task ``t`` draws from ``np.random.default_rng([seed, t])`` so one task's draw does not
            depend on the others.

    Returns:
        :class:`TiveResult`.
    """
    config = config or TiveConfig()
    labels = np.asarray(tasks)
    if labels.ndim != 1:
        raise ValueError(f"tasks must be 1-D, got shape {labels.shape}")
    names, codes = np.unique(labels, return_inverse=True)
    codes = codes.astype(np.int64).reshape(-1)
    g = _as_matrix(grad_proj, codes)
    norms = np.asarray(grad_norm, dtype=np.float64)
    if norms.shape != codes.shape:
        raise ValueError(f"grad_norm has shape {norms.shape}, expected ({codes.size},)")
    if not (np.all(np.isfinite(norms)) and np.all(np.isfinite(g))):
        raise ValueError("grad_proj and grad_norm must be finite")

    values = task_values(norms, codes, mode=config.task_value)
    sizes = np.bincount(codes, minlength=names.size).astype(np.int64)
    budgets = task_budgets(values, sizes, budget, overflow=config.overflow)
    inst = instance_values(g, codes)
    selected = draw(inst, codes, budgets, config, seed)
    return TiveResult(
        selected=selected.astype(np.int64),
        instance_value=inst,
        task_names=names,
        task_value=values,
        task_size=sizes,
        task_budget=budgets,
        task_value_mode=config.task_value,
        overflow=config.overflow,
        sampling=config.sampling,
        temperature=float(config.temperature),
        seed=int(seed),
    )


# ------------------------------------------------------------------------------------------------ helpers
def _as_codes(tasks: np.ndarray) -> np.ndarray:
    codes = np.asarray(tasks)
    if codes.ndim != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"task codes must be a 1-D integer array, got {codes.dtype} {codes.shape}")
    if codes.size and codes.min() < 0:
        raise ValueError("task codes must be >= 0")
    return codes.astype(np.int64, copy=False)


def _as_matrix(grad_proj: np.ndarray, codes: np.ndarray) -> np.ndarray:
    g = np.asarray(grad_proj)
    if g.ndim != 2 or g.shape[0] != codes.shape[0]:
        raise ValueError(f"grad_proj must be [N, k] with N = {codes.shape[0]}, got shape {g.shape}")
    return g


def _row_normalise(block: np.ndarray) -> np.ndarray:
    """float64 copy of ``block`` with unit-L2 rows; zero rows stay zero."""
    b = np.asarray(block, dtype=np.float64)
    norms = np.linalg.norm(b, axis=1, keepdims=True)
    return np.divide(b, norms, out=np.zeros_like(b), where=norms > 0)


def _normalised_task_sums(g: np.ndarray, codes: np.ndarray,
                          n_tasks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float64 [T, k] sums of normalised rows per task and int64 [T] task sizes (chunked, O(N k))."""
    if n_tasks is None:
        n_tasks = int(codes.max()) + 1 if codes.size else 0
    sums = np.zeros((n_tasks, g.shape[1]), dtype=np.float64)
    for start in range(0, g.shape[0], _CHUNK_ROWS):
        stop = start + _CHUNK_ROWS
        block, chunk_codes = _row_normalise(g[start:stop]), codes[start:stop]
        for t in np.unique(chunk_codes):
            sums[t] += block[chunk_codes == t].sum(axis=0)
    return sums, np.bincount(codes, minlength=n_tasks).astype(np.int64)
