"""DataTailor informativeness from the singular-value spectrum (Yu et al., ICCV 2025, Sec. 3.2, Eq. 2).

Reference facts (Yuqifan1117/DataTailor, ``llava/model/modeling_llama.py``): ``H`` is the output of the last
decoder block BEFORE the final norm over all non-pad tokens (image + text); ``p = sigma / sum(sigma)`` (L1 of the
singular values, not sigma^2); ``V_inf = -sum p log p`` (natural log); ``tau = max p = sigma_1 / sum(sigma)``.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def spectrum_stats(H: torch.Tensor) -> tuple[float, float]:
    """Return ``(informativeness, tau)`` of one sample's token features.

    H: float Tensor [L, d], non-pad tokens only (SVD in float32). An all-zero H gives (0.0, 0.0).
    """
    if H.ndim != 2 or H.shape[0] == 0:
        raise ValueError(f"spectrum_stats needs a non-empty [L, d] matrix, got shape {tuple(H.shape)}")
    sigma = torch.linalg.svdvals(H.float())
    p = sigma / sigma.sum().clamp_min(EPS)
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum()
    return float(entropy), float(p.max())
