"""Fixtures shared by the Serve tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def records(demo_pool):
    """Six good pool records (no injected defect, by the pool's ground truth), as a client sends them."""
    from datasel_ray.synthetic import load_ground_truth

    truth = load_ground_truth(demo_pool.ground_truth_path)
    pool = json.loads(Path(demo_pool.pool_path).read_text())
    return [r for r, t in zip(pool, truth) if not t["bad_kind"]][:6]
