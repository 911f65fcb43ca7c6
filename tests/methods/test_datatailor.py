import math

import numpy as np
import pytest

import oracles
from datasel_ray.config import DataTailorConfig
from datasel_ray.methods import datatailor as dt


def _pool(n, n_tasks=3, d=6, seed=0):
    rng = np.random.default_rng(seed)
    tasks = rng.integers(0, n_tasks, n)
    centers = rng.normal(size=(n_tasks, 5, d)) * 3
    h = centers[tasks, rng.integers(0, 5, n)] + rng.normal(size=(n, d))
    v = rng.uniform(1, 3, n)
    tau = rng.uniform(0.05, 0.4, n)
    nt = rng.integers(0, 4, n)
    return h.astype(np.float32), v.astype(np.float32), tau.astype(np.float32), nt, tasks


@pytest.mark.parametrize("seed", [0, 1])
def test_select_matches_reference_oracle(seed):
    h, v, tau, nt, tasks = _pool(600, seed=seed)
    names = np.array(["conv", "vqa", "ocr"])[tasks]
    res = dt.select(h, v, tau, nt, names, 90, DataTailorConfig())
    sel, labels, U, R = oracles.datatailor_reference(h, v.astype(np.float64), tau.astype(np.float64), nt, names, 90)
    np.testing.assert_array_equal(res.labels, labels)
    np.testing.assert_allclose(res.U, U, atol=1e-10)
    np.testing.assert_allclose(res.R, R, atol=1e-10)
    np.testing.assert_array_equal(res.selected, sel)
    assert len(res.selected) == 90 and res.task_budget.sum() == 90


def test_uniqueness_blocked_equals_dense(monkeypatch):
    rng = np.random.default_rng(2)
    h = rng.normal(size=(400, 5))
    v = rng.uniform(0.5, 2, 400)
    lab = rng.integers(0, 3, 400)
    monkeypatch.setattr(dt, "_BLOCK", 37)
    np.testing.assert_allclose(dt.uniqueness(h, v, lab), oracles.uniqueness_dense(h, v, lab), atol=1e-10)
    np.testing.assert_allclose(dt.uniqueness(h, v, lab, "paper"), oracles.uniqueness_paper_dense(h, v, lab),
                               atol=1e-10)


def test_uniqueness_degenerate_clusters():
    h = np.array([[0.0, 0], [1, 1], [1, 1], [1, 1]])
    U = dt.uniqueness(h, np.ones(4), np.array([0, 1, 1, 1]))
    assert np.isnan(U).all()  # singleton and all-identical cluster: the reference's 0/0
    # numpy's argsort puts NaN last, so those rows take the highest uniqueness ranks (as in the reference)
    assert dt.percentile_rank(np.array([0.5, np.nan, 0.2, 0.9])).tolist() == [0.25, 0.75, 0.0, 0.5]
    assert dt.uniqueness(h, np.ones(4), np.array([0, 1, 1, 1]), "paper").tolist() == [0.0] * 4


def test_single_cluster_task_association_is_e():
    A = dt.association(np.array([[1.0, 0], [0, 1], [1, 1]]), np.array([0, 1, 1]))
    assert A[0] == pytest.approx(math.e)
    assert A[1] == pytest.approx(math.exp(np.sqrt(0.5)))
    np.testing.assert_allclose(A, oracles.association_loop(np.array([[1.0, 0], [0, 1], [1, 1]]), np.arange(3),
                                                          np.array([0, 1, 1])))


def test_percentile_rank():
    assert dt.percentile_rank(np.array([3.0, 1.0, 2.0, 1.0])).tolist() == [0.75, 0.0, 0.5, 0.25]


def test_budget_larger_than_task_is_capped_and_redistributed():
    kb = dt.task_budgets(np.array([5, 100, 100]), np.array([0.9, 0.1, 0.2]), 60)
    assert kb.sum() == 60 and kb[0] == 5
    assert kb[2] > kb[1]


def test_single_row_task_and_paper_variants():
    h, v, tau, nt, tasks = _pool(120, seed=3)
    tasks = tasks.copy()
    tasks[0] = 9  # a one-row task
    cfg = DataTailorConfig(cut="paper", uniqueness="paper", representativeness="paper")
    res = dt.select(h, v, tau, nt, tasks, 0.25, cfg)
    assert len(res.selected) == 30 and np.isfinite(res.score).all()
    assert res.cluster_A[res.labels[0]] == pytest.approx(math.e)


def test_large_task_precluster_path():
    h, v, tau, nt, tasks = _pool(700, n_tasks=1, seed=4)
    cfg = DataTailorConfig(dense_max_rows=200, precluster_size=80)
    res = dt.select(h, v, tau, nt, tasks, 70, cfg, seed=1)
    assert len(res.selected) == 70 and res.labels.max() + 1 == len(res.cluster_size)


def test_validation():
    with pytest.raises(ValueError, match="informativeness"):
        dt.select(np.zeros((3, 2), np.float32), np.zeros(2), np.zeros(3), np.zeros(3), np.zeros(3), 1)
    with pytest.raises(ValueError, match="tau must be finite"):
        dt.select(np.zeros((3, 2), np.float32), np.zeros(3), np.array([0, np.nan, 0]), np.zeros(3), np.zeros(3), 1)
