"""DataTailor spectrum statistics (Eq. 2) against numpy's SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datasel_ray.features.spectrum import spectrum_stats


def test_matches_numpy_svd():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(20, 8)) @ np.diag([5, 3, 1, 1, 0.5, 0.1, 0.1, 0.01])
    sigma = np.linalg.svd(h, compute_uv=False)
    p = sigma / sigma.sum()
    info, tau = spectrum_stats(torch.tensor(h, dtype=torch.float32))
    assert info == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-5)
    assert tau == pytest.approx(float(p.max()), rel=1e-5)


def test_extremes():
    rank1 = torch.outer(torch.arange(1.0, 7.0), torch.tensor([1.0, -2.0, 0.5]))
    info, tau = spectrum_stats(rank1)
    assert info == pytest.approx(0.0, abs=1e-5) and tau == pytest.approx(1.0, abs=1e-5)
    info, tau = spectrum_stats(torch.eye(4) * 3)  # flat spectrum: maximal entropy log k
    assert info == pytest.approx(math.log(4), rel=1e-6) and tau == pytest.approx(0.25, rel=1e-6)
    assert spectrum_stats(torch.zeros(3, 5)) == (0.0, 0.0)


def test_half_precision_input_runs_in_float32():
    h = torch.randn(10, 6)
    assert spectrum_stats(h.half()) == pytest.approx(spectrum_stats(h.half().float()), rel=1e-6)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        spectrum_stats(torch.zeros(0, 4))
    with pytest.raises(ValueError):
        spectrum_stats(torch.zeros(4))
