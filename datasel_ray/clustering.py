"""Clustering kernels: spherical k-means (COINCIDE) and Ward hierarchical clustering (DataTailor).

Pure numpy + faiss / scipy; no Ray, torch or I/O.

* :func:`spherical_kmeans` — COINCIDE §3.2 ("spherical k-means on u"), reference code
  ``faiss.Kmeans(d, K, niter=50, seed=1234, spherical=True)`` followed by nearest-centroid assignment
  (L2 search; on unit vectors the same as the largest inner product).
* :func:`spherical_kmeans_numpy` — a plain Lloyd reference of the same algorithm (tests compare it with faiss).
* :func:`ward_clusters` — DataTailor App. B.1 cross-modal domain clustering: Ward linkage on Euclidean distances
  cut at a fraction of the root merge height. Three paths so that no N x N matrix is built for large tasks.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "apply_projection",
    "assign_nearest",
    "fit_projection",
    "kmeans_train_rows",
    "normalize_rows",
    "projection_rows",
    "reduce_dimension",
    "spherical_kmeans",
    "spherical_kmeans_numpy",
    "train_spherical_kmeans",
    "ward_clusters",
    "ward_cut_threshold",
    "weighted_ward_linkage",
]

_ASSIGN_BLOCK = 65536


def _as_2d_float(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D float array [N, d] with N >= 1 and d >= 1, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Return float32[N, d] rows scaled to unit L2 norm; all-zero rows stay zero. Works in row blocks."""
    out = np.empty(x.shape, dtype=np.float32)
    for s in range(0, x.shape[0], _ASSIGN_BLOCK):
        b = np.asarray(x[s:s + _ASSIGN_BLOCK], dtype=np.float32)
        norms = np.linalg.norm(b, axis=1, keepdims=True)
        np.divide(b, norms, out=out[s:s + _ASSIGN_BLOCK], where=norms > 0)
        out[s:s + _ASSIGN_BLOCK][(norms == 0)[:, 0]] = 0.0
    return out


def projection_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted row positions a PCA projection trains on (``rng(seed).choice(n, train_sample)``), None = all."""
    if train_sample is None or train_sample >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(train_sample), replace=False))


def kmeans_train_rows(n: int, k: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted row positions spherical k-means trains on: ``max(train_sample, k)`` seeded rows, None = all."""
    if train_sample is None or train_sample >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max(int(train_sample), int(k)), replace=False))


