"""Ground-truth selection quality: hand-computed duplicate/noise/coverage and the random-draw expectation."""

import numpy as np
import pytest

from datasel_ray.evaluation import pool_quality, random_expectation, selection_quality

TRUTH = [
    {"task": "a", "dup_group": 0, "noisy": False, "bad_kind": ""},
    {"task": "a", "dup_group": 0, "noisy": False, "bad_kind": ""},
    {"task": "a", "dup_group": 0, "noisy": False, "bad_kind": ""},
    {"task": "b", "dup_group": -1, "noisy": True, "bad_kind": ""},
    {"task": "b", "dup_group": 1, "noisy": False, "bad_kind": ""},
    {"task": "c", "dup_group": -1, "noisy": False, "bad_kind": "image_missing"},
]


def test_selection_quality_by_hand():
    q = selection_quality(np.array([0, 1, 2, 3]), TRUTH, {"a", "b"})
    assert q["duplicate_rate"] == pytest.approx(2 / 4)  # rows 1 and 2 repeat group 0
    assert q["noise_rate"] == pytest.approx(1 / 4)
    assert q["task_coverage"] == 1.0 and q["task_counts"] == {"a": 3, "b": 1}
    assert selection_quality(np.array([0, 4]), TRUTH, {"a", "b"})["duplicate_rate"] == 0.0
    assert pool_quality(TRUTH)["selected"] == 5  # the bad row is not part of the pool's good rows


def test_random_expectation_matches_the_exact_hypergeometric_mean():
    # 5 good rows, budget 2: P(both from group 0) = C(3,2)/C(5,2) = 3/10, each such pair has rate 1/2
    e = random_expectation(np.arange(5), 2, TRUTH, {"a", "b"}, draws=4000, seed=1)
    assert e["draws"] == 4000 and e["selected"] == 2
    assert e["duplicate_rate"]["mean"] == pytest.approx(0.3 * 0.5, abs=0.01)
    assert e["noise_rate"]["mean"] == pytest.approx(0.2, abs=0.01)  # E[noisy share] = 1/5
    assert e["duplicate_rate"]["std"] > 0
    again = random_expectation(np.arange(5), 2, TRUTH, {"a", "b"}, draws=4000, seed=1)
    assert again == e


def test_random_expectation_with_a_task_mix_draws_per_task():
    # task a holds the whole duplicate group 0; two rows of a + one of b: E[dup] = P(2 of group 0 among a) * 1/3
    e = random_expectation(np.arange(5), 3, TRUTH, {"a", "b"}, draws=2000, seed=3, task_counts={"a": 2, "b": 1})
    assert e["selected"] == 3
    assert e["duplicate_rate"]["mean"] == pytest.approx(1 / 3, abs=1e-9)  # a has only group-0 rows
    assert e["task_coverage"]["mean"] == 1.0 and e["task_coverage"]["std"] == 0.0
    assert e["noise_rate"]["mean"] == pytest.approx(0.5 / 3, abs=0.02)  # row 3 is one of b's two rows
