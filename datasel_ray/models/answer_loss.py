"""The answer-token cross-entropy: the one definition of the loss that training, the gradient features, the
``answer_loss`` feature and the evaluation of the quality benchmark use.

Labels follow the HF causal-LM convention of :func:`datasel_ray.models.vlm.collate`: ``labels`` int64 [..., T]
holds the token id on answer tokens (the end-of-turn token included) and :data:`IGNORE_INDEX` elsewhere, *not*
shifted; position ``t`` of the logits predicts ``labels[t + 1]``. The loss is the mean next-token CE over the
answer tokens, in fp32 whatever the logits' dtype (LLaVA SFT; TIVE and LESS take gradients of the same loss).

What is averaged (``reduction``):

- ``"batch"``: one mean over every answer token of the batch (the training loss; a sample with more answer
  tokens weighs more). NaN when the batch has none.
- ``"row"``: one mean per row, float32 [B]; NaN for a row without an answer token. Only the rows of the logits
  that predict an answer token are cast to fp32.
- ``"masked"``: one sample (logits [T, V], labels [T]) as ``sum(CE · valid) / max(#valid, 1)``: no
  data-dependent shape, so :func:`torch.func.vmap` batches it; 0 with a zero gradient without answer tokens.

``shifted=True`` takes logits that already line up with their targets (``logits[..., k, :]`` predicts
``labels[..., k]``; e.g. after ``logits_to_keep``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Reduction = Literal["batch", "row", "masked"]


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction,
                         shifted: bool = False) -> torch.Tensor:
    """Mean next-token CE over answer tokens; see the module docstring for ``reduction`` and ``shifted``.

    logits float [B, T, V] (``"batch"``, ``"row"``) or [T, V] (``"masked"``), any float dtype; labels int64 of
    the same leading shape. Returns a scalar (``"batch"``, ``"masked"``) or float32 [B] (``"row"``).
    """
    if not shifted:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    if reduction == "batch":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
    if reduction == "row":
        out = []
        for b in range(labels.shape[0]):
            keep = (labels[b] != IGNORE_INDEX).nonzero().flatten()
            if keep.numel() == 0:
                out.append(torch.tensor(float("nan"), device=logits.device))
                continue
            out.append(F.cross_entropy(logits[b, keep].float(), labels[b, keep], reduction="mean"))
        return torch.stack(out) if out else torch.zeros(0, device=logits.device)
    if reduction == "masked":
        valid = labels != IGNORE_INDEX
        ce = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
        return (ce * valid).sum() / valid.sum().clamp(min=1)
    raise ValueError(f"Unknown reduction {reduction!r}. Choose from: batch, masked, row.")