def fit_projection(d: int, dim: int, method: str = "random", seed: int = 1234,
                   train: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An affine map ``y = x @ A.T + b`` from ``d`` to ``dim`` dims: ``(A float32[dim, d], b float32[dim])``.

    ``method="random"`` (default): seeded Gaussian random projection ``A = G.T``, ``G ~ N(0, 1/dim)^{d x dim}``
    (Johnson–Lindenstrauss; inner products preserved in expectation), ``b = 0``. Memory and time linear in ``d``;
    needs no data. ``method="pca"``: ``faiss.PCAMatrix(d, dim)`` trained on ``train`` (float[n, d]); its
    covariance eigendecomposition costs O(d³), so it is for small ``d`` only.
    Not part of COINCIDE; an option for pools whose vectors are too wide to cluster directly.
    """
    if method == "random":
        g = np.random.default_rng(seed).standard_normal((d, dim)) / np.sqrt(dim)
        return np.ascontiguousarray(g.T, dtype=np.float32), np.zeros(dim, dtype=np.float32)
    if method == "pca":
        import faiss

        if train is None:
            raise ValueError("reduce_method 'pca' needs training rows")
        pca = faiss.PCAMatrix(d, dim)
        pca.train(np.ascontiguousarray(train, dtype=np.float32))
        A = faiss.vector_to_array(pca.A).reshape(dim, d)
        b = faiss.vector_to_array(pca.b)
        return np.ascontiguousarray(A, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    raise ValueError(f"reduce_method must be 'random' or 'pca', got {method!r}")


def apply_projection(x: np.ndarray, A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32[N, dim] = ``x @ A.T + b`` in row blocks (``x`` in any float dtype)."""
    out = np.empty((x.shape[0], A.shape[0]), dtype=np.float32)
    for s in range(0, x.shape[0], _ASSIGN_BLOCK):
        out[s:s + _ASSIGN_BLOCK] = np.asarray(x[s:s + _ASSIGN_BLOCK], dtype=np.float32) @ A.T + b
    return out


def reduce_dimension(x: np.ndarray, dim: int, method: str = "random", seed: int = 1234,
                     train_sample: int | None = None) -> np.ndarray:
    """Project float[N, d] to float32[N, dim] before clustering (:func:`fit_projection` +
    :func:`apply_projection`; PCA trains on :func:`projection_rows`). ``dim >= d`` returns ``x`` as float32."""
    n, d = x.shape
    if dim >= d:
        return np.ascontiguousarray(x, dtype=np.float32)
    train = None
    if method == "pca":
        rows = projection_rows(n, train_sample, seed)
        train = x if rows is None else x[rows]
    A, b = fit_projection(d, dim, method, seed, train)
    return apply_projection(x, A, b)


def train_spherical_kmeans(train_unit: np.ndarray, k: int, niter: int, seed: int, use_gpu: bool = False,
                           init_centroids: np.ndarray | None = None) -> np.ndarray:
    """faiss spherical k-means on unit rows ``train_unit`` (float32[n, d]); returns unit centroids float32[k, d]
    (reference ``faiss.Kmeans(d, K, niter, seed, spherical=True)``; every training row is used)."""
    import faiss

    d = train_unit.shape[1]
    km = faiss.Kmeans(d, k, niter=int(niter), seed=int(seed), spherical=True, gpu=bool(use_gpu), verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-train_unit.shape[0] // k)))
    if init_centroids is not None:
        init = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init.shape != (k, d):
            raise ValueError(f"init_centroids must have shape ({k}, {d}), got {init.shape}")
        km.train(train_unit, init_centroids=init)
    else:
        km.train(train_unit)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign_nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> np.ndarray:
    """int64[N] index of the nearest centroid (L2, faiss ``IndexFlatL2``; ties: lowest centroid id), in row blocks."""
    import faiss

    c = np.ascontiguousarray(centroids, dtype=np.float32)
    index = faiss.IndexFlatL2(c.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    labels = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], _ASSIGN_BLOCK):
        _, idx = index.search(np.ascontiguousarray(x[s:s + _ASSIGN_BLOCK], dtype=np.float32), 1)
        labels[s:s + _ASSIGN_BLOCK] = idx[:, 0]
    return labels


def spherical_kmeans(x: np.ndarray, k: int, niter: int = 50, seed: int = 1234, train_sample: int | None = None,
                     reduce_dim: int | None = None, reduce_method: str = "random", use_gpu: bool | None = None,
                     init_centroids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means with faiss (COINCIDE §3.2; reference ``faiss.Kmeans(..., spherical=True)``).

    Args:
        x: float[N, d] (float16 is cast to float32 block-wise). Rows are L2-normalised before clustering
            (COINCIDE vectors already have unit norm; zero rows stay zero and land in some cluster).
        k: number of clusters, clipped to N.
        niter, seed: faiss k-means iterations and seed (reference: 50, 1234).
        train_sample: train on at most this many rows (seeded subsample), then assign every row.
        reduce_dim, reduce_method: optional projection to ``reduce_dim`` dims (``"random"`` or ``"pca"``, see
            :func:`fit_projection`) before normalising and clustering; the centroids live in the reduced space.
        use_gpu: None = GPU faiss when ``faiss.get_num_gpus() > 0``.
        init_centroids: float[k, d'] initial centroids (tests; otherwise faiss's seeded random init).

    Returns:
        ``(centroids float32[k, d'], labels int64[N])``; centroids have unit norm (faiss spherical mode), labels
        are nearest-centroid assignments of all N rows. A cluster may be empty (faiss splits empty clusters
        during training, but the final assignment can still leave one empty).
    """
    import faiss

    x = _as_2d_float(x, "x")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    n = x.shape[0]
    k = min(int(k), n)
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    if reduce_dim is not None:
        x = reduce_dimension(x, int(reduce_dim), reduce_method, seed, train_sample)
    xn = normalize_rows(x)
    rows = kmeans_train_rows(n, k, train_sample, seed)
    train = xn if rows is None else xn[rows]
    centroids = train_spherical_kmeans(train, k, niter, seed, bool(use_gpu), init_centroids)
    labels = assign_nearest(xn, centroids, use_gpu=bool(use_gpu))
    return centroids, labels


def spherical_kmeans_numpy(x: np.ndarray, init_centroids: np.ndarray, niter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Plain spherical Lloyd k-means (reference for tests): float64, dense, small inputs only.

    Each iteration assigns every row to its nearest centroid in L2 (ties: lowest id), then sets each centroid to
    the normalised mean of its members; an empty cluster keeps its previous centroid. Returns
    ``(centroids float64[k, d], labels int64[N])`` where labels are the assignment to the final centroids.
    """
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.where(norms > 0, x / np.where(norms > 0, norms, 1), 0.0)
    c = np.array(init_centroids, dtype=np.float64)

    def assign(cent):
        d2 = ((x[:, None, :] - cent[None, :, :]) ** 2).sum(-1)
        return np.argmin(d2, axis=1).astype(np.int64)

    for _ in range(niter):
        lab = assign(c)
        for j in range(len(c)):
            m = lab == j
            if m.any():
                s = x[m].sum(0)
                nrm = np.linalg.norm(s)
                if nrm > 0:
                    c[j] = s / nrm
    return c, assign(c)


# --------------------------------------------------------------------------------------------- Ward


def ward_cut_threshold(root_height: float, cut: str, cut_ratio: float) -> float:
    """Cut height for a Ward tree whose root merge height is ``root_height``.

    Heights are scipy Ward heights ``h = sqrt(2 * ΔSSE)``.
    ``cut="reference"`` (DataTailor code, default): ``t = cut_ratio * h_max``  (i.e. ΔSSE <= cut_ratio² ΔSSE_max).
    ``cut="paper"`` (App. B.1, "split where the variance increase exceeds λ·max"): ΔSSE <= λ·ΔSSE_max
    ⇔ ``t = sqrt(cut_ratio) * h_max``.
    """
    if cut == "reference":
        return float(cut_ratio) * float(root_height)
    if cut == "paper":
        return float(np.sqrt(cut_ratio)) * float(root_height)
    raise ValueError(f"cut must be 'reference' or 'paper', got {cut!r}")


def _labels_from_linkage(z: np.ndarray, cut: str, cut_ratio: float) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster

    t = ward_cut_threshold(z[-1, 2], cut, cut_ratio)
    return fcluster(z, t=t, criterion="distance").astype(np.int64) - 1


def weighted_ward_linkage(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Ward linkage of m weighted points (each a pre-cluster of ``weights[i]`` rows at centroid ``points[i]``).

    Returns a scipy-format linkage matrix float64[m-1, 4] whose heights are ``sqrt(2 ΔSSE)`` of the weighted
    problem, i.e. exactly what scipy's Ward would give if every pre-cluster were expanded into ``weights[i]``
    coincident rows. Nearest-neighbour-chain algorithm on a dense m x m matrix of squared Ward distances with
    the Lance–Williams update: O(m²) memory and O(m²) time after the O(m² d) initial distances. Meant for
    m up to a few thousand.
    """
    from scipy.spatial.distance import cdist

    p = np.asarray(points, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64).copy()
    m = len(p)
    if m == 1:
        return np.zeros((0, 4))
    d2 = cdist(p, p, "sqeuclidean")
    # squared Ward distance between clusters a, b: 2 n_a n_b / (n_a + n_b) * |mu_a - mu_b|^2
    dw = 2.0 * d2 * (w[:, None] * w[None, :]) / (w[:, None] + w[None, :])
    np.fill_diagonal(dw, np.inf)
    alive = np.ones(m, dtype=bool)
    node = np.arange(m)  # scipy cluster id held in each slot
    leaves = np.ones(m, dtype=np.int64)  # number of points (pre-clusters) under each slot, for scipy's format
    merges = []
    chain: list[int] = []
    while alive.sum() > 1:
        if not chain:
            chain.append(int(np.flatnonzero(alive)[0]))
        a = chain[-1]
        row = dw[a]
        b = int(np.argmin(np.where(alive, row, np.inf)))
        if len(chain) > 1 and row[chain[-2]] <= row[b]:
            b = chain[-2]
        if len(chain) > 1 and b == chain[-2]:
            chain.pop()
            chain.pop()
            h2 = dw[a, b]
            na, nb = w[a], w[b]
            # Lance–Williams for Ward on squared distances
            nk = w
            new = ((na + nk) * dw[a] + (nb + nk) * dw[b] - nk * h2) / (na + nb + nk)
            lo, hi = min(a, b), max(a, b)
            merges.append((node[a], node[b], np.sqrt(max(h2, 0.0)), leaves[a] + leaves[b]))
            leaves[lo] = leaves[a] + leaves[b]
            dw[lo, :] = new
            dw[:, lo] = new
            dw[lo, lo] = np.inf
            dw[hi, :] = np.inf
            dw[:, hi] = np.inf
            alive[hi] = False
            w[lo] = na + nb
            node[lo] = m + len(merges) - 1
        else:
            chain.append(b)
    z = np.array(merges, dtype=np.float64)
    # NN-chain emits merges out of height order; sort and relabel like scipy does.
    order = np.argsort(z[:, 2], kind="stable")
    z = z[order]
    relabel = np.arange(m + len(z))
    relabel[m + order] = m + np.arange(len(z))
    out = z.copy()
    for i in range(len(out)):
        a, b = relabel[int(out[i, 0])], relabel[int(out[i, 1])]
        out[i, 0], out[i, 1] = min(a, b), max(a, b)
    return out


def precluster_train_rows(n: int, train_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions (within a task) the pre-cluster k-means trains on: ``rng(seed).choice(n, train_rows)``
    when the task has more rows, None = all rows."""
    if train_rows is None or n <= train_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(train_rows), replace=False))


def train_preclusters(train: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Euclidean faiss k-means (20 iterations, seeded) of a large task's rows into ``m`` pre-clusters: centroids
    float32[m, d]. Every training row is used."""
    import faiss

    xf = np.ascontiguousarray(train, dtype=np.float32)
    km = faiss.Kmeans(xf.shape[1], m, niter=20, seed=int(seed), verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=max(256, -(-len(xf) // m)))
    km.train(xf)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def precluster_sums(x: np.ndarray, pre: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """float64[m, d] sums and int64[m] counts of rows ``x`` per pre-cluster ``pre`` (int[N] in [0, m)).

    Sums of fp16 inputs are exact in float64 (every fp16 value is a multiple of 2^-24) while they stay below
    2^29 in magnitude, so partial sums of disjoint row sets merge to the same result in any order."""
    sums = np.zeros((m, x.shape[1]))
    _blocked_add(sums, pre, x)
    return sums, np.bincount(pre, minlength=m).astype(np.int64)


def ward_from_preclusters(sums: np.ndarray, counts: np.ndarray, cut: str, cut_ratio: float) -> np.ndarray:
    """Exact weighted Ward (:func:`weighted_ward_linkage`) on the used pre-clusters' means, cut relative to its
    root height: int64[m] Ward label of each pre-cluster, contiguous ``0..K-1`` in label order (-1 = unused)."""
    used = np.flatnonzero(counts)
    out = np.full(len(counts), -1, dtype=np.int64)
    if len(used) == 1:
        out[used] = 0
        return out
    means = sums[used] / counts[used, None]
    lab_used = _labels_from_linkage(weighted_ward_linkage(means, counts[used]), cut, cut_ratio)
    _, out[used] = np.unique(lab_used, return_inverse=True)
    return out


def ward_clusters(x: np.ndarray, cut: str = "reference", cut_ratio: float = 0.1, dense_max_rows: int = 4000,
                  precluster_size: int = 2000, seed: int = 0, precluster_train: int | None = None) -> np.ndarray:
    """Ward clustering of one task's rows, cut relative to the root merge height (DataTailor App. B.1).

    Args:
        x: float[N, d] (last-token hidden states of one task).
        cut, cut_ratio: see :func:`ward_cut_threshold` (default = reference code: ``0.1 * h_max``).
        dense_max_rows: N <= this: exact reference path, ``scipy.cluster.hierarchy.linkage(x, "ward")``
            (O(N²) memory for the condensed distance matrix, as in the reference code) + ``fcluster``.
        precluster_size: larger N: seeded faiss k-means (Euclidean, :func:`train_preclusters`) into
            ``m = min(N, precluster_size)`` pre-clusters, trained on ``precluster_train`` seeded rows at most
            (:func:`precluster_train_rows`; None = all), every row assigned to its nearest pre-centroid, exact
            *weighted* Ward on the pre-cluster means (:func:`ward_from_preclusters`), and every row inherits its
            pre-cluster's label. An approximation of the full tree: rows of one pre-cluster never split.
        seed: k-means seed of the pre-cluster path.

    Returns:
        int64[N] labels ``0..K-1``. N == 1 gives one cluster; all-identical rows give one cluster.
    """
    x = _as_2d_float(x, "x")
    n = x.shape[0]
    if not 0 < cut_ratio <= 1:
        raise ValueError(f"cut_ratio must be in (0, 1], got {cut_ratio}")
    ward_cut_threshold(1.0, cut, cut_ratio)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    if n <= dense_max_rows:
        from scipy.cluster.hierarchy import linkage

        z = linkage(np.asarray(x, dtype=np.float64), method="ward")
        return _labels_from_linkage(z, cut, cut_ratio)
    m = int(min(n, precluster_size))
    rows = precluster_train_rows(n, precluster_train, seed)
    centroids = train_preclusters(x if rows is None else x[rows], m, seed)
    pre = assign_nearest(x, centroids)
    sums, counts = precluster_sums(x, pre, m)
    return ward_from_preclusters(sums, counts, cut, cut_ratio)[pre]


def _blocked_add(sums: np.ndarray, labels: np.ndarray, x: np.ndarray, block: int = 65536) -> None:
    for s in range(0, len(labels), block):
        np.add.at(sums, labels[s:s + block], np.asarray(x[s:s + block], dtype=np.float64))


def cluster_means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean vector of each cluster, float64[k, d], accumulated in row blocks (empty clusters: zeros)."""
    sums = np.zeros((k, x.shape[1]))
    _blocked_add(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    return sums / np.maximum(counts, 1)[:, None]


def cluster_order(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by cluster: ``order`` (int64[N], stable) and ``starts`` (int64[k+1]); cluster c's rows are
    ``order[starts[c]:starts[c + 1]]``."""
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])
    return order, starts
