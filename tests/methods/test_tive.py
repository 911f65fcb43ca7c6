"""TIVE selection: O(N) instance value vs the N x N reference, budgets, oversampling, sampling, switches."""

from __future__ import annotations

import numpy as np
import pytest

from datasel_ray.config import TiveConfig
from datasel_ray.methods import tive


def _pool(n=300, k=16, n_tasks=4, seed=0):
    rng = np.random.default_rng(seed)
    tasks = rng.integers(0, n_tasks, size=n)
    centres = rng.normal(size=(n_tasks, k))
    grads = (centres[tasks] + 0.8 * rng.normal(size=(n, k))).astype(np.float32)
    norms = rng.uniform(0.5, 3.0, size=n).astype(np.float32) * (1 + tasks)
    return grads, norms.astype(np.float32), tasks


def _reference_instance_values(grads, tasks):
    """Reference code: ĝ ĝᵀ over the task's rows, mean over columns (j = i included)."""
    g = grads.astype(np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = np.empty(len(g))
    for t in np.unique(tasks):
        rows = np.flatnonzero(tasks == t)
        out[rows] = (g[rows] @ g[rows].T).mean(axis=1)
    return out


def test_instance_values_equal_nxn_reference():
    grads, _, tasks = _pool()
    fast = tive.instance_values(grads, tasks)
    assert fast.dtype == np.float32 and fast.shape == (len(tasks),)
    np.testing.assert_allclose(fast, _reference_instance_values(grads, tasks), rtol=1e-5, atol=1e-6)


def test_instance_values_chunked_and_zero_rows(monkeypatch):
    grads, _, tasks = _pool(n=101)
    grads[5] = 0.0
    monkeypatch.setattr(tive, "_CHUNK_ROWS", 7)
    fast = tive.instance_values(grads, tasks)
    assert fast[5] == 0.0
    keep = np.ones(len(tasks), bool)
    keep[5] = False
    # the zero row adds nothing to the task sum but counts in |D_t|
    ref = _reference_instance_values(np.where(keep[:, None], grads, 1.0), tasks)
    g = grads / np.maximum(np.linalg.norm(grads, axis=1, keepdims=True), 1e-30)
    t5 = tasks[5]
    rows = np.flatnonzero(tasks == t5)
    ref[rows] = (g[rows] @ g[rows].T).mean(axis=1)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_task_mean_gradients_are_means_of_unit_rows():
    grads, _, tasks = _pool()
    means = tive.task_mean_gradients(grads, tasks)
    assert means.shape == (4, grads.shape[1]) and means.dtype == np.float32
    unit = grads / np.linalg.norm(grads, axis=1, keepdims=True)
    for t in range(4):
        np.testing.assert_allclose(means[t], unit[tasks == t].mean(axis=0), rtol=1e-5, atol=1e-6)
    inst = tive.instance_values(grads, tasks)
    np.testing.assert_allclose(inst, np.einsum("ik,ik->i", unit, means[tasks]), rtol=1e-4, atol=1e-6)


def test_task_values_norm_and_sq_norm_switch():
    norms = np.array([1.0, 3.0, 2.0, 2.0], dtype=np.float32)
    tasks = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(tive.task_values(norms, tasks, "norm"), [2.0, 2.0])
    np.testing.assert_allclose(tive.task_values(norms, tasks, "sq_norm"), [5.0, 4.0])
    with pytest.raises(ValueError, match="norm, sq_norm"):
        tive.task_values(norms, tasks, "squared")


def test_budgets_sum_exactly_and_cap_small_task():
    values = np.array([1.0, 1.0, 1.0, 5.0])
    sizes = np.array([100, 100, 100, 10])
    budgets = tive.task_budgets(values, sizes, 100, overflow="cap")
    assert budgets.sum() == 100
    assert budgets[3] == 10  # share 62.5 capped at N_t = 10
    assert np.all(budgets <= sizes)
    assert budgets[:3].tolist() == [30, 30, 30]  # excess of 52.5 spread evenly over equal values
    for total in (0, 1, 7, 99, 310):
        b = tive.task_budgets(np.array([0.3, 0.1, 2.0, 0.7]), sizes, total)
        assert b.sum() == total and np.all(b <= sizes)
    with pytest.raises(ValueError, match="exceeds the pool size"):
        tive.task_budgets(values, sizes, 311)


def test_budgets_proportional_to_values_not_sizes():
    budgets = tive.task_budgets(np.array([1.0, 3.0]), np.array([1000, 10_000]), 400)
    assert budgets.tolist() == [100, 300]


def test_oversample_matches_reference_semantics():
    # two tasks: task 0 has 4 rows but a share of 10 -> 2 full copies + 2 drawn rows
    grads, norms, _ = _pool(n=40, n_tasks=2)
    tasks = np.array([0] * 4 + [1] * 36)
    norms = np.where(tasks == 0, 10.0, 10.0 / 3).astype(np.float32)  # v = (10, 3.33) -> shares 0.75 / 0.25
    cfg = TiveConfig(overflow="oversample")
    res = tive.select(grads, norms, tasks, budget=13, config=cfg, seed=3)
    assert res.task_budget.tolist() == [10, 3]
    assert res.selected.size == 13
    counts = np.bincount(res.selected, minlength=40)
    assert counts[:4].sum() == 10 and set(counts[:4].tolist()) <= {2, 3} and (counts[:4] == 3).sum() == 2
    assert counts[4:].sum() == 3 and counts[4:].max() == 1
    capped = tive.select(grads, norms, tasks, budget=13, config=TiveConfig(overflow="cap"), seed=3)
    assert capped.task_budget.tolist() == [4, 9]
    assert np.unique(capped.selected).size == 13


def test_seeded_sampling_is_reproducible_and_seed_sensitive():
    grads, norms, tasks = _pool(n=500)
    cfg = TiveConfig(temperature=0.05)
    a = tive.select(grads, norms, tasks, budget=120, config=cfg, seed=11)
    b = tive.select(grads, norms, tasks, budget=120, config=cfg, seed=11)
    c = tive.select(grads, norms, tasks, budget=120, config=cfg, seed=12)
    np.testing.assert_array_equal(a.selected, b.selected)
    assert not np.array_equal(a.selected, c.selected)
    assert a.selected.size == 120 and np.unique(a.selected).size == 120
    assert np.bincount(tasks[a.selected], minlength=4).tolist() == a.task_budget.tolist()


def test_low_temperature_prefers_high_instance_value():
    grads, norms, tasks = _pool(n=2000, k=8)
    inst = tive.instance_values(grads, tasks)
    rng = np.random.default_rng(0)
    rows = np.flatnonzero(tasks == 0)
    cold = inst[rows][tive.sample_within_task(inst[rows], 50, 0.01, "softmax", rng)].mean()
    warm = inst[rows][tive.sample_within_task(inst[rows], 50, 1000.0, "softmax", rng)].mean()
    assert cold > warm and cold > np.quantile(inst[rows], 0.8)


def test_topk_picks_largest_instance_values():
    grads, norms, tasks = _pool(n=400)
    res = tive.select(grads, norms, tasks, budget=80, config=TiveConfig(sampling="topk"), seed=0)
    for t in range(4):
        rows = np.flatnonzero(tasks == t)
        chosen = np.intersect1d(res.selected, rows)
        assert chosen.size == res.task_budget[t]
        threshold = np.sort(res.instance_value[rows])[::-1][chosen.size - 1]
        assert np.all(res.instance_value[chosen] >= threshold)
    assert res.summary()["sampling"] == "topk"


def test_sample_within_task_topk_ties_to_lower_position():
    picks = tive.sample_within_task(np.array([0.5, 0.9, 0.5, 0.9, 0.1]), 3, sampling="topk")
    assert picks.tolist() == [1, 3, 0]


def test_sq_norm_switch_changes_budget():
    grads, _, _ = _pool(n=200, n_tasks=2)
    tasks = np.repeat([0, 1], 100)
    norms = np.where(tasks == 0, np.tile([1.0, 3.0], 100), 2.0).astype(np.float32)
    ref = tive.select(grads, norms, tasks, 60, TiveConfig(task_value="norm"), seed=0)
    paper = tive.select(grads, norms, tasks, 60, TiveConfig(task_value="sq_norm"), seed=0)
    assert ref.task_budget.tolist() == [30, 30]  # mean norms 2 vs 2
    assert paper.task_budget.tolist() == [33, 27]  # mean squares 5 vs 4
    assert paper.summary()["task_value_mode"] == "sq_norm"


def test_select_string_tasks_and_summary():
    grads, norms, codes = _pool(n=120, n_tasks=3)
    labels = np.array(["vqa", "caption", "ocr"])[codes]
    res = tive.select(grads, norms, labels, budget=30, seed=1)
    assert res.task_names.tolist() == ["caption", "ocr", "vqa"]
    summary = res.summary()
    assert sum(v["budget"] for v in summary["tasks"].values()) == 30
    assert summary["temperature"] == 1000.0 and summary["overflow"] == "cap"


def test_select_rejects_bad_input():
    grads, norms, tasks = _pool(n=50)
    with pytest.raises(ValueError, match="grad_proj"):
        tive.select(grads[:-1], norms, tasks, 10)
    bad = norms.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        tive.select(grads, bad, tasks, 10)
