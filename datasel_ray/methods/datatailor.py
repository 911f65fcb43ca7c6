"""DataTailor (Yu et al., ICCV 2025; arXiv 2412.06293): informativeness, uniqueness, representativeness.

Pure numpy (+ :func:`datasel_ray.clustering.ward_clusters`). Defaults follow the reference code
(Yuqifan1117/DataTailor: ``relationship_value_calculation.py``, ``datatailor_selector.py``); paper variants are
switches of :class:`datasel_ray.config.DataTailorConfig`.

Per task t (rows with the same task label):

1. Ward clusters of the last-token states ``h`` (App. B.1) — :func:`datasel_ray.clustering.ward_clusters`;
2. uniqueness U (Eq. 3) — :func:`uniqueness`;
3. inter-cluster association A and representativeness R (Eq. 4–5) — :func:`association`, :func:`representativeness`;
4. within-task percentile ranks and ``score = (r·rk(I) + rk(U) + rk(R)) / (r + 2)`` (Eq. 6, code form) —
   :func:`task_ranks_and_score`;
5. task budgets ``k_t ∝ N_t · τ̄_t²`` (Eq. 7 / App. Eq. 14) and deterministic top-k per task —
   :func:`task_budgets`, :func:`top_k_per_task`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasel_ray.clustering import cluster_order
from datasel_ray.methods.budget import allocate_proportional, resolve_budget

__all__ = [
    "DataTailorResult",
    "association",
    "cluster_distance_sums",
    "cluster_uniqueness",
    "combined_score",
    "percentile_rank",
    "representativeness",
    "representativeness_value",
    "select",
    "task_budgets",
    "task_ranks_and_score",
    "task_tau_means",
    "top_k_per_task",
    "uniqueness",
    "uniqueness_new",
]

_BLOCK = 1024


def percentile_rank(x: np.ndarray) -> np.ndarray:
    """Within-group percentile rank ``argsort(argsort(x)) / n`` in [0, 1) (float64[n]); stable, so ties rank by
    position (the reference uses numpy's default unstable sort)."""
    x = np.asarray(x)
    n = len(x)
    if n == 0:
        return np.zeros(0)
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / n


def cluster_distance_sums(hc: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, float]:
    """For one cluster's rows ``hc`` (float[n, d], any float dtype) and informativeness ``v`` (float[n]):
    ``num_i = Σ_j d_ij V_j`` (float64[n]) and ``Σ_{j,k} d_jk`` over ordered pairs (Euclidean, float64).

    Fixed ``_BLOCK x _BLOCK`` tiles converted to float64 on the fly: memory O(block²) beside the input, never
    |C| x |C| or a float64 copy of the cluster, and the sums do not depend on where the rows were read.
    """
    from scipy.spatial.distance import cdist

    n = len(hc)
    v = np.asarray(v, dtype=np.float64)
    num = np.zeros(n)
    total = 0.0
    for s in range(0, n, _BLOCK):
        a = np.asarray(hc[s:s + _BLOCK], dtype=np.float64)
        for t in range(0, n, _BLOCK):
            d = cdist(a, a if t == s else np.asarray(hc[t:t + _BLOCK], dtype=np.float64))
            num[s:s + _BLOCK] += d @ v[t:t + _BLOCK]
            total += float(d.sum())
    return num, total


def cluster_uniqueness(num: np.ndarray, pair_sum: float, size: int, v_sum: float, mode: str) -> np.ndarray:
    """U (Eq. 3) from the sums of :func:`cluster_distance_sums` over a cluster of ``size`` rows whose
    informativeness sums to ``v_sum`` (float64, shaped like ``num``).

    ``reference``: ``num / (pair_sum / size)``; a cluster whose rows are all identical (or a single row) has
    ``pair_sum = 0`` and the code's 0/0 gives NaN, which numpy's argsort places last, i.e. the *highest*
    uniqueness rank (kept: :func:`percentile_rank` sorts NaN last too). ``paper``: ``num / Σ V`` (``d_ii = 0``,
    so including ``j = i`` changes nothing); 0 when ``Σ V = 0``.
    """
    num = np.asarray(num, dtype=np.float64)
    if mode == "reference":
        avg = pair_sum / size if size else 0.0
        return num / avg if avg > 0 else np.full(num.shape, np.nan)
    return num / v_sum if v_sum > 0 else np.zeros(num.shape)


def uniqueness_new(x: np.ndarray, members: np.ndarray, member_informativeness: np.ndarray, pair_sum: float,
                   mode: str = "reference") -> float:
    """U (Eq. 3) of a new point ``x`` (float[d]) against the members of its cluster (float[m, d]), with the
    cluster's ``pair_sum`` (:func:`cluster_distance_sums`): :func:`cluster_uniqueness` of
    ``num = Σ_j d(x, h_j) V_j``; for a member (``x = h_i``) this is that member's value."""
    v = np.asarray(member_informativeness, dtype=np.float64)
    d = np.linalg.norm(np.asarray(members, dtype=np.float64) - np.asarray(x, dtype=np.float64), axis=1)
    return float(cluster_uniqueness(np.array([d @ v]), pair_sum, len(v), float(v.sum()), mode)[0])


def uniqueness(h: np.ndarray, informativeness: np.ndarray, labels: np.ndarray, mode: str = "reference") -> np.ndarray:
    """Unique value U (Eq. 3) of every row within its cluster; Euclidean distances in float64.

    ``mode="reference"`` (code, default): ``U_i = Σ_{j∈C} d_ij V_j / ((1/|C|) Σ_{j,k∈C} d_jk)``; a
    single-member or all-identical cluster gives NaN (the code's 0/0, ranked highest; see
    :func:`cluster_uniqueness`). ``mode="paper"``: ``U_i = Σ_{j∈C, j≠i} d_ij V_j / Σ_{k∈C} V_k`` (0 when
    ``Σ V = 0``).

    Args:
        h: float[N, d]; informativeness: float[N]; labels: int[N] >= 0 (cluster ids).

    Returns:
        float64[N]. Memory O(block²) per cluster (never |C| x |C|), time O(Σ_c |C|² d).
    """
    h = np.asarray(h)
    n = h.shape[0]
    v = np.asarray(informativeness, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    if mode not in ("reference", "paper"):
        raise ValueError(f"uniqueness mode must be 'reference' or 'paper', got {mode!r}")
    if v.shape != (n,) or lab.shape != (n,):
        raise ValueError(f"informativeness and labels must have shape ({n},)")
    k = int(lab.max()) + 1 if n else 0
    order, starts = cluster_order(lab, k)
    out = np.zeros(n)
    for c in range(k):
        idx = order[starts[c]:starts[c + 1]]
        if len(idx):
            num, pair_sum = cluster_distance_sums(h[idx], v[idx])
            out[idx] = cluster_uniqueness(num, pair_sum, len(idx), float(v[idx].sum()), mode)
    return out


def association(means: np.ndarray, cluster_task: np.ndarray) -> np.ndarray:
    """Inter-cluster association A (Eq. 4): ``A_c = mean_{c'≠c, same task} exp(cos(μ_c, μ_c'))`` (float64[K]).

    ``means``: float[K, d] cluster means; ``cluster_task``: int[K]. A task with a single cluster gets
    ``A = e¹`` (the code divides by zero). A zero mean has cosine 0 with every other mean.
    Blocked: O(K_t · block) memory per task. (The code further divides A by its task mean; this is a per-task
    constant that leaves the within-task ranks unchanged, so it is omitted.)
    """
    mu = np.asarray(means, dtype=np.float64)
    ct = np.asarray(cluster_task, dtype=np.int64)
    norms = np.linalg.norm(mu, axis=1)
    mn = np.where(norms[:, None] > 0, mu / np.where(norms > 0, norms, 1.0)[:, None], 0.0)
    A = np.full(len(mu), np.e)
    for t in np.unique(ct):
        idx = np.flatnonzero(ct == t)
        kt = len(idx)
        if kt < 2:
            continue
        for s in range(0, kt, _BLOCK):
            rows = idx[s:s + _BLOCK]
            e = np.exp(mn[rows] @ mn[idx].T)
            e[np.arange(len(rows)), np.arange(s, s + len(rows))] = 0.0
            A[rows] = e.sum(1) / (kt - 1)
    return A


def representativeness_value(A: np.ndarray, informativeness: np.ndarray, v_sum: np.ndarray,
                             mode: str = "reference") -> np.ndarray:
    """Representative value R (Eq. 5) from a row's cluster association ``A``, its informativeness and its
    cluster's ``Σ V`` (float64, broadcast): reference ``R = A V``; paper ``R = A V / Σ_{k∈C} V_k`` (0 when
    ``Σ V = 0``). The batch (:func:`representativeness`) and the online scorer both call this."""
    A = np.asarray(A, dtype=np.float64)
    v = np.asarray(informativeness, dtype=np.float64)
    if mode == "reference":
        return A * v
    if mode != "paper":
        raise ValueError(f"representativeness mode must be 'reference' or 'paper', got {mode!r}")
    den = np.asarray(v_sum, dtype=np.float64)
    return np.where(den > 0, A * v / np.where(den > 0, den, 1.0), 0.0)


def representativeness(A_row: np.ndarray, informativeness: np.ndarray, labels: np.ndarray,
                       mode: str = "reference") -> np.ndarray:
    """R (Eq. 5) of every row: :func:`representativeness_value` with ``A_row`` (A of each row's cluster) and the
    Σ V of each row's cluster (``labels``). Returns float64[N]."""
    v = np.asarray(informativeness, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    return representativeness_value(A_row, v, np.bincount(lab, weights=v)[lab], mode)


def combined_score(rank_I, rank_U, rank_R, n_turns) -> np.ndarray:
    """DataTailor's combined value (Eq. 6, code form): ``(r·rk(I) + rk(U) + rk(R)) / (r + 2)``, ``r = max(1,
    turns)``, from within-task percentile ranks (float64, broadcast)."""
    r = np.maximum(1.0, np.asarray(n_turns, dtype=np.float64))
    return (r * np.asarray(rank_I) + np.asarray(rank_U) + np.asarray(rank_R)) / (r + 2.0)


def task_ranks_and_score(informativeness: np.ndarray, U: np.ndarray, R: np.ndarray, n_turns: np.ndarray,
                         task_rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Within-task percentile ranks of I, U and R (:func:`percentile_rank` over each task's rows ``task_rows``)
    and the combined score (:func:`combined_score`), float64[N] each: steps 4 of the module docstring."""
    n = len(informativeness)
    rank_I, rank_U, rank_R = np.zeros(n), np.zeros(n), np.zeros(n)
    for rows in task_rows:
        rank_I[rows] = percentile_rank(informativeness[rows])
        rank_U[rows] = percentile_rank(U[rows])
        rank_R[rows] = percentile_rank(R[rows])
    return rank_I, rank_U, rank_R, combined_score(rank_I, rank_U, rank_R, n_turns)


def task_tau_means(tau: np.ndarray, task_rows: list[np.ndarray]) -> np.ndarray:
    """τ̄_t, the mean τ of each task's rows (float64[T])."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.array([tau[rows].mean() for rows in task_rows])


def top_k_per_task(score: np.ndarray, task_rows: list[np.ndarray],
                   task_budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``task_budget[t]`` highest-scoring rows of each task (ties: lowest row position): int64 positions,
    ascending, and each row's position in its task's descending-score order (int64[N], 0 = best)."""
    row_rank = np.empty(len(score), dtype=np.int64)
    chosen = []
    for t, rows in enumerate(task_rows):
        order = rows[np.argsort(-score[rows], kind="stable")]
        row_rank[order] = np.arange(len(order))
        chosen.append(order[:task_budget[t]])
    selected = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
    return selected, row_rank


def task_budgets(task_sizes: np.ndarray, tau_mean: np.ndarray, budget: int) -> np.ndarray:
    """Task budgets (Eq. 7 / App. Eq. 14): ``k_t ∝ N_t · τ̄_t²``, summing exactly to ``budget``.

    Rounded by largest remainder and capped at N_t with the excess redistributed over the uncapped tasks
    (:func:`~datasel_ray.methods.budget.allocate_proportional`). The code rounds each ``k_t`` half-up and has
    no cap. Returns int64[T].
    """
    sizes = np.asarray(task_sizes, dtype=np.int64)
    w = sizes * np.asarray(tau_mean, dtype=np.float64) ** 2
    return allocate_proportional(w, int(budget), caps=sizes)


@dataclass
class DataTailorResult:
    """Output of :func:`select` (all per-row arrays are aligned with the input rows).

    selected: int64[B] row positions, ascending. task_names: the unique task labels (np.unique order);
    task_index: int64[N] position of each row's task in ``task_names``; task_size, task_budget: int64[T];
    task_tau: float64[T] mean τ of each task. labels: int64[N] global cluster id (task-major, contiguous);
    cluster_task: int64[K]; cluster_size: int64[K]; cluster_A: float64[K].
    U, R: float64[N] uniqueness / representativeness; rank_I, rank_U, rank_R: float64[N] within-task
    percentile ranks; r: float64[N] weight max(1, n_turns); score: float64[N] combined value;
    row_rank: int64[N] position of the row in its task's descending-score order (0 = best).
    """

    selected: np.ndarray
    task_names: np.ndarray
    task_index: np.ndarray
    task_size: np.ndarray
    task_budget: np.ndarray
    task_tau: np.ndarray
    labels: np.ndarray
    cluster_task: np.ndarray
    cluster_size: np.ndarray
    cluster_A: np.ndarray
    U: np.ndarray
    R: np.ndarray
    rank_I: np.ndarray
    rank_U: np.ndarray
    rank_R: np.ndarray
    r: np.ndarray
    score: np.ndarray
    row_rank: np.ndarray


def cluster_tasks(h: np.ndarray, task_rows: list[np.ndarray], config, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ward clusters inside each task (Sec. 3.2, cross-modal domain clustering).

    Args:
        h: float[N, d]; task_rows: per task, the int row positions of its members; config: DataTailorConfig.
    Returns:
        labels int64[N] global cluster ids (task-major, contiguous), cluster_task int64[K].
    """
    from datasel_ray.clustering import ward_clusters

    labels = np.empty(h.shape[0], dtype=np.int64)
    offset = 0
    cluster_task: list[int] = []
    for t, rows in enumerate(task_rows):
        lab = ward_clusters(h[rows], cut=config.cut, cut_ratio=config.cut_ratio, dense_max_rows=config.dense_max_rows,
                            precluster_size=config.precluster_size, seed=seed + t,
                            precluster_train=config.precluster_train_rows)
        kt = int(lab.max()) + 1
        labels[rows] = lab + offset
        cluster_task.extend([t] * kt)
        offset += kt
    return labels, np.asarray(cluster_task, dtype=np.int64)


def _check_task_labels(labels, tindex: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer) or (n and lab.min() < 0):
        raise ValueError(f"labels must be non-negative ints [{n}], got shape {lab.shape}, dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    K = int(lab.max()) + 1 if n else 0
    cluster_task = np.full(K, -1, dtype=np.int64)
    cluster_task[lab] = tindex
    if np.any(cluster_task < 0) or np.any(cluster_task[lab] != tindex):
        raise ValueError("labels: every cluster id in 0..K-1 must be used and lie inside a single task")
    return lab, cluster_task


def _check_inputs(h, informativeness, tau, n_turns, tasks):
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[0] < 1 or h.shape[1] < 1 or not np.issubdtype(h.dtype, np.floating):
        raise ValueError(f"h must be a float array [N, d] with N, d >= 1, got shape {h.shape}, dtype {h.dtype}")
    n = h.shape[0]
    out = []
    for name, a in (("informativeness", informativeness), ("tau", tau)):
        a = np.asarray(a)
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"{name} must be a float array [{n}], got shape {a.shape}, dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite (found NaN/inf)")
        out.append(a.astype(np.float64))
    nt = np.asarray(n_turns)
    if nt.shape != (n,) or not np.issubdtype(nt.dtype, np.number):
        raise ValueError(f"n_turns must be an int array [{n}], got shape {nt.shape}, dtype {nt.dtype}")
    t = np.asarray(tasks)
    if t.shape != (n,):
        raise ValueError(f"tasks must be an array [{n}] of int codes or strings, got shape {t.shape}")
    return h, out[0], out[1], nt.astype(np.float64), t


def select(h: np.ndarray, informativeness: np.ndarray, tau: np.ndarray, n_turns: np.ndarray, tasks: np.ndarray,
           budget: float | int, config=None, seed: int = 0, labels: np.ndarray | None = None) -> DataTailorResult:
    """Run DataTailor end to end.

    Args:
        h: float[N, d] last-token states (``last_token``; fp16 is cast per task to float64).
        informativeness: float[N] V_inf (singular-value entropy); tau: float[N] σ₁/Σσ; n_turns: int[N] number of
            human/gpt rounds (r = max(1, n_turns)); tasks: [N] int codes or strings (grouped with np.unique).
        budget: fraction (< 1) or row count (>= 1) of the whole pool.
        config: :class:`datasel_ray.config.DataTailorConfig` (None = defaults).
        seed: seed of the k-means pre-clustering used for tasks above ``config.dense_max_rows`` rows.
        labels: int[N] precomputed global Ward clusters (from :func:`cluster_tasks`, e.g. the aggregate phase's
            stats); each cluster must lie inside one task. When given, clustering is skipped.

    Top-k per task by score, ties by lowest row position. Deterministic.
    """
    from datasel_ray.clustering import cluster_means
    from datasel_ray.config import DataTailorConfig

    cfg = config if config is not None else DataTailorConfig()
    h, v, tau, nt, tasks = _check_inputs(h, informativeness, tau, n_turns, tasks)
    n = h.shape[0]
    B = resolve_budget(budget, n)
    names, tindex = np.unique(tasks, return_inverse=True)
    tindex = tindex.astype(np.int64).reshape(-1)
    T = len(names)
    t_rows = [np.flatnonzero(tindex == t) for t in range(T)]
    if labels is None:
        labels, cluster_task = cluster_tasks(h, t_rows, cfg, seed)
    else:
        labels, cluster_task = _check_task_labels(labels, tindex, n)
    K = len(cluster_task)
    size = np.bincount(labels, minlength=K).astype(np.int64)
    U = uniqueness(h, v, labels, cfg.uniqueness)
    means = cluster_means(h, labels, K)
    A = association(means, cluster_task)
    R = representativeness(A[labels], v, labels, cfg.representativeness)
    r = np.maximum(1.0, nt)
    rank_I, rank_U, rank_R, score = task_ranks_and_score(v, U, R, nt, t_rows)
    tsize = np.array([len(rw) for rw in t_rows], dtype=np.int64)
    ttau = task_tau_means(tau, t_rows)
    kb = task_budgets(tsize, ttau, B)
    selected, row_rank = top_k_per_task(score, t_rows, kb)
    return DataTailorResult(
        selected=selected, task_names=names, task_index=tindex, task_size=tsize, task_budget=kb, task_tau=ttau,
        labels=labels, cluster_task=cluster_task, cluster_size=size, cluster_A=A, U=U, R=R, rank_I=rank_I,
        rank_U=rank_U, rank_R=rank_R, r=r, score=score, row_rank=row_rank)
