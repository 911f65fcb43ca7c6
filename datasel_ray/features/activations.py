"""COINCIDE multi-layer activation vectors (Lee et al., EMNLP 2024 Findings, Sec. 3, Eq. 2-3).

Reference facts (G-JWLee/COINCIDE_code, ``extract_embed.py``): the hooked activation ``A_l`` is the output of
``layers[l].self_attn.o_proj`` (MSA output before the residual add); per layer
``v_l = normalize(tanh(mean(A_l[image tokens])))`` and ``t_l = normalize(tanh(mean(A_l[text after the image])))``;
``u = concat_l [v_l, t_l] / sqrt(2 |L|)`` (unit norm), stored fp16 with NaN set to 0.

Several images per row (the papers' pools have at most one): ``v_l`` pools the image tokens of all the row's
images together and ``t_l`` the tokens after the last image token (the masks of
:class:`~datasel_ray.models.vlm.PreparedSample`); one vector per row either way.

Deviation from the reference code (METHODS.md Sec. 6): text-only samples get zero visual halves and use every
token as text, instead of slicing fixed offsets that fall on the wrong tokens. Their vector is divided by
``sqrt(|L|)`` (the number of non-empty halves) instead of ``sqrt(2 |L|)`` so that every ``u`` keeps unit norm:
the density kernel (σ = 1, ``exp(cos - 1)`` for unit vectors) and the MMD prototypes assume unit-norm inputs,
and a 1/√2-norm text-only vector would look artificially dense and lose its cluster's budget.
"""

from __future__ import annotations

import math

import torch


def _span_feature(activations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised tanh of the mean of ``activations[mask]``; zeros [d] when the span is empty."""
    if not bool(mask.any()):
        return activations.new_zeros(activations.shape[-1])
    pooled = torch.tanh(activations[mask].mean(dim=0))
    return torch.nn.functional.normalize(pooled, dim=0)


def coincide_vector(layer_outputs: list[torch.Tensor], image_mask: torch.Tensor,
                    text_mask: torch.Tensor) -> torch.Tensor:
    """COINCIDE feature ``u`` of one sample.

    layer_outputs: one float Tensor [L, d] per hooked layer (layer order), non-pad tokens only;
    image_mask / text_mask: bool [L]. Returns float32 [2 * n_layers * d] laid out ``[v_0, t_0, v_1, t_1, ...]``,
    divided by sqrt(n_layers * number of non-empty spans) (unit norm; zeros when both spans are empty); NaN
    entries are set to 0.
    """
    if not layer_outputs:
        raise ValueError("coincide_vector needs at least one layer output")
    image_mask = torch.as_tensor(image_mask, dtype=torch.bool)
    text_mask = torch.as_tensor(text_mask, dtype=torch.bool)
    parts = []
    for activations in layer_outputs:
        activations = activations.float()
        if activations.shape[0] != image_mask.shape[0] or activations.shape[0] != text_mask.shape[0]:
            raise ValueError(f"layer output has {activations.shape[0]} tokens, masks have "
                             f"{image_mask.shape[0]} / {text_mask.shape[0]}")
        parts.append(_span_feature(activations, image_mask.to(activations.device)))
        parts.append(_span_feature(activations, text_mask.to(activations.device)))
    nonempty_spans = max(1, int(bool(image_mask.any())) + int(bool(text_mask.any())))
    u = torch.cat(parts) / math.sqrt(nonempty_spans * len(layer_outputs))
    return torch.nan_to_num(u, nan=0.0)
