import numpy as np
import pytest

from datasel_ray.methods import baselines as bl
from datasel_ray.methods.budget import allocate_proportional, largest_remainder, resolve_budget


def test_random_global_deterministic_and_sized():
    a = bl.random_global(1000, 0.1, seed=3)
    b = bl.random_global(1000, 0.1, seed=3)
    c = bl.random_global(1000, 0.1, seed=4)
    assert len(a.selected) == 100 and (np.diff(a.selected) > 0).all()
    np.testing.assert_array_equal(a.selected, b.selected)
    assert not np.array_equal(a.selected, c.selected)
    assert a.selected.dtype == np.int64 and a.score.shape == (1000,)


def test_random_per_task_keeps_mix():
    tasks = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 100)
    r = bl.random_per_task(tasks, 100, seed=0)
    counts = {t: int((tasks[r.selected] == t).sum()) for t in "abc"}
    assert counts == {"a": 60, "b": 30, "c": 10}


def test_answer_loss_ranking_nan_last_and_perplexity_identical():
    loss = np.array([0.5, np.nan, 2.0, 1.0, 2.0])
    assert bl.answer_loss_ranking(loss, 2).selected.tolist() == [2, 4]
    assert bl.answer_loss_ranking(loss, 2, highest=False).selected.tolist() == [0, 3]
    assert bl.answer_loss_ranking(loss, 5).selected.tolist() == [0, 1, 2, 3, 4]
    assert bl.answer_loss_ranking(loss, 4, highest=False).selected.tolist() == [0, 2, 3, 4]
    ppl = np.exp(loss)
    np.testing.assert_array_equal(bl.answer_loss_ranking(ppl, 3).selected, bl.answer_loss_ranking(loss, 3).selected)


def test_budget_helpers():
    assert resolve_budget(0.2, 665) == 133 and resolve_budget(50, 10) == 10 and resolve_budget(3, 10) == 3
    with pytest.raises(ValueError, match="budget"):
        resolve_budget(-1, 10)
    assert largest_remainder(np.array([1.5, 1.5, 1.0]), 4).tolist() == [2, 1, 1]
    out = allocate_proportional(np.array([1.0, 1.0, 2.0]), 10, caps=np.array([1, 100, 100]))
    assert out.tolist() == [1, 3, 6]
    # repeated capping: second round caps another group
    out = allocate_proportional(np.array([10.0, 5.0, 1.0]), 30, caps=np.array([5, 12, 100]))
    assert out.tolist() == [5, 12, 13] and out.sum() == 30
    # request above total capacity -> everyone at cap
    assert allocate_proportional(np.array([1.0, 2.0]), 50, caps=np.array([3, 4])).tolist() == [3, 4]
    # leftover with only zero-weight groups free
    assert allocate_proportional(np.array([1.0, 0.0]), 8, caps=np.array([2, 10])).tolist() == [2, 6]
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.uniform(0, 1, 7)
        caps = rng.integers(0, 30, 7)
        tot = int(rng.integers(0, caps.sum() + 1))
        a = allocate_proportional(w, tot, caps=caps)
        assert a.sum() == tot and (a <= caps).all() and (a >= 0).all()
    with pytest.raises(ValueError, match="weights"):
        allocate_proportional(np.array([1.0, -1.0]), 3)
