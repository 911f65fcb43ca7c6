"""The near-duplicate idealisation used by benchmarks/duplicate_sensitivity.py."""

from __future__ import annotations


import numpy as np

from benchmarks.duplicate_sensitivity import near_identical


def test_group_members_collapse_onto_their_first_member_and_others_stay():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5))
    groups = np.array([-1, 0, 0, 1, -1, 1, 1, 0])
    out = near_identical(x, groups, noise=0.01, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(out[groups < 0], x[groups < 0])
    for group, first in ((0, 1), (1, 3)):
        rows = np.flatnonzero(groups == group)
        assert np.abs(out[rows] - x[first]).max() < 0.1  # noise 0.01 x typical scale ~1
        assert np.abs(out[rows] - x[first]).max() > 0  # noise was added
    scalar = near_identical(np.arange(8.0), groups, noise=0.0, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(scalar, [0, 1, 1, 3, 4, 3, 3, 1])
