import numpy as np
import pytest

import oracles
from datasel_ray.config import CoincideConfig
from datasel_ray.methods import coincide as co


def _pool(n, n_layers=2, h=8, n_blobs=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_blobs, n_layers * 2 * h))
    x = centers[rng.integers(0, n_blobs, n)] + 0.6 * rng.normal(size=(n, n_layers * 2 * h))
    x = x.reshape(n, n_layers, 2, h)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return (x.reshape(n, -1) / np.sqrt(2 * n_layers)).astype(np.float32)


@pytest.mark.parametrize("seed,k", [(0, 12), (1, 18)])
def test_select_matches_reference_oracle(seed, k):
    x = _pool(600, seed=seed)
    cfg = CoincideConfig(num_clusters=k)
    res = co.select(x, 0.2, cfg, seed=seed, n_layers=2)
    assert (res.cluster_size > 0).all()
    S_ref = oracles.transferability_reference(res.centroids, 2)
    np.testing.assert_allclose(res.cluster_S, S_ref, atol=1e-12)
    np.testing.assert_allclose(res.cluster_D, oracles.density_dense(x, res.labels, k), atol=1e-10)
    ref = oracles.coincide_prune(x, res.labels, S_ref, 120, 0.1, 1.0)
    np.testing.assert_array_equal(res.selected, ref)
    assert len(res.selected) <= 120 and len(np.unique(res.selected)) == len(res.selected)
    np.testing.assert_allclose(res.cluster_P.sum(), 1.0)
    assert (res.row_rank[res.selected] == np.arange(len(res.selected))).all()


def test_greedy_mmd_matches_cubic_reference_and_hand_case():
    rng = np.random.default_rng(3)
    xc = rng.normal(size=(40, 5)) * 0.7
    K = oracles.gaussian_kernel(xc, xc, 1.0)
    np.testing.assert_array_equal(co.greedy_mmd(xc, 15), oracles.greedy_mmd_selection(K, 15))
    # hand case: points -1, 0, 1 on a line; the first prototype is the middle one, then ties -> lowest index
    pts = np.array([[-1.0], [0.0], [1.0]])
    assert co.greedy_mmd(pts, 1).tolist() == [1]
    assert co.greedy_mmd(pts, 3).tolist() == [1, 0, 2]
    assert co.greedy_mmd(pts, 0).tolist() == []


def test_greedy_mmd_blocked_path_equals_dense(monkeypatch):
    rng = np.random.default_rng(4)
    xc = rng.normal(size=(300, 6))
    dense = co.greedy_mmd(xc, 30)
    monkeypatch.setattr(co, "_DENSE_MMD_MAX", 10)
    monkeypatch.setattr(co, "_BLOCK", 64)
    np.testing.assert_array_equal(co.greedy_mmd(xc, 30), dense)


def test_density_blocked_equals_dense_and_edge_cases(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(500, 7)) / 3
    labels = rng.integers(0, 6, 500)
    labels[labels == 4] = 0  # cluster 4 empty
    labels[7] = 5
    labels[labels == 5] = 3
    labels[7] = 5  # cluster 5 single member
    monkeypatch.setattr(co, "_BLOCK", 32)
    D = co.density(x, labels, 6)
    ref = oracles.density_dense(x, labels, 6)
    np.testing.assert_allclose(D, ref, atol=1e-10)
    assert np.isnan(D[4]) and D[5] == pytest.approx(1.0)
    P = co.selection_probability(np.ones(6), D, 0.1)
    assert P[4] == 0 and P.sum() == pytest.approx(1.0)


def test_two_identical_clusters_equal_S_D_P():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(10, 8))
    far = rng.normal(size=(10, 8)) + 5
    x = np.concatenate([a, a, far])
    labels = np.repeat([0, 1, 2], 10)
    cent = np.stack([a.mean(0), a.mean(0), far.mean(0)])
    S = co.transferability(cent, mode="paper")
    D = co.density(x, labels, 3)
    P = co.selection_probability(S, D)
    assert S[0] == S[1] and D[0] == D[1] and P[0] == pytest.approx(P[1])


