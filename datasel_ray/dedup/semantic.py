"""Semantic near-duplicates: SemDeDup (Abbas et al., 2023, §3) as NeMo Curator implements it.

NeMo Curator (``nemo_curator/stages/deduplication/semantic/``): k-means on the embeddings, then per cluster
(``pairwise.py``) the members are ranked (``which_to_keep="hard"``: by cosine distance to the centroid, farthest
first, ties by id, both descending; ``"easy"``: closest first, both ascending), ``pairwise_cosine_similarity_batched``
takes for every member the largest cosine similarity to an EARLIER-ranked member (kept or not: the upper
triangle of the similarity matrix, column max), and ``identify_duplicates.py`` drops every member with
``cosine_sim_score >= 1 - eps``. The first-ranked member of every group is kept. Defaults of
``SemanticDeduplicationWorkflow``: ``eps=0.01``, ``which_to_keep="hard"``, ``n_clusters=100``,
``pairwise_batch_size=1024``.

This module: the same rule on unit float32 rows, compared in blocks of rows so that the workspace of a cluster
is at most ``workspace_bytes`` (two blocks of rows and their similarities) whatever its size; a cluster larger
than memory is read block by block from disk (:func:`earlier_similarity_blocks`). ``pool_order`` is an added
ranking (lowest row id first). Every function is pure numpy (faiss only for the nearest-centroid assignment in
:func:`semantic_dedup`, the in-process reference of the partitioned phase).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["FEATURES", "RANKINGS", "ClusterResult", "block_rows", "cluster_dedup", "earlier_similarity",
           "earlier_similarity_blocks", "feature_vectors", "rank_members", "representatives", "semantic_dedup",
           "source_column"]

RANKINGS = ("hard", "easy", "pool_order")
#: the vectors the semantic pass can compare: a feature column as stored, or ``coincide_visual``, the image halves
#: of the COINCIDE vector (per hooked layer the mean o_proj output over image tokens; zero for text-only rows)
FEATURES = ("coincide_vector", "coincide_visual", "last_token")


def source_column(feature: str) -> str:
    """The ``features/`` column a semantic-pass feature is computed from."""
    if feature not in FEATURES:
        raise ValueError(f"Unknown dedup feature {feature!r}. Choose from: {', '.join(FEATURES)}")
    return "coincide_vector" if feature == "coincide_visual" else feature


def feature_vectors(feature: str, values: np.ndarray, hidden: int) -> np.ndarray:
    """The vectors of ``feature`` from its source column's values (float[N, F] as stored): the column itself, or
    for ``coincide_visual`` the visual halves of COINCIDE's ``concat_l [v_l, t_l]`` layout (each ``hidden`` wide),
    float[N, L * hidden] in the stored dtype."""
    if source_column(feature) == feature:
        return values
    n, width = values.shape
    if width % (2 * hidden):
        raise ValueError(f"coincide_vector width {width} is not a multiple of 2 x hidden ({hidden})")
    return np.ascontiguousarray(values.reshape(n, width // (2 * hidden), 2, hidden)[:, :, 0, :].reshape(n, -1))


def rank_members(cos_to_centroid: np.ndarray, row_ids: np.ndarray, ranking: str) -> np.ndarray:
    """Order of a cluster's members, first = kept first (int64[m] indices into the inputs).

    cos_to_centroid: float[m] cosine similarity of each member to its centroid; row_ids: int64[m].
    ``hard`` (NeMo default): cosine distance ``1 - cos`` descending, then row id descending; ``easy``: both
    ascending; ``pool_order``: row id ascending.
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if ranking == "pool_order":
        return np.argsort(row_ids, kind="stable")
    dist = 1.0 - np.asarray(cos_to_centroid, dtype=np.float64)
    if ranking == "hard":
        return np.lexsort((-row_ids, -dist))
    if ranking == "easy":
        return np.lexsort((row_ids, dist))
    raise ValueError(f"Unknown dedup ranking {ranking!r}. Choose from: {', '.join(RANKINGS)}")


def block_rows(d: int, workspace_bytes: int) -> int:
    """Rows per block of :func:`earlier_similarity_blocks`: the largest R with two float32 blocks of R rows of
    width ``d`` and their R x R similarities within ``workspace_bytes`` (``4 (2 R d + R^2) <= workspace``), at
    least 1. A function of ``d`` and the workspace only, so every path cuts a cluster into the same blocks."""
    return max(1, int(np.sqrt(float(d) * d + workspace_bytes / 4.0) - d))


