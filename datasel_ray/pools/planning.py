"""Planning shared by the pool generators (:mod:`datasel_ray.synthetic`, :mod:`datasel_ray.pools.easy_vqa`):
near-duplicate group sizes and the final pool order. Pure numpy; the generator passes its seeded ``rng``."""

from __future__ import annotations

from typing import Literal, TypeVar

import numpy as np

Row = TypeVar("Row")

# How a group's size is drawn while ``remaining`` rows are left to place (``low``/``high``: the group size bounds):
# - "clip": from [low, high], cut to ``remaining``; a size that would leave fewer than ``low`` rows (but not 0)
#   is cut further so that one more group of ``low`` fits (the synthetic pool);
# - "fit": from [low, min(high, remaining)] (the easy-VQA pool).
# The two rules give different sizes for one seed; each generator keeps its own so that its pools stay byte for
# byte what they were.
SizeDraw = Literal["clip", "fit"]


def check_group_size(size: tuple[int, int]) -> None:
    """``duplicate_group_size`` of a generated pool: (min, max) members per near-duplicate group, 2 <= min <= max."""
    low, high = size
    if not 2 <= low <= high:
        raise ValueError(f"duplicate_group_size must be (min, max) with 2 <= min <= max, got {(low, high)}")


def group_sizes(rng: np.random.Generator, total: int, low: int, high: int, draw: SizeDraw) -> list[int]:
    """Seeded near-duplicate group sizes in [low, high] summing to ``total``, or short of it by fewer than ``low``
    rows when no grouping is exact.

    Groups are drawn (rule ``draw``, see :data:`SizeDraw`) while at least ``low`` rows remain; the rows left over
    are then added to the groups in order, each up to ``high``.
    """
    if draw not in ("clip", "fit"):
        raise ValueError(f"Unknown draw {draw!r}. Choose from: clip, fit.")
    sizes: list[int] = []
    remaining = total
    while remaining >= low:
        if draw == "fit":
            size = int(rng.integers(low, min(high, remaining) + 1))
        else:
            size = min(int(rng.integers(low, high + 1)), remaining)
            if 0 < remaining - size < low and remaining - low >= low:
                size = min(high, remaining - low)  # leave room for one more full group
        sizes.append(size)
        remaining -= size
    for i in range(len(sizes)):
        grow = min(remaining, high - sizes[i])
        sizes[i] += grow
        remaining -= grow
    return sizes


def in_pool_order(rng: np.random.Generator, rows: list[Row]) -> list[Row]:
    """``rows`` in pool order: a seeded permutation, so that groups, singles and injected rows interleave."""
    return [rows[int(i)] for i in rng.permutation(len(rows))]
