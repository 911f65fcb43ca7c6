"""Semantic pass (SemDeDup / NeMo Curator rule) against dense O(N^2) oracles."""

from __future__ import annotations


import numpy as np
import pytest

from datasel_ray.clustering import normalize_rows, spherical_kmeans
from datasel_ray.dedup.semantic import cluster_dedup, earlier_similarity, rank_members, semantic_dedup

from benchmarks.feature_store_gen import generate_features


def dense_pairs(x: np.ndarray, row_ids: np.ndarray, eps: float) -> set[tuple[int, int]]:
    """Oracle: every unordered pair of rows (as sorted row ids) with cosine >= 1 - eps, from the full N x N
    matrix in float64."""
    u = np.asarray(x, dtype=np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    sim = u @ u.T
    i, j = np.nonzero(np.triu(sim >= 1 - eps, k=1))
    return {(min(a, b), max(a, b)) for a, b in zip(row_ids[i].tolist(), row_ids[j].tolist())}


def found_pairs(res: dict) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in zip(res["pair_a"].tolist(), res["pair_b"].tolist())}


def oracle_drops(x_ranked: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The rule row by row: drop j when max_{i<j} cos(x_i, x_j) >= 1 - eps (float64, no blocks)."""
    u = normalize_rows(x_ranked).astype(np.float64)
    m = len(u)
    best = np.full(m, -np.inf)
    arg = np.full(m, -1)
    for j in range(1, m):
        s = u[:j] @ u[j]
        arg[j] = int(np.argmax(s))
        best[j] = s[arg[j]]
    return best >= 1 - eps, arg


@pytest.mark.parametrize("workspace", [4 * 40 * 1, 4 * 40 * 7, 1 << 20])
def test_blocked_earlier_similarity_equals_dense(workspace):
    rng = np.random.default_rng(0)
    x = normalize_rows(rng.standard_normal((40, 6)))
    x[[11, 30]] = x[4]  # exact copies, later in rank order
    x[25] = normalize_rows(x[[11]] + 1e-4)[0]
    max_sim, argmax, pi, pj, ps = earlier_similarity(x, 0.99, workspace)
    dense = x.astype(np.float64) @ x.T.astype(np.float64)
    for j in range(1, 40):
        assert max_sim[j] == pytest.approx(dense[:j, j].max(), abs=1e-5)
        assert dense[argmax[j], j] == pytest.approx(dense[:j, j].max(), abs=1e-5)
    assert max_sim[0] == -np.inf and argmax[0] == -1
    want = {(i, j) for i in range(40) for j in range(i + 1, 40) if dense[i, j] >= 0.99}
    assert set(zip(pi.tolist(), pj.tolist())) == want == {(4, 11), (4, 25), (4, 30), (11, 25), (11, 30), (25, 30)}
    assert np.all(ps >= np.float32(0.99))


def test_rankings_follow_nemo_curator():
    cos = np.array([0.9, 0.5, 0.5, 0.99])
    ids = np.array([10, 30, 20, 5])
    # hard: farthest from the centroid first, ties by id descending
    np.testing.assert_array_equal(ids[rank_members(cos, ids, "hard")], [30, 20, 10, 5])
    np.testing.assert_array_equal(ids[rank_members(cos, ids, "easy")], [5, 10, 20, 30])
    np.testing.assert_array_equal(ids[rank_members(cos, ids, "pool_order")], [5, 10, 20, 30])
    with pytest.raises(ValueError, match="Choose from: hard, easy, pool_order"):
        rank_members(cos, ids, "random")


def test_cluster_dedup_applies_the_rule_and_resolves_representatives():
    rng = np.random.default_rng(1)
    base = normalize_rows(rng.standard_normal((12, 8)))
    x = np.concatenate([base, base[[2, 2, 7]] + 1e-4 * rng.standard_normal((3, 8))]).astype(np.float32)
    ids = np.arange(100, 115, dtype=np.int64)
    cos = rng.random(15)
    res = cluster_dedup(normalize_rows(x), ids, cos, "hard", 0.01, workspace_bytes=4 * 15 * 2)
    order = rank_members(cos, ids, "hard")
    want_drop, want_arg = oracle_drops(x[order], 0.01)
    np.testing.assert_array_equal(res.row_id, ids[order])
    np.testing.assert_array_equal(res.dropped, want_drop)
    assert sorted(res.row_id[res.dropped].tolist()) != []
    assert len(res.row_id[res.dropped]) == 3  # of {102, 112, 113} and {107, 114} one member each is kept
    for j in np.flatnonzero(res.dropped):
        assert res.duplicate_of[j] == ids[order][want_arg[j]]
        kept = res.representative[j]
        assert not res.dropped[res.row_id == kept][0]
        assert {int(kept), int(res.row_id[j])} <= {102, 112, 113} or {int(kept), int(res.row_id[j])} <= {107, 114}


@pytest.fixture(scope="module")
def generated():
    f = generate_features(3000, seed=2, n_tasks=6, columns=["coincide_vector", "last_token"], dup_fraction=0.05)
    return f


@pytest.mark.parametrize("column", ["coincide_vector", "last_token"])
def test_partitioned_pass_finds_nearly_all_oracle_pairs(generated, column):
    x, ids = generated[column], generated["row_id"]
    eps = 0.01
    oracle = dense_pairs(x, ids, eps)
    assert len(oracle) > 50  # the generated store has ~5% near-duplicate rows
    centroids, _ = spherical_kmeans(x, 40, niter=20, seed=3)
    res = semantic_dedup(x, ids, centroids, "hard", eps)
    found = found_pairs(res)
    assert found <= oracle
    assert len(found & oracle) >= 0.95 * len(oracle)


def test_partitioned_pass_equals_the_oracle_when_each_group_lies_in_one_cluster():
    rng = np.random.default_rng(4)
    centres = normalize_rows(rng.standard_normal((6, 16)))
    # 6 far-apart regions, 30 rows each, duplicate groups of 2-4 rows inside each region
    rows, ids = [], []
    for c in range(6):
        pts = centres[c] + 0.3 * rng.standard_normal((30, 16)) / 4
        for start in (0, 10, 20):
            pts[start + 1:start + 1 + rng.integers(1, 4)] = pts[start] + 1e-4 * rng.standard_normal(16)
        rows.append(pts)
    x = np.concatenate(rows).astype(np.float32)
    ids = rng.permutation(1000)[:len(x)].astype(np.int64)
    res = semantic_dedup(x, ids, centres.astype(np.float32), "hard", 0.01)
    region = np.repeat(np.arange(6), 30)
    region_of = dict(zip(ids.tolist(), region.tolist()))
    assert [region_of[i] for i in res["row_id"].tolist()] == res["cluster"].tolist()  # each group in one cluster
    assert found_pairs(res) == dense_pairs(x, ids, 0.01)
    # the drop decisions equal the row-by-row rule within each region in rank order
    for c in range(6):
        member = res["cluster"] == c
        at = {i: k for k, i in enumerate(ids.tolist())}
        want, _ = oracle_drops(x[[at[i] for i in res["row_id"][member].tolist()]], 0.01)
        np.testing.assert_array_equal(res["dropped"][member], want)