def earlier_similarity_blocks(read: Callable[[int, int], np.ndarray], m: int, d: int, threshold: float,
                              workspace_bytes: int = 64 << 20
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every row j of a ranked cluster of ``m`` unit rows of width ``d``, the largest cosine similarity to a
    row i < j and that row, plus every pair (i < j) with similarity ``>= threshold``.

    ``read(a, b)`` returns rows ``[a, b)`` in rank order (unit float32[b - a, d]); the cluster is never held
    whole: blocks of :func:`block_rows` rows are compared pairwise (block j against every block up to it), so
    the workspace is two blocks and their similarities, whatever m. Ties go to the earliest row. Returns
    ``(max_sim float32[m], argmax int64[m], pair_i int64[P], pair_j int64[P], pair_sim float32[P])``; row 0 has
    ``max_sim = -inf`` and ``argmax = -1``. Pairs are sorted by (j, i).
    """
    size = min(max(1, m), block_rows(d, workspace_bytes))
    max_sim = np.full(m, -np.inf, dtype=np.float32)
    argmax = np.full(m, -1, dtype=np.int64)
    pi, pj, ps = [], [], []
    for s in range(0, m, size):
        e = min(m, s + size)
        xj = read(s, e)
        found_i, found_j, found_s = [], [], []
        for a in range(0, e, size):
            b = min(e, a + size)
            xi = xj if a == s else read(a, b)
            sim = xi @ xj.T  # [b - a, e - s]: sim[r, c] = <x_{a+r}, x_{s+c}>
            if a == s:
                sim[np.arange(b - a)[:, None] >= np.arange(e - s)[None, :]] = -np.inf
            best = np.argmax(sim, axis=0)
            value = sim[best, np.arange(e - s)]
            better = value > max_sim[s:e]  # strict: an earlier block keeps a tie
            max_sim[s:e][better] = value[better]
            argmax[s:e][better] = best[better] + a
            ii, cc = np.nonzero(sim >= threshold)
            if len(ii):
                found_i.append(ii + a)
                found_j.append(cc + s)
                found_s.append(sim[ii, cc])
        if found_i:
            ii, jj, ss = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
            order = np.lexsort((ii, jj))
            pi.append(ii[order])
            pj.append(jj[order])
            ps.append(ss[order])
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    return max_sim, argmax, cat(pi, np.int64), cat(pj, np.int64), cat(ps, np.float32)


def earlier_similarity(x: np.ndarray, threshold: float, workspace_bytes: int = 64 << 20
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`earlier_similarity_blocks` on rows held in memory: ``x`` unit float32[m, d] in rank order."""
    x = np.asarray(x, dtype=np.float32)
    m, d = x.shape
    return earlier_similarity_blocks(lambda a, b: np.array(x[a:b]), m, d, threshold, workspace_bytes)


def representatives(argmax: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """int64[m] index of the kept row each row resolves to (rank order): a kept row is its own; a dropped row j
    takes the representative of ``argmax[j]`` (< j), so every chain ends at a kept row."""
    rep = np.arange(len(argmax), dtype=np.int64)
    for j in np.flatnonzero(dropped):
        rep[j] = rep[argmax[j]]
    return rep


@dataclass
class ClusterResult:
    """One cluster's decisions, members in rank order (arrays of length m) plus its pairs (length P).

    row_id: int64 ids in rank order; dropped: bool; similarity: float32 largest similarity to an earlier member
    (-inf for the first); duplicate_of: int64 id of that earlier member (-1 for the first); representative:
    int64 id of the kept member it resolves to; pair_a / pair_b: int64 ids (a ranked before b); pair_sim: float32.
    """

    row_id: np.ndarray
    dropped: np.ndarray
    similarity: np.ndarray
    duplicate_of: np.ndarray
    representative: np.ndarray
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_sim: np.ndarray


def cluster_dedup(x_unit: np.ndarray | None, row_ids: np.ndarray, cos_to_centroid: np.ndarray, ranking: str,
                  eps: float, workspace_bytes: int = 64 << 20,
                  read_rows: Callable[[np.ndarray], np.ndarray] | None = None, width: int = 0) -> ClusterResult:
    """NeMo Curator's rule on one cluster: rank (:func:`rank_members`), drop every member whose largest
    similarity to an earlier-ranked member is ``>= 1 - eps``. x_unit: unit float32[m, d]; row_ids int64[m];
    cos_to_centroid float[m]. A cluster kept on disk passes ``x_unit=None``, ``read_rows(indices)`` (unit
    float32 rows of the members at those input indices) and ``width`` (d) instead: the same blocks are compared
    (:func:`earlier_similarity_blocks`), so both give identical results."""
    order = rank_members(cos_to_centroid, row_ids, ranking)
    ids = np.asarray(row_ids, dtype=np.int64)[order]
    threshold = np.float32(1.0 - eps)
    if read_rows is None:
        x = np.asarray(x_unit, dtype=np.float32)
        width = x.shape[1]
        read_rows = (lambda idx: x[idx])  # fancy indexing: a fresh block, as read from disk
    max_sim, argmax, pi, pj, ps = earlier_similarity_blocks(
        lambda a, b: read_rows(order[a:b]), len(ids), width, threshold, workspace_bytes)
    dropped = max_sim >= threshold
    rep = representatives(argmax, dropped)
    return ClusterResult(ids, dropped, max_sim, np.where(argmax >= 0, ids[np.maximum(argmax, 0)], -1), ids[rep],
                         ids[pi], ids[pj], ps)


def semantic_dedup(x: np.ndarray, row_ids: np.ndarray, centroids: np.ndarray, ranking: str = "hard",
                   eps: float = 0.01, workspace_bytes: int = 64 << 20) -> dict[str, np.ndarray]:
    """In-process reference of the partitioned pass: normalise ``x`` (float[N, d]), assign each row to its nearest
    unit centroid (float32[K, d]), :func:`cluster_dedup` per cluster (members in row-id order before ranking, as
    the bucket tasks read them). Returns the concatenated :class:`ClusterResult` fields in cluster order, plus
    ``cluster`` (int64, per member)."""
    from datasel_ray.clustering import assign_nearest, normalize_rows

    unit = normalize_rows(np.asarray(x))
    row_ids = np.asarray(row_ids, dtype=np.int64)
    labels = assign_nearest(unit, centroids)
    cos = np.einsum("ij,ij->i", unit, np.asarray(centroids, dtype=np.float32)[labels])
    order = np.lexsort((row_ids, labels))
    parts: dict[str, list[np.ndarray]] = {}
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = order[lo:hi]
        res = cluster_dedup(unit[rows], row_ids[rows], cos[rows], ranking, eps, workspace_bytes)
        for name, value in vars(res).items():
            parts.setdefault(name, []).append(value)
        parts.setdefault("cluster", []).append(np.full(hi - lo, labels[rows[0]], dtype=np.int64))
    return {name: np.concatenate(values) for name, values in parts.items()}
