"""COINCIDE vector (Eq. 2-3) against a hand computation in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasel_ray.features.activations import coincide_vector


def reference(layers, image_mask, text_mask):
    parts = []
    for a in layers:
        for mask in (image_mask, text_mask):
            if mask.sum() == 0:
                parts.append(np.zeros(a.shape[1]))
                continue
            v = np.tanh(a[mask].mean(axis=0))
            parts.append(v / np.sqrt((v ** 2).sum()))
    return np.concatenate(parts) / np.sqrt(2 * len(layers))


def test_matches_hand_computation_and_is_unit_norm():
    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(12, 8)) for _ in range(3)]
    image_mask = np.zeros(12, bool)
    image_mask[2:6] = True
    text_mask = np.zeros(12, bool)
    text_mask[6:] = True
    u = coincide_vector([torch.tensor(a) for a in layers], torch.tensor(image_mask), torch.tensor(text_mask))
    assert u.shape == (2 * 3 * 8,) and u.dtype == torch.float32
    np.testing.assert_allclose(u.numpy(), reference(layers, image_mask, text_mask), atol=1e-6)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    # layout [v_0, t_0, v_1, t_1, ...]: the second block is layer 0's text half
    t0 = np.tanh(layers[0][text_mask].mean(0))
    np.testing.assert_allclose(u[8:16].numpy() * np.sqrt(6), t0 / np.linalg.norm(t0), atol=1e-6)


def test_text_only_has_zero_visual_halves():
    a = torch.randn(5, 4)
    u = coincide_vector([a, a * 2], torch.zeros(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
    assert torch.equal(u[0:4], torch.zeros(4)) and torch.equal(u[8:12], torch.zeros(4))
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6)  # unit norm like image-text vectors
    t0 = np.tanh(a.numpy().mean(0))
    np.testing.assert_allclose(u[4:8].numpy() * np.sqrt(2), t0 / np.linalg.norm(t0), atol=1e-6)


def test_nan_becomes_zero_and_empty_spans_give_zeros():
    a = torch.randn(4, 3)
    a[1, 0] = float("nan")
    u = coincide_vector([a], torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True]))
    assert not torch.isnan(u).any()
    assert torch.equal(coincide_vector([a], torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)),
                       torch.zeros(6))


def test_mask_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="tokens"):
        coincide_vector([torch.randn(4, 3)], torch.ones(5, dtype=torch.bool), torch.ones(5, dtype=torch.bool))
