"""Float comparisons scaled to the values they are computed from (importable from every test: conftest's folder).

A float32 sum of D terms differs from its float64 value by rounding of each term and of the additions, so the
bound that holds on any BLAS and any summation order is a few float32 ulps of ``sum_j |term_j|``, not of the
result: a projection ``x @ P`` of values around 1 can sum to 0.1 with an absolute error near 1e-4.
"""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def assert_close_to_accumulation(actual, expected, scale, ulps: float = 16.0) -> None:
    """``|actual - expected| <= ulps * eps32 * scale`` elementwise.

    actual: float32 result [...]; expected: its float64 reference [...]; scale: ``sum_j |term_j|`` of the sum that
    produced each element, same shape (``|x| @ |P|`` for a projection ``x @ P``).
    """
    a, e, s = _np(actual), _np(expected), _np(scale)
    assert a.shape == e.shape == s.shape, (a.shape, e.shape, s.shape)
    bound = ulps * EPS32 * s
    excess = np.abs(a - e) - bound
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape) if excess.size else ()
    assert not excess.size or excess[worst] <= 0, (
        f"{int((excess > 0).sum())} of {excess.size} values differ by more than {ulps} float32 ulps of their "
        f"accumulated magnitude; worst at {worst}: actual {a[worst]!r}, expected {e[worst]!r}, "
        f"bound {bound[worst]:.3g}")


def assert_projection_close(actual, x, matrix, ulps: float = 16.0) -> None:
    """A float32 projection ``actual`` of ``x`` [B, D] by ``matrix`` [D, k] against the float64 product."""
    x64, m64 = torch.as_tensor(_np(x)), torch.as_tensor(_np(matrix))
    assert_close_to_accumulation(actual, (x64 @ m64).numpy(), (x64.abs() @ m64.abs()).numpy(), ulps)


def assert_gradients_match_single_passes(model, samples, got: dict, projector, names: list[str],
                                         pad_token_id: int) -> None:
    """Per-sample TIVE gradients of a batch (``got``: the featurizer's ``grad_norm`` float [B] and ``grad_proj``
    float [B, k]) equal one plain backward pass per sample: the answer-token CE of that sample alone, its
    gradient over the parameters ``names`` flattened in that order, its norm, and its projection by
    ``projector`` (float64 reference)."""
    import pytest

    from datasel_ray.models.answer_loss import answer_cross_entropy
    from datasel_ray.models.vlm import collate

    params = dict(model.named_parameters())
    matrix = projector.materialize().double()
    for b, sample in enumerate(samples):
        one = collate([sample], pad_token_id)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(input_ids=one.input_ids, **one.image_kwargs("cpu", torch.float32)).logits[0]
            answer_cross_entropy(logits, one.labels[0], "masked").backward()
        flat = torch.cat([params[n].grad.reshape(-1) for n in names]).double()
        assert got["grad_norm"][b] == pytest.approx(float(flat.norm()), rel=1e-4), b
        expected = (flat @ matrix).numpy()
        np.testing.assert_allclose(got["grad_proj"][b], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def lora_model_with_nonzero_b(model_dir, seed: int = 1):
    """``(model, names)``: the VLM at ``model_dir`` with LoRA r=2 attached (seed 0) and every ``lora_B`` set to
    ``0.05 * N(0, 1)`` from ``seed`` (B starts at zero, which would leave A without gradient), and the names of
    the TIVE parameters (``tive_param_filter``) in model order."""
    from transformers import AutoModelForImageTextToText

    from datasel_ray.config import LoraConfig
    from datasel_ray.features.gradients import tive_param_filter
    from datasel_ray.training.lora import attach_lora

    model = attach_lora(AutoModelForImageTextToText.from_pretrained(model_dir), LoraConfig(r=2, alpha=4), seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model, [n for n, _ in model.named_parameters() if tive_param_filter(n)]


def assert_batched_features_match_single(vlm, samples, batched, atol: float) -> None:
    """``batched``: ``vlm.forward_features`` of a batch holding ``samples`` in this order; each row's last hidden
    states, layer outputs (rtol 1e-4, ``atol``) and answer loss (rel 1e-4) equal those of the sample alone."""
    import pytest

    for sample, got in zip(samples, batched):
        alone = vlm.forward_features([sample])[0]
        assert got.last_hidden.shape[0] == sample.length
        torch.testing.assert_close(got.last_hidden, alone.last_hidden, rtol=1e-4, atol=atol)
        for a, b in zip(got.layer_outputs, alone.layer_outputs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)
        assert got.answer_loss == pytest.approx(alone.answer_loss, rel=1e-4)
