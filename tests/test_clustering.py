import numpy as np
import pytest
from scipy.cluster.hierarchy import linkage

import oracles
from datasel_ray import clustering as cl


def _blobs(n, d=8, k=5, seed=0, scale=0.15):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d))
    x = c[rng.integers(0, k, n)] + scale * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_assignment_step_matches_numpy():
    x = _blobs(500, seed=1)
    rng = np.random.default_rng(2)
    cent = x[rng.choice(500, 7, replace=False)]
    lab = cl.assign_nearest(x, cent)
    ref = np.argmax(x.astype(np.float64) @ cent.astype(np.float64).T, axis=1)
    np.testing.assert_array_equal(lab, ref)


def test_faiss_spherical_kmeans_matches_numpy_lloyd_from_same_init():
    x = _blobs(600, seed=3)
    init = x[:5].copy()
    c_f, l_f = cl.spherical_kmeans(x, 5, niter=20, init_centroids=init)
    c_n, l_n = cl.spherical_kmeans_numpy(x, init, niter=20)
    np.testing.assert_array_equal(l_f, l_n)
    np.testing.assert_allclose(c_f, c_n, atol=1e-4)


@pytest.mark.gpu
def test_gpu_faiss_spherical_kmeans_matches_numpy_lloyd_from_same_init():
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("this faiss build has no GPU support (faiss.get_num_gpus() == 0; the project pins faiss-cpu): "
                    "install faiss-gpu to test the GPU k-means path")
    x = _blobs(600, seed=3)
    init = x[:5].copy()
    c_g, l_g = cl.spherical_kmeans(x, 5, niter=20, init_centroids=init, use_gpu=True)
    c_n, l_n = cl.spherical_kmeans_numpy(x, init, niter=20)
    np.testing.assert_array_equal(l_g, l_n)
    np.testing.assert_allclose(c_g, c_n, atol=1e-4)
    np.testing.assert_array_equal(cl.assign_nearest(x, c_g, use_gpu=True), cl.assign_nearest(x, c_g))


def test_spherical_kmeans_contract():
    x = _blobs(300, seed=4)
    c, lab = cl.spherical_kmeans(x, 10, seed=1)
    c2, lab2 = cl.spherical_kmeans(x, 10, seed=1)
    np.testing.assert_array_equal(lab, lab2)
    assert c.shape == (10, 8) and lab.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    c, lab = cl.spherical_kmeans(x[:3], 10)  # k clipped to N
    assert c.shape[0] == 3
    c, lab = cl.spherical_kmeans(x, 4, reduce_dim=4, reduce_method="random", train_sample=100)
    assert c.shape == (4, 4) and lab.shape == (300,)
    c, lab = cl.spherical_kmeans(x, 4, reduce_dim=3, reduce_method="pca")
    assert c.shape == (4, 3)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        cl.spherical_kmeans(np.zeros(5, np.float32), 2)


def test_ward_dense_matches_reference_and_cut_variants():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 4)) + np.repeat(rng.normal(size=(4, 4)) * 6, 50, axis=0)
    np.testing.assert_array_equal(cl.ward_clusters(x), oracles.ward_reference(x))
    z = linkage(x, "ward")
    assert cl.ward_cut_threshold(z[-1, 2], "paper", 0.1) == pytest.approx(np.sqrt(0.1) * z[-1, 2])
    assert cl.ward_clusters(x, cut="paper").max() <= cl.ward_clusters(x).max()
    assert cl.ward_clusters(x[:1]).tolist() == [0]
    assert cl.ward_clusters(np.ones((5, 3))).tolist() == [0] * 5


def test_weighted_ward_equals_scipy_on_expanded_points():
    rng = np.random.default_rng(6)
    p = rng.normal(size=(30, 3))
    w = rng.integers(1, 4, 30)
    za = linkage(np.repeat(p, w, axis=0), "ward")
    zb = cl.weighted_ward_linkage(p, w)
    np.testing.assert_allclose(np.sort(za[:, 2])[-29:], zb[:, 2], atol=1e-9)
    np.testing.assert_allclose(cl.weighted_ward_linkage(p, np.ones(30)), linkage(p, "ward"), atol=1e-9)


def test_ward_large_paths_never_dense():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(900, 5)) + np.repeat(rng.normal(size=(3, 5)) * 8, 300, axis=0)
    lab = cl.ward_clusters(x, dense_max_rows=100, precluster_size=60, seed=0)
    assert lab.shape == (900,) and lab.min() == 0
    assert len(np.unique(lab)) >= 3
    # the three blobs are far apart: every pre-cluster lies inside one blob, so the cut separates the blobs
    # exactly like the dense reference tree
    truth = np.repeat(np.arange(3), 300)
    for blob in range(3):
        assert len(np.unique(lab[truth == blob])) >= 1
        assert not set(lab[truth == blob]) & set(lab[truth != blob])
    # a seeded training sample of the rows gives a deterministic clustering, same on every call
    lab_s = cl.ward_clusters(x, dense_max_rows=100, precluster_size=60, seed=0, precluster_train=300)
    np.testing.assert_array_equal(lab_s, cl.ward_clusters(x, dense_max_rows=100, precluster_size=60, seed=0,
                                                          precluster_train=300))
    assert not set(lab_s[truth == 0]) & set(lab_s[truth != 0])