@pytest.mark.parametrize("mode", ["reference", "paper"])
def test_transferability_block_sums_merge_to_the_dense_formula(mode, monkeypatch):
    rng = np.random.default_rng(8)
    c = rng.normal(size=(11, 2 * 2 * 4))
    c[3] = 0.0  # a zero centroid: cosine 0 with everything
    c[7] = c[2]  # a duplicate: masked in reference mode
    dense = co.transferability(c, n_layers=2, mode=mode)  # one block (K < TRANSFER_BLOCK)
    monkeypatch.setattr(co, "TRANSFER_BLOCK", 3)  # 4 x 4 blocks, the last ones partial
    blocked = co.transferability(c, n_layers=2, mode=mode)
    if mode == "reference":
        expected = oracles.transferability_reference(c, 2)
    else:
        u = c / np.where(np.linalg.norm(c, axis=1) > 0, np.linalg.norm(c, axis=1), 1)[:, None]
        cos = u @ u.T
        expected = (cos.sum(1) - np.diag(cos)) / (len(c) - 1)
    np.testing.assert_allclose(dense, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(blocked, expected, rtol=1e-12, atol=1e-15)
    assert blocked[3] == 0.0


def test_transferability_reference_text_halves_and_no_image():
    # 2 layers x [visual(3), text(3)]; visual halves of the samples are zero (no image)
    rng = np.random.default_rng(7)
    c = np.zeros((5, 2, 2, 3))
    c[:, :, 1, :] = rng.normal(size=(5, 2, 3))
    flat = c.reshape(5, -1)
    S = co.transferability(flat, n_layers=2)
    np.testing.assert_allclose(S, oracles.transferability_reference(flat, 2), atol=1e-12)
    assert np.isfinite(S).all()
    # visual halves are ignored in reference mode
    c2 = c.copy()
    c2[:, :, 0, :] = rng.normal(size=(5, 2, 3))
    np.testing.assert_allclose(co.transferability(c2.reshape(5, -1), n_layers=2), S, atol=1e-12)
    # all pairs above the threshold -> S = 0 (the code's 0/0)
    same = np.tile(flat[:1], (3, 1))
    assert co.transferability(same, n_layers=2).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="n_layers"):
        co.transferability(flat, n_layers=None)


def test_select_with_empty_cluster_and_zero_rows():
    rng = np.random.default_rng(8)
    x = np.repeat(rng.normal(size=(3, 8)), 10, axis=0).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[:2, :4] = 0  # visual half zero on two rows
    labels = np.repeat([0, 1, 3], 10)  # cluster 2 empty
    cent = np.stack([x[labels == c].mean(0) if (labels == c).any() else np.zeros(8) for c in range(4)])
    res = co.select(x, 9, CoincideConfig(), n_layers=2, labels=labels, centroids=cent)
    assert res.cluster_size[2] == 0 and np.isnan(res.cluster_D[2]) and res.cluster_quota[2] == 0
    assert (labels[res.selected] != 2).all() and len(res.selected) <= 9
    res2 = co.select(x, 9, CoincideConfig(num_clusters=5), n_layers=2)  # 3 distinct points, k = 5
    assert res2.labels.shape == (30,) and len(res2.selected) <= 9


def test_validation_messages():
    with pytest.raises(ValueError, match="x must be a float array"):
        co.density(np.zeros(5), np.zeros(5, dtype=int), 1)
    with pytest.raises(ValueError, match="labels"):
        co.density(np.zeros((5, 2)), np.zeros(4, dtype=int), 1)
    with pytest.raises(ValueError, match="budget"):
        co.allocate_and_select(np.zeros((2, 2)), np.zeros(2, dtype=int), np.zeros(1), np.ones(1), -1)
