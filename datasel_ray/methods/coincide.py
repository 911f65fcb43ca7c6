"""COINCIDE (Lee, Li, Hwang; EMNLP 2024 Findings): cluster-wise selection by transferability and density.

Pure numpy (+ :mod:`datasel_ray.clustering` for faiss k-means). Defaults follow the reference code
(G-JWLee/COINCIDE_code, ``COINCIDE_cluster/tinyllava/eval/score/coincide``); the paper variants are switches.

Steps (paper §3.2–3.4, Algorithm 1 in App. G):

1. spherical k-means of the unit vectors ``u`` (Eq. 3) into K clusters (K default ``max(1, round(N / 66))``);
2. transferability proxy ``S_i`` (Eq. 5) from centroid cosines — :func:`transferability`;
3. density ``D_i`` (Eq. 6) — :func:`density`;
4. ``P = softmax(S / D / τ)`` — :func:`selection_probability`;
5. sequential quotas + greedy MMD² prototypes (Eq. 7) — :func:`allocate_and_select`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datasel_ray.clustering import cluster_order
from datasel_ray.methods.budget import resolve_budget

__all__ = [
    "CoincideResult",
    "allocate_and_select",
    "cluster_density",
    "cluster_kernel_sums",
    "cluster_prototypes",
    "cluster_quotas",
    "default_num_clusters",
    "density",
    "greedy_mmd",
    "match_member",
    "selection_probability",
    "select",
    "transfer_columns",
    "transferability",
    "transferability_block",
    "transferability_from_sums",
    "unit_rows",
    "would_select_new",
]

_BLOCK = 1024  # rows per block in blocked kernel / cosine computations
TRANSFER_BLOCK = _BLOCK  # centroids per block of Eq. 5's cosine matrix (library and pipeline merge the same blocks)
_DENSE_MMD_MAX = 2048  # clusters up to this size use one dense kernel matrix in greedy MMD


def default_num_clusters(n: int) -> int:
    """K = max(1, round(N / 66)) (reference: K = 10,000 for LLaVA-665k), clipped to N."""
    return max(1, min(n, round(n / 66)))


def _check_x(x, name: str = "x") -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1 or not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array [N, d] with N, d >= 1, got shape {a.shape}, dtype {a.dtype}")
    return a


def _check_labels(labels, n: int, k: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an int array [{n}], got shape {lab.shape}, dtype {lab.dtype}")
    if n and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels must lie in [0, k={k}), got range [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------- Eq. 5


def transfer_columns(width: int, n_layers: int | None, mode: str = "reference") -> np.ndarray:
    """Columns of a centroid (float[K, width]) that transferability (Eq. 5) compares: int64[F'].

    ``"reference"`` (code): the text halves ``t_l`` of every layer of the ``concat_l [v_l, t_l]`` layout
    (``width = n_layers * 2 * h``, F' = width / 2); ``"paper"``: every column (F' = width)."""
    if mode == "paper":
        return np.arange(width, dtype=np.int64)
    if mode != "reference":
        raise ValueError(f"mode must be 'reference' or 'paper', got {mode!r}")
    if n_layers is None or int(n_layers) < 1 or width % (2 * int(n_layers)):
        raise ValueError(f"n_layers must be a positive integer dividing centroids.shape[1] / 2 "
                         f"(F = {width}) in reference mode, got {n_layers!r}")
    h = width // (2 * int(n_layers))
    return (np.arange(int(n_layers))[:, None] * 2 * h + h + np.arange(h)[None, :]).reshape(-1)


def unit_rows(c: np.ndarray) -> np.ndarray:
    """float64 copy of ``c`` [K, F'] with unit rows; a zero row stays zero (cosine 0 with everything, as
    sklearn's ``cosine_similarity``)."""
    u = np.array(c, dtype=np.float64)
    norms = np.linalg.norm(u, axis=1)
    u /= np.where(norms > 0, norms, 1.0)[:, None]
    return u


def transferability_block(a: np.ndarray, b: np.ndarray, offset: int, mode: str = "reference",
                          cos_threshold: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Mergeable partial sums of Eq. 5 for unit rows ``a`` [Ba, F'] (global rows ``s..``) against unit rows ``b``
    [Bb, F'] (global rows ``t..``), ``offset = s - t``: ``(tot, cnt)``, float64[Ba] and int64[Ba].

    ``"reference"``: cosines ``C_ij <= cos_threshold`` summed and counted (the mask drops the self pair of a
    non-zero row and near-duplicates); ``"paper"``: every ``C_ij`` with ``j != i`` summed, counted."""
    cos = a @ b.T
    if mode == "reference":
        keep = ~(cos > cos_threshold)
        return np.where(keep, cos, 0.0).sum(1), keep.sum(1).astype(np.int64)
    rows = np.arange(len(a))
    self_col = rows + offset
    on = (self_col >= 0) & (self_col < len(b))
    cos[rows[on], self_col[on]] = 0.0
    return cos.sum(1), np.full(len(a), len(b), dtype=np.int64) - on


def transferability_from_sums(tot: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """S (float64[K]) from the merged :func:`transferability_block` sums: ``tot / cnt``, 0 where nothing is
    counted (the reference's 0/0 when every pair is masked; the paper's K = 1)."""
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)


def transferability(centroids: np.ndarray, n_layers: int | None = None, mode: str = "reference",
                    cos_threshold: float = 0.9) -> np.ndarray:
    """Transferability proxy S (Eq. 5): mean cosine of each centroid to the other centroids.

    Args:
        centroids: float[K, F]. In ``"reference"`` mode ``F = n_layers * 2 * h`` laid out as
            ``concat_l [v_l, t_l]`` (visual half, then text half, per layer).
        n_layers: number of hooked layers (reference mode only).
        mode: ``"reference"`` (default, code): keep only the text halves ``t_l`` of every layer, cosine matrix
            C (a zero vector has cosine 0 with everything, as sklearn's ``cosine_similarity``), mask pairs with
            ``C > cos_threshold`` — this masks the self pair of every non-zero centroid and near-duplicates —
            and average the rest: ``S_i = Σ_{j: C_ij <= thr} C_ij / #{j: C_ij <= thr}``. If nothing remains
            (the code would give 0/0), ``S_i = 0``. ``"paper"``: full centroids, ``S_i = mean_{j != i} C_ij``
            (``S = 0`` when K = 1).
        cos_threshold: reference mask threshold (0.9).

    Returns:
        float64[K]. Summed over ``TRANSFER_BLOCK`` x ``TRANSFER_BLOCK`` blocks of C in row-block then column-block order
        (:func:`transferability_block`), the order the partitioned pipeline merges in: O(K · F' + block²)
        memory, O(K² F') time.
    """
    c = _check_x(centroids, "centroids")
    K, F = c.shape
    u = unit_rows(c[:, transfer_columns(F, n_layers, mode)])
    tot = np.zeros(K, dtype=np.float64)
    cnt = np.zeros(K, dtype=np.int64)
    B = TRANSFER_BLOCK
    for s in range(0, K, B):
        for t in range(0, K, B):
            part_tot, part_cnt = transferability_block(u[s:s + B], u[t:t + B], s - t, mode, cos_threshold)
            tot[s:s + B] += part_tot
            cnt[s:s + B] += part_cnt
    return transferability_from_sums(tot, cnt)


# ------------------------------------------------------------------------------------------- Eq. 6


def _kernel_block(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray, sigma: float) -> np.ndarray:
    """exp(-(|a|² + |b|² - 2 a·b) / (2σ²)) — the reference's expansion form (float64)."""
    return np.exp(-(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)) / (2.0 * sigma * sigma))


def cluster_kernel_sums(xc: np.ndarray, sigma: float) -> np.ndarray:
    """Per member, ``Σ_{b∈C} exp(-|u_a - u_b|² / (2σ²))`` (float64[|C|]) — the column sums of the cluster's
    kernel matrix, used by density (Eq. 6) and by greedy MMD.

    ``xc``: float[|C|, d] in any float dtype (fp16 as stored); converted to float64 one block of ``_BLOCK`` rows
    at a time on both sides, so memory is O(|C| d) in the input dtype plus O(block²) — never |C| x |C| or a
    float64 copy of the cluster. Fixed blocks: the result does not depend on where the cluster was read.
    """
    n = len(xc)
    sums = np.zeros(n)
    for s in range(0, n, _BLOCK):
        a = np.asarray(xc[s:s + _BLOCK], dtype=np.float64)
        a_sq = np.einsum("ij,ij->i", a, a)
        for t in range(0, n, _BLOCK):
            b = a if t == s else np.asarray(xc[t:t + _BLOCK], dtype=np.float64)
            b_sq = a_sq if t == s else np.einsum("ij,ij->i", b, b)
            sums[s:s + _BLOCK] += _kernel_block(a, b, a_sq, b_sq, sigma).sum(1)
    return sums


def cluster_density(xc: np.ndarray, sigma: float) -> float:
    """Density D (Eq. 6) of one non-empty cluster: the mean of :func:`cluster_kernel_sums` over ``|C|``."""
    return float(cluster_kernel_sums(xc, sigma).sum() / (len(xc) * len(xc)))


def density(x: np.ndarray, labels: np.ndarray, k: int, sigma: float = 1.0) -> np.ndarray:
    """Cluster density D (Eq. 6), reference form: ``D_c = mean_{a,b ∈ C} exp(-|u_a - u_b|² / (2σ²))``.

    The mean runs over all ordered pairs *including* the diagonal (reference code; the paper text says "two
    distinct data points"). float64 throughout, as the reference.

    Args:
        x: float[N, d] vectors (cast to float64 one cluster at a time).
        labels: int[N] in ``[0, k)``.
        k: number of clusters.
        sigma: Gaussian kernel width (reference ``--gamma`` = 1.0).

    Returns:
        float64[k]; NaN for empty clusters, 1.0 for single-member clusters. Memory O(block² + |C| d) per
        cluster (see :func:`cluster_kernel_sums`), time O(Σ_c |C|² d) = O(N · max|C| · d).
    """
    x = _check_x(x)
    lab = _check_labels(labels, x.shape[0], int(k))
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    order, starts = cluster_order(lab, int(k))
    out = np.full(int(k), np.nan)
    for c in range(int(k)):
        idx = order[starts[c]:starts[c + 1]]
        if len(idx):
            out[c] = cluster_density(x[idx], float(sigma))
    return out


def selection_probability(S: np.ndarray, D: np.ndarray, temperature: float = 0.1) -> np.ndarray:
    """Cluster sampling distribution ``P = softmax(S / D / τ)`` over clusters with finite D (float64[K]).

    Clusters with NaN density (empty) get P = 0. Reference: ``score = S / D``, ``ratio = softmax(score / temp)``.
    """
    S = np.asarray(S, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if S.shape != D.shape or S.ndim != 1:
        raise ValueError(f"S and D must be 1-D arrays of the same shape, got {S.shape} and {D.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = np.isfinite(D)
    P = np.zeros(len(S))
    if valid.any():
        z = S[valid] / D[valid] / temperature
        e = np.exp(z - z.max())
        P[valid] = e / e.sum()
    return P


# ------------------------------------------------------------------------------------------- Eq. 7


def greedy_mmd(xc: np.ndarray, m: int, sigma: float = 1.0) -> np.ndarray:
    """Greedy MMD² prototypes of one cluster (Eq. 7; Kim et al. 2016), incremental O(n) per step.

    Picks ``m`` rows of ``xc`` (float[n, d]) one at a time, each minimising
    ``MMD²(S ∪ c) = K̄_XX + (ΣK_SS + 2 Σ_{s∈S} K_sc + K_cc)/(k+1)² − 2 (Σ_{s∈S} colsum_s + colsum_c)/(n (k+1))``
    with ``colsum_c = Σ_{x∈X} K_xc`` — the same choice as the reference's from-scratch recomputation. Ties go to
    the lowest row index.

    Memory: clusters with n <= 2048 use one dense n x n kernel; larger ones never build it (colsum in row
    blocks, O(n · block); then one kernel row O(n d) per step). Time O(n² d + m n d).

    Returns:
        int64[m] positions into ``xc`` in selection order.
    """
    xc = np.asarray(xc, dtype=np.float64)
    n = len(xc)
    m = int(min(m, n))
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    sq = np.einsum("ij,ij->i", xc, xc)
    dense = n <= _DENSE_MMD_MAX
    if dense:
        K = _kernel_block(xc, xc, sq, sq, sigma)
        colsum = K.sum(0)
        kcc = np.diagonal(K).copy()
    else:
        colsum = np.zeros(n)
        for s in range(0, n, _BLOCK):
            colsum += _kernel_block(xc[s:s + _BLOCK], xc, sq[s:s + _BLOCK], sq, sigma).sum(0)
        kcc = np.exp(-(sq + sq - 2.0 * sq) / (2.0 * sigma * sigma))
    ksc = np.zeros(n)  # Σ_{s∈S} K_sc
    taken = np.zeros(n, dtype=bool)
    out = np.empty(m, dtype=np.int64)
    for step in range(m):
        k1 = step + 1
        f = (2.0 * ksc + kcc) / (k1 * k1) - 2.0 * colsum / (n * k1)
        f[taken] = np.inf
        c = int(np.argmin(f))
        out[step] = c
        taken[c] = True
        if step + 1 < m:
            ksc += K[c] if dense else _kernel_block(xc[c:c + 1], xc, sq[c:c + 1], sq, sigma)[0]
    return out


def cluster_quotas(sizes: np.ndarray, S: np.ndarray, D: np.ndarray, budget: int,
                   temperature: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequential cluster quotas of Algorithm 1 (reference ``cluster_wise_prune.py``); they depend only on sizes.

    Non-empty clusters (finite D) are processed in descending ``score = S / D`` (= descending P; ties: lowest
    cluster id — the reference's reversed argsort would take the highest). With ``remaining = budget``:
    ``q = round(remaining · P̃_i)`` (Python round, half to even, as the reference), where ``P̃_i`` is the softmax
    of ``score / τ`` over this and all not-yet-processed clusters; the cluster gives ``min(q, |C_i|)`` rows (all of
    it when ``q > |C_i|``, else ``q`` greedy MMD prototypes); ``remaining -= taken``. The total is at most
    ``budget`` (shortfalls flow to later clusters).

    Args:
        sizes: int[K] cluster sizes; S, D: float[K]; budget: rows (int >= 0); temperature τ > 0.

    Returns:
        ``(quota int64[K], order int64[K'], whole bool[K])``: rows taken per cluster, the processing order of
        non-empty clusters, and whether a cluster's ``q`` exceeded its size (then it is taken whole, in row order,
        without greedy MMD — as the reference).
    """
    S = np.asarray(S, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    K = len(S)
    if D.shape != (K,) or sizes.shape != (K,):
        raise ValueError(f"D and sizes must have shape ({K},) like S, got {D.shape} and {sizes.shape}")
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"budget must be an integer >= 0, got {budget!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = np.flatnonzero(np.isfinite(D) & (sizes > 0))
    score = S[valid] / D[valid]
    proc = valid[np.lexsort((valid, -score))]
    z = (S[proc] / D[proc]) / temperature
    e = np.exp(z - z.max()) if len(z) else z
    suffix = np.cumsum(e[::-1])[::-1]  # Σ_{j >= i} e_j : re-softmax over the clusters not yet processed
    remaining = int(budget)
    quota = np.zeros(K, dtype=np.int64)
    whole = np.zeros(K, dtype=bool)
    for i, c in enumerate(proc):
        q = round(remaining * (e[i] / suffix[i]))
        whole[c] = q > sizes[c]
        quota[c] = min(q, int(sizes[c]))
        remaining -= int(quota[c])
    return quota, proc.astype(np.int64), whole


def cluster_prototypes(xc: np.ndarray, quota: int, whole: bool, sigma: float) -> np.ndarray:
    """The rows one cluster gives to the selection, in pick order (int64 positions into ``xc``): every row in row
    order when ``whole`` (the reference's ``q > |C|``), else :func:`greedy_mmd` of ``quota`` rows."""
    if whole:
        return np.arange(len(xc), dtype=np.int64)
    return greedy_mmd(xc, int(quota), sigma)


@dataclass
class _Allocation:
    selected: np.ndarray  # int64, selection order
    quota: np.ndarray  # int64[K], rows taken per cluster
    order: np.ndarray  # int64[K'], processing order of non-empty clusters
    pick_rank: np.ndarray  # int64[N], position in ``selected`` or -1


def allocate_and_select(x: np.ndarray, labels: np.ndarray, S: np.ndarray, D: np.ndarray, budget: int,
                        temperature: float = 0.1, sigma: float = 1.0) -> _Allocation:
    """Cluster quotas (:func:`cluster_quotas`) and greedy MMD prototypes (:func:`cluster_prototypes`) of
    Algorithm 1 on in-memory vectors; the selection lists each processed cluster's picks in processing order.

    Args:
        x: float[N, d]; labels: int[N] in [0, K); S, D: float[K] (NaN D = empty cluster, skipped);
        budget: rows (int >= 0); temperature τ; sigma: kernel width.

    Returns:
        an object with ``selected`` (int64, selection order), ``quota`` (int64[K]), ``order`` (processing order of
        the non-empty clusters) and ``pick_rank`` (int64[N], position of each row in ``selected``, -1 if not).
    """
    x = _check_x(x)
    K = len(np.asarray(S))
    lab = _check_labels(labels, x.shape[0], K)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    order_rows, starts = cluster_order(lab, K)
    quota, proc, whole = cluster_quotas(np.diff(starts), S, D, budget, temperature)
    chosen = []
    for c in proc:
        members = order_rows[starts[c]:starts[c + 1]]
        chosen.append(members[cluster_prototypes(x[members], int(quota[c]), bool(whole[c]), sigma)])
    selected = np.concatenate(chosen).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)
    pick_rank = np.full(x.shape[0], -1, dtype=np.int64)
    pick_rank[selected] = np.arange(len(selected))
    return _Allocation(selected, quota, proc, pick_rank)


# ------------------------------------------------------------------------------------------- online


def match_member(u: np.ndarray, members: np.ndarray, tolerance: float) -> int | None:
    """Position of the member of ``members`` (float[m, F]) with the highest cosine to ``u`` (float[F]) when
    ``1 - cos <= tolerance`` (the same pool row re-extracted), else None; exact ties go to the lowest position."""
    if len(members) == 0:
        return None
    m = np.asarray(members, dtype=np.float64)
    norms = np.linalg.norm(m, axis=1)
    u = np.asarray(u, dtype=np.float64)
    cos = (m @ u) / np.maximum(norms * np.linalg.norm(u), 1e-300)
    best = int(np.argmax(cos))
    return best if 1.0 - float(cos[best]) <= tolerance else None


def would_select_new(u: np.ndarray, members: np.ndarray, quota: int, whole: bool, sigma: float = 1.0) -> bool:
    """Whether a new sample would be picked by its cluster (the online rule of COINCIDE, Algorithm 1).

    The cluster keeps the run's quota ``q`` (its share of the budget); the sample would be selected when the
    cluster gave nothing (``q = 0``: False), was taken whole (``whole``, the reference's ``q > |C|``: True), or
    else when greedy MMD over ``members ∪ {u}`` with ``q`` prototypes picks it. Ties in the greedy order go to the lower position, and the
    sample is placed after the members (a tie with a member goes to the member). O(|C|² d) per call.
    """
    n = len(members)
    if quota <= 0:
        return False
    if whole:
        return True
    xc = np.concatenate([np.asarray(members, dtype=np.float64), np.asarray(u, dtype=np.float64)[None]])
    return bool(n in set(greedy_mmd(xc, int(quota), sigma).tolist()))


# ------------------------------------------------------------------------------------------- top level


@dataclass
class CoincideResult:
    """Output of :func:`select`.

    selected: int64[B'] row positions (0-based into x) in selection order (B' <= budget).
    labels: int64[N] cluster of each row. centroids: float32[K, F'] (F' = reduce_dim or F).
    cluster_size: int64[K]; cluster_S, cluster_D, cluster_P: float64[K] (D NaN and P 0 for empty clusters);
    cluster_quota: int64[K] rows selected per cluster; cluster_order: int64[K'] processing order.
    row_S, row_D, row_P: float64[N] values of each row's cluster; row_rank: int64[N] position in ``selected``
    (-1 = not selected).
    """

    selected: np.ndarray
    labels: np.ndarray
    centroids: np.ndarray
    cluster_size: np.ndarray
    cluster_S: np.ndarray
    cluster_D: np.ndarray
    cluster_P: np.ndarray
    cluster_quota: np.ndarray
    cluster_order: np.ndarray
    row_S: np.ndarray
    row_D: np.ndarray
    row_P: np.ndarray
    row_rank: np.ndarray


def select(x: np.ndarray, budget: float | int, config=None, seed: int = 1234, *, n_layers: int | None = None,
           labels: np.ndarray | None = None, centroids: np.ndarray | None = None, S: np.ndarray | None = None,
           D: np.ndarray | None = None) -> CoincideResult:
    """Run COINCIDE end to end on float[N, F] vectors ``x`` (the ``coincide_vector`` column).

    Args:
        x: float[N, F], F = n_layers * 2 * hidden, unit-norm rows (zero rows allowed).
        budget: fraction (< 1) or row count (>= 1); see :func:`~datasel_ray.methods.budget.resolve_budget`.
            (The reference uses ``int(fraction * N)``; we round like ``SelectConfig.budget_rows``.)
        config: :class:`datasel_ray.config.CoincideConfig` (None = defaults).
        seed: k-means seed used when ``config.seed`` is None.
        n_layers: number of hooked layers; required for ``transferability="reference"``.
        labels, centroids: precomputed clustering (e.g. from the aggregate phase); when given, k-means is skipped.
            Transferability then uses ``centroids`` (which must be in the space expected by the mode).
        S, D: precomputed per-cluster transferability and density (float[K], from the aggregate phase's stats);
            when given with ``labels``, they are not recomputed.

    Density and MMD always use ``x`` itself (not the reduced space). Transferability uses only the centroids of
    non-empty clusters (an empty cluster's centroid is no concept-skill composition); empty clusters get S = 0.
    """
    from datasel_ray.clustering import cluster_means, spherical_kmeans
    from datasel_ray.config import CoincideConfig

    cfg = config if config is not None else CoincideConfig()
    x = _check_x(x)
    n = x.shape[0]
    B = resolve_budget(budget, n)
    if labels is None:
        k = cfg.num_clusters if cfg.num_clusters is not None else default_num_clusters(n)
        centroids, labels = spherical_kmeans(
            x, k, niter=cfg.niter, seed=cfg.seed if cfg.seed is not None else seed, train_sample=cfg.train_sample,
            reduce_dim=cfg.reduce_dim, reduce_method=cfg.reduce_method)
        if cfg.reduce_dim is not None and cfg.reduce_dim < x.shape[1]:
            # S is a property of the original feature space (and the reference mode needs its layer layout):
            # clustering-space centroids are replaced by original-space cluster means, as in the pipeline
            centroids = cluster_means(x, labels, len(centroids)).astype(np.float32)
    elif centroids is None:
        raise ValueError("centroids must be given together with labels")
    centroids = _check_x(centroids, "centroids")
    K = centroids.shape[0]
    labels = _check_labels(labels, n, K)
    size = np.bincount(labels, minlength=K).astype(np.int64)
    nonempty = np.flatnonzero(size)
    if S is None:
        S = np.zeros(K)
        S[nonempty] = transferability(centroids[nonempty], n_layers, cfg.transferability, cfg.cos_threshold)
    if D is None:
        D = density(x, labels, K, cfg.sigma)
    S = np.asarray(S, dtype=np.float64)
    D = np.asarray(D, dtype=np.float64)
    if S.shape != (K,) or D.shape != (K,):
        raise ValueError(f"S and D must have shape ({K},), got {S.shape} and {D.shape}")
    P = selection_probability(S, D, cfg.temperature)
    alloc = allocate_and_select(x, labels, S, D, B, cfg.temperature, cfg.sigma)
    return CoincideResult(
        selected=alloc.selected, labels=labels, centroids=np.asarray(centroids, dtype=np.float32),
        cluster_size=size, cluster_S=S, cluster_D=D, cluster_P=P, cluster_quota=alloc.quota,
        cluster_order=alloc.order, row_S=S[labels], row_D=D[labels], row_P=P[labels], row_rank=alloc.pick_rank)
