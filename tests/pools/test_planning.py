"""Shared pool planning: group sizes per draw rule (pinned values: each generator's pools depend on them)."""

import numpy as np
import pytest

from datasel_ray.pools.planning import check_group_size, group_sizes, in_pool_order


@pytest.mark.parametrize("draw, expected", [("clip", [6, 5, 5, 4]), ("fit", [6, 6, 5, 3])])
def test_group_sizes_are_pinned_per_draw_rule(draw, expected):
    assert group_sizes(np.random.default_rng(0), 20, 3, 6, draw) == expected
    assert group_sizes(np.random.default_rng(1), 7, 3, 6, draw) == [4, 3]
    assert group_sizes(np.random.default_rng(2), 2, 3, 6, draw) == []


@pytest.mark.parametrize("draw", ["clip", "fit"])
def test_group_sizes_stay_in_bounds_and_sum_to_the_total_when_possible(draw):
    for seed in range(20):
        for total in range(0, 40):
            sizes = group_sizes(np.random.default_rng(seed), total, 3, 5, draw)
            assert all(3 <= s <= 5 for s in sizes)
            assert 0 <= total - sum(sizes) < 3


def test_unknown_draw_rule_and_bad_group_size_are_refused():
    with pytest.raises(ValueError, match="Unknown draw 'even'"):
        group_sizes(np.random.default_rng(0), 10, 2, 3, "even")
    with pytest.raises(ValueError, match="duplicate_group_size"):
        check_group_size((1, 3))


def test_in_pool_order_is_a_seeded_permutation():
    rows = list("abcdefgh")
    order = in_pool_order(np.random.default_rng(5), rows)
    assert sorted(order) == rows and order != rows
    assert order == in_pool_order(np.random.default_rng(5), rows)
