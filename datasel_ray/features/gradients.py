"""Per-sample LoRA gradients of a VLM, their fp32 norms and their random projections (TIVE / LESS features).

TIVE (arXiv 2403.09559, section 3.3 "Gradient Features Computation"; ``RUCAIBox/TIVE``
``compute_gradient_features.py``) and LESS (``princeton-nlp/LESS`` ``collect_grad_reps.py``) take, for every
pool sample, the gradient of its mean answer-token cross-entropy w.r.t. the LoRA parameters of the language
model's attention (names containing ``'lora'`` and ``'self_attn'``: A and B of q/k/v/o), flattened in
``named_parameters`` order, at batch size 1. They record ``||g||_2`` of the full gradient and a Rademacher
projection of it (:mod:`datasel_ray.features.projector`).

Two implementations give the same numbers (tested):

- ``"loop"`` (reference): one forward/backward per sample at batch size 1 on the sample's own non-pad tokens,
  exactly as TIVE/LESS do.
- ``"vmap"``: ``torch.func.vmap(grad_and_value(functional_call(...)))`` over the batch. HF's VLM forward cannot
  be vmapped as is: LLaVA's image-token check (``get_placeholder_mask``) and the SDPA causal-mask shortcut
  (``masking_utils._ignore_causal_mask_sdpa``) call ``.item()`` on batched tensors. So the vision tower,
  projector and token embedding run once, batched and without grad (they hold no selected parameter: checked),
  their output ``inputs_embeds`` is captured by a pre-hook on the ``language_model`` submodule, and only the
  language model + LM head are vmapped, with a prepared 4-D mask (causal x key padding; pad query rows attend
  to themselves so that no softmax row is empty) and ``position_ids = cumsum(mask) - 1``. Unsupported when a
  selected parameter lives outside the language model, or with ``vmap_attention=None`` on a model whose attention
  is FlashAttention-2 (no 4-D mask); when the model hands its language model ``position_ids`` of its own (Qwen2-VL
  / Qwen2.5-VL M-RoPE, [3, B, T], computed from the image grid and the attention mask by the batched pass), the
  pre-hook keeps those and each vmapped row gets its slice instead of ``cumsum(mask) - 1``; ``"auto"`` then uses the loop, and it also falls back to the loop if the vmapped call raises.
  The vmapped pass switches the language model to eager attention (``vmap_attention``) for its duration:
  functorch has no batching rule for the CPU flash-SDPA kernel (forward or backward) and would run it one
  sample at a time inside vmap. The batched no-grad embedding pass and every other forward keep the model's own
  attention.

``"auto"`` picks ``"vmap"`` when supported: on the tiny model it is faster than the loop (the batched vision
tower and embedding pass plus batched LoRA matmuls; loop vs vmap with SDPA vs vmap with eager attention in
``benchmarks/results/bench_gradients.jsonl``). For a 7B model on a GPU, vmap needs the activation memory of the
whole batch (bound it with ``chunk_size``), the loop that of one sample.

Adam preconditioning (LESS ``adam`` gradient type; METHODS.md section 4): with the warm-up optimizer's
``exp_avg`` m and ``exp_avg_sq`` v (flattened in the same order), ``m' = 0.9 m + 0.1 g``,
``v' = 0.999 v + 0.001 g²``, ``Γ = m' / sqrt(v' + 1e-8)``: no bias correction, ε inside the sqrt, state never
modified (each sample starts from the stored m, v; ICONS' mutating variant is not copied). TIVE uses plain
SGD gradients (the default). ``grad_norm`` is always the norm of the raw gradient g (TIVE's task value); the
projection is of Γ when Adam state is given.

Several images per row (and every processor layout: LLaVA images, LLaVA-NeXT / OneVision tiles, Qwen2-VL's
concatenated patches, Idefics3 tiles with a batch axis): the loop gives each row exactly its own slice of the
batch's image inputs (``pixel_counts`` / ``image_input_counts`` of
:class:`~datasel_ray.models.vlm.PaddedBatch`; for Qwen2-VL the rows' cumulative ``prod(image_grid_thw)``), so a
row's gradient is that of its whole sample, all images included.

Loss: ``sum_{answer tokens} CE / max(#answer tokens, 1)`` in fp32 on next-token-shifted logits. A sample with
no answer token gets a zero gradient, ``grad_norm = 0``, a zero projection and ``answer_loss = nan``.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from datasel_ray import schema
from datasel_ray.models.answer_loss import answer_cross_entropy
from datasel_ray.models.vlm import BATCH_AXIS_KEY, CONCATENATED_PATCHES_KEY

METHODS = ("auto", "vmap", "loop")
# submodule names of the language model inside a VLM (LLaVA / Qwen2-VL / LLaVA-OneVision; Idefics3 / SmolVLM)
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")
# Attention implementations that take the prepared 4-D mask of the vmapped pass (None: the model's own).
VMAP_ATTENTION = ("eager", "sdpa", None)
# "auto" resolves to this when vmap is supported (benchmarks/bench_gradients.py compares them).
_AUTO_PREFERENCE = "vmap"

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


def tive_param_filter(name: str) -> bool:
    """TIVE/LESS parameter set: LoRA matrices of the attention projections (``'lora'`` and ``'self_attn'``)."""
    return "lora" in name and "self_attn" in name


@dataclass(frozen=True)
class AdamState:
    """Warm-up Adam moments flattened like the selected parameters: fp32 ``[grad_dim]`` each."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor

    @classmethod
    def from_named(cls, state: Mapping[str, Mapping[str, torch.Tensor]], names: Sequence[str]) -> AdamState:
        """Build from ``{param name: {"exp_avg": t, "exp_avg_sq": t}}`` (FSDP-style name-keyed state)."""
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"Adam state has no entry for {len(missing)} parameters, e.g. {missing[0]!r}")
        m = torch.cat([state[n]["exp_avg"].detach().float().reshape(-1).cpu() for n in names])
        v = torch.cat([state[n]["exp_avg_sq"].detach().float().reshape(-1).cpu() for n in names])
        return cls(m, v)

    @classmethod
    def from_optimizer_state_dict(cls, state_dict: Mapping, param_names: Sequence[str],
                                  names: Sequence[str]) -> AdamState:
        """Build from a torch ``optimizer.state_dict()`` whose state is keyed by parameter index.

        ``param_names[i]`` is the name of the optimizer's i-th parameter (over all param groups, in order); this
        is the mapping LESS users miss without FSDP (LESS issues #4/#10/#44).
        """
        by_name = {param_names[int(i)]: s for i, s in state_dict["state"].items()}
        return cls.from_named(by_name, names)


class LoraGradientFeaturizer:
    """Per-sample LoRA gradient features of a padded batch.

    Args:
        model: a peft-wrapped HF causal VLM/LM (``forward(input_ids, attention_mask, pixel_values, position_ids,
            inputs_embeds, use_cache)`` returning ``.logits``). The constructor puts it in eval mode (LoRA dropout
            off) and sets ``requires_grad`` to ``param_filter(name)`` for every parameter, so the loop's backward
            touches only the selected ones.
        projector: a :mod:`~datasel_ray.features.projector` projector with ``grad_dim`` equal to the number of
            selected parameters.
        param_filter: parameter-name predicate; default :func:`tive_param_filter`.
        adam_state: LESS Adam preconditioning (see module docstring); None = SGD gradients (TIVE).
        method: ``"auto"`` | ``"vmap"`` | ``"loop"``.
        chunk_size: vmap chunk size (bounds activation memory); None = whole batch.
        vmap_attention: attention implementation of the language model during the vmapped pass (``"eager"``
            batches under vmap); None keeps the model's own. The loop path never switches.
    """

    def __init__(
        self,
        model: nn.Module,
        projector,
        param_filter: Callable[[str], bool] = tive_param_filter,
        adam_state: AdamState | None = None,
        method: str = "auto",
        chunk_size: int | None = None,
        vmap_attention: str | None = "eager",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"Unknown per-sample method '{method}'. Choose from: {', '.join(METHODS)}")
        if vmap_attention not in VMAP_ATTENTION:
            raise ValueError(f"Unknown vmap_attention {vmap_attention!r}. Choose from: eager, sdpa, None")
        self.vmap_attention = vmap_attention
        self.model = model.eval()
        self.names = [n for n, _ in model.named_parameters() if param_filter(n)]
        if not self.names:
            raise ValueError("param_filter selects no parameter of the model")
        selected = set(self.names)
        for name, param in model.named_parameters():
            param.requires_grad_(name in selected)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.names]
        self.sizes = [p.numel() for p in self.params]
        self.grad_dim = int(sum(self.sizes))
        if projector.grad_dim != self.grad_dim:
            raise ValueError(f"projector.grad_dim = {projector.grad_dim}, but the selected parameters have "
                             f"{self.grad_dim} entries")
        self.projector = projector
        self.adam_state = adam_state
        if adam_state is not None:
            for key, t in (("exp_avg", adam_state.exp_avg), ("exp_avg_sq", adam_state.exp_avg_sq)):
                if t.shape != (self.grad_dim,):
                    raise ValueError(f"adam_state.{key} has shape {tuple(t.shape)}, expected ({self.grad_dim},)")
        self.chunk_size = chunk_size
        self.device = self.params[0].device
        self.image_token_id = _image_token_id(model)
        self._lm_name, reason = self._vmap_support()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper passes it on
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        if method == "vmap" and reason:
            raise ValueError(f"method='vmap' is not supported for this model: {reason}")
        self.method = method if method != "auto" else (_AUTO_PREFERENCE if not reason else "loop")
        self._fallback_reason = reason

    # -- public --------------------------------------------------------------------------------------------
    def compute(self, batch) -> dict[str, np.ndarray]:
        """Features of a right- or left-padded batch.

        ``batch``: mapping or object with ``input_ids`` int [B, T], ``attention_mask`` int/bool [B, T], ``labels``
        int [B, T] (-100 outside answer tokens, unshifted), ``pixel_values`` float [n_images, ...] for the rows
        that contain image tokens, in row order (or None), and optionally ``image_inputs`` {name: [n_images, ...]}
        (e.g. LLaVA-NeXT ``image_sizes``), sliced per row with the pixels, and ``token_inputs`` {name: [B, T]}
        (Qwen2-VL ``mm_token_type_ids``). numpy or torch. Rows may hold several images: the per-row extents come
        from ``pixel_counts`` int [B] and ``image_input_counts`` {name: int [B]}
        (:class:`~datasel_ray.models.vlm.PaddedBatch`); without them every row with image tokens holds one
        image, and for processors that concatenate all images' patches (``image_grid_thw``, Qwen2-VL) row b's
        patches are the slice given by the cumulative ``prod(image_grid_thw)`` of its images.

        Returns:
            ``grad_proj`` float32 [B, proj_dim], ``grad_norm`` float32 [B] (fp32 L2 norm of the raw gradient),
            ``answer_loss`` float32 [B] (nan for rows without answer tokens).
        """
        ids, mask, labels, pixels, extra = self._unpack(batch)
        if self.method == "vmap":
            try:
                grads, losses = self._per_sample_vmap(ids, mask, labels, pixels, extra)
            except RuntimeError as err:  # data-dependent control flow in a model we have not seen
                warnings.warn(f"vmap per-sample gradients failed ({err!s:.200}); using the per-sample loop",
                              RuntimeWarning, stacklevel=2)
                self.method = "loop"
                grads, losses = self._per_sample_loop(ids, mask, labels, pixels, extra)
        else:
            grads, losses = self._per_sample_loop(ids, mask, labels, pixels, extra)
        proj, norms = self._finish(grads)
        no_answer = (labels[:, 1:] != -100).sum(dim=1) == 0
        losses = torch.where(no_answer.to(losses.device), torch.nan, losses)
        return {
            schema.GRAD_PROJ: proj.cpu().numpy(),
            schema.GRAD_NORM: norms.cpu().numpy(),
            schema.ANSWER_LOSS: losses.detach().float().cpu().numpy(),
        }

    __call__ = compute

    # -- per-sample gradients ------------------------------------------------------------------------------
    def _per_sample_loop(self, ids, mask, labels, pixels, extra) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Reference: batch size 1 on each sample's non-pad tokens. Returns [B, n_p] pieces and losses [B]."""
        per_sample, losses = [], []
        for b in range(ids.shape[0]):
            keep = mask[b].bool()
            image = extra.row_inputs(b, pixels, keep)
            with torch.enable_grad():
                out = self.model(input_ids=ids[b, keep][None], attention_mask=mask[b, keep][None].long(),
                                 **image, use_cache=False)
                loss = answer_cross_entropy(out.logits[0], labels[b, keep], "masked")
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            per_sample.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])
            losses.append(loss.detach())
        pieces = [torch.stack([s[i] for s in per_sample]).reshape(ids.shape[0], -1) for i in range(len(self.params))]
        return pieces, torch.stack(losses)

    def _per_sample_vmap(self, ids, mask, labels, pixels, extra) -> tuple[list[torch.Tensor], torch.Tensor]:
        """torch.func over the language model on precomputed ``inputs_embeds`` (see module docstring)."""
        from torch.func import functional_call, grad_and_value, vmap

        embeds, model_positions = self._input_embeddings(ids, mask, pixels, extra.model_inputs())
        # the model's own multimodal rotary positions ([3, B, T], Qwen2-VL M-RoPE, computed by its batched
        # forward from the grid and the attention mask) are kept; otherwise positions = cumsum(mask) - 1
        rope_3d = model_positions is not None and model_positions.ndim == 3
        positions = model_positions.detach() if rope_3d else (mask.long().cumsum(-1) - 1).clamp(min=0)
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        model = self.model
        # The LM head and the CE run only at the positions whose next token is an answer token in some sample of
        # the batch (HF causal LMs take them as ``logits_to_keep``): full-vocabulary logits at every position
        # are most of a vmapped pass's memory. Same loss: every other position has label -100 in every sample.
        keep = None
        if self._keeps_logits:
            keep = torch.nonzero((labels[:, 1:] != -100).any(dim=0)).flatten()
            keep = keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=labels.device)
        head = {} if keep is None else {"logits_to_keep": keep}

        def loss_fn(p, emb, m4, pos, lab):
            out = functional_call(model, p, args=(), kwargs=dict(
                inputs_embeds=emb[None], attention_mask=m4[None], position_ids=pos[:, None] if rope_3d else pos[None],
                use_cache=False, **head))
            if keep is None:
                return answer_cross_entropy(out.logits[0], lab, "masked")
            return answer_cross_entropy(out.logits[0], lab[keep + 1], "masked", shifted=True)

        with _text_attention(self.model, self.vmap_attention):
            mask4 = self._prepared_mask(mask, embeds.dtype)
            per_sample = vmap(grad_and_value(loss_fn), in_dims=(None, 0, 0, 1 if rope_3d else 0, 0),
                              chunk_size=self.chunk_size)
            grads, losses = per_sample(params, embeds, mask4, positions, labels)
        return [grads[n].reshape(ids.shape[0], -1) for n in self.names], losses

    # -- shared post-processing ----------------------------------------------------------------------------
    def _finish(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 norms of the raw gradient, optional Adam preconditioning, projection (no flat copy)."""
        sq = torch.zeros(pieces[0].shape[0], dtype=torch.float32, device=pieces[0].device)
        features = []
        offset = 0
        for piece in pieces:
            g = piece.float()
            sq += (g * g).sum(dim=1)
            if self.adam_state is not None:
                n = g.shape[1]
                m = self.adam_state.exp_avg[offset:offset + n].to(g.device)
                v = self.adam_state.exp_avg_sq[offset:offset + n].to(g.device)
                g = adam_precondition(g, m, v)
                offset += n
            features.append(g)
        return self.projector.project(features), sq.sqrt()

    # -- helpers -------------------------------------------------------------------------------------------
    def _unpack(self, batch):
        def get(key):
            value = batch[key] if isinstance(batch, Mapping) else getattr(batch, key)
            return None if value is None else torch.as_tensor(value).to(self.device)

        def field_of(key):
            return batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)

        extra = {k: torch.as_tensor(v).to(self.device) for k, v in (field_of("image_inputs") or {}).items()}
        tokens = {k: torch.as_tensor(v).to(self.device) for k, v in (field_of("token_inputs") or {}).items()}
        ids, mask, labels, pixels = (get(k) for k in ("input_ids", "attention_mask", "labels", "pixel_values"))
        if ids.ndim != 2 or mask.shape != ids.shape or labels.shape != ids.shape:
            raise ValueError(f"input_ids/attention_mask/labels must be [B, T] alike, got {tuple(ids.shape)}, "
                             f"{tuple(mask.shape)}, {tuple(labels.shape)}")
        if pixels is not None:
            pixels = pixels.to(next(self.model.parameters()).dtype)
        counts = field_of("pixel_counts")
        input_counts = field_of("image_input_counts") or {}
        if counts is None:  # one image per row with image tokens
            has = torch.zeros(ids.shape[0], dtype=torch.int64) if self.image_token_id is None else \
                (ids == self.image_token_id).any(dim=1).long().cpu()
            input_counts = {k: has for k in extra}
            counts = has
            if CONCATENATED_PATCHES_KEY in extra:  # row b's patches: prod(grid_thw) of its image
                patches = extra[CONCATENATED_PATCHES_KEY].prod(dim=-1).cpu()
                counts = torch.zeros_like(has)
                counts[has.bool()] = patches
        images = _BatchImages(extra, torch.as_tensor(counts).long().cpu(),
                              {k: torch.as_tensor(v).long().cpu() for k, v in input_counts.items()}, tokens)
        images.check(ids.shape[0], pixels)
        return ids, mask, labels.long(), pixels, images

    def _vmap_support(self) -> tuple[str | None, str]:
        """Name of the language-model submodule (or None) and why vmap is unsupported ("" when supported)."""
        config = getattr(self.model, "config", None)
        attn = self.vmap_attention or getattr(getattr(config, "text_config", config), "_attn_implementation",
                                              None) or "sdpa"
        if attn not in ("sdpa", "eager"):
            return None, f"attention implementation {attn!r} takes no prepared 4-D mask"
        names = [n for n, _ in self.model.named_modules() if n.split(".")[-1] in LANGUAGE_MODEL_NAMES]
        if not names:
            outside = [n for n in self.names if "embed_tokens" in n]
            return None, (f"parameter {outside[0]} is part of the embedding" if outside else "")
        lm = min(names, key=len)
        outside = [n for n in self.names if not n.startswith(lm + ".")]
        if outside:
            return lm, f"selected parameter {outside[0]!r} lies outside {lm!r}"
        return lm, ""

    def _input_embeddings(self, ids, mask, pixels, extra) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Batched, no-grad ``inputs_embeds`` of the language model (image features merged) and the
        ``position_ids`` the model passes it (None when it leaves them to the language model)."""
        if self._lm_name is None:
            with torch.no_grad():
                return self.model.get_input_embeddings()(ids), None
        captured = {}

        def hook(_module, _args, kwargs):
            captured["embeds"] = kwargs["inputs_embeds"]
            captured["positions"] = kwargs.get("position_ids")
            raise _StopForward

        lm = self.model.get_submodule(self._lm_name)
        handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=mask.long(), pixel_values=pixels, **extra, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "embeds" not in captured:
            raise RuntimeError(f"{self._lm_name} was not called with inputs_embeds")
        return captured["embeds"].detach(), captured["positions"]

    def _prepared_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, T, T] causal x key-padding mask; bool for SDPA, additive float for eager attention."""
        t = mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
        allowed = (causal[None] & mask.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool, device=mask.device)
        config = self.model.config
        attn = getattr(getattr(config, "text_config", config), "_attn_implementation", None) or "sdpa"
        if attn == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)[:, None]
        return allowed[:, None]


@contextlib.contextmanager
def _text_attention(model: nn.Module, implementation: str | None):
    """Switch the language model's attention implementation (its config's ``_attn_implementation``, read at
    every forward) for the duration of the block; None leaves it as is."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", config)
    previous = getattr(text, "_attn_implementation", None)
    if implementation is None or text is None or previous == implementation:
        yield
        return
    text._attn_implementation = implementation
    try:
        yield
    finally:
        text._attn_implementation = previous


@dataclass
class _BatchImages:
    """The image side of a batch, per row: ``image_inputs`` {key: [entries, ...]}, ``pixel_counts`` int64 [B]
    (leading entries of pixel_values per row), ``input_counts`` {key: int64 [B]}, ``token_inputs`` {key: [B, T]}.
    With ``pixel_attention_mask`` (Idefics3) pixel_values and that input carry a batch axis of 1 in front."""

    extra: dict
    pixel_counts: torch.Tensor
    input_counts: dict
    token_inputs: dict

    @property
    def batch_axis(self) -> bool:
        return BATCH_AXIS_KEY in self.extra

    def check(self, rows: int, pixels) -> None:
        n = 0 if pixels is None else pixels.shape[1 if self.batch_axis else 0]
        if self.pixel_counts.shape != (rows,) or int(self.pixel_counts.sum()) != n:
            raise ValueError(f"pixel_counts {self.pixel_counts.tolist()} do not add up to the {n} leading entries "
                             f"of pixel_values")
        for key, value in self.extra.items():
            counts = self.input_counts.get(key)
            entries = value.shape[1 if self.batch_axis else 0]
            if counts is None or int(counts.sum()) != entries:
                raise ValueError(f"image_input_counts[{key!r}] do not add up to its {entries} entries")

    def model_inputs(self) -> dict:
        """The batch's image inputs and token inputs as model keyword arguments."""
        return {**self.extra, **self.token_inputs}

    def row_inputs(self, b: int, pixels, keep: torch.Tensor) -> dict:
        """Model keyword arguments of row ``b`` alone (``keep``: its non-pad positions); pixel_values None
        without images."""
        if int(self.pixel_counts[b]) == 0:
            return {"pixel_values": None}

        def part(value, counts):
            start = int(counts[:b].sum())
            end = start + int(counts[b])
            return value[:, start:end] if self.batch_axis else value[start:end]

        out = {"pixel_values": part(pixels, self.pixel_counts)}
        out.update({k: part(v, self.input_counts[k]) for k, v in self.extra.items()})
        out.update({k: v[b, keep][None] for k, v in self.token_inputs.items()})
        return out


class _StopForward(Exception):
    """Raised by the capture hook to skip the rest of the batched no-grad forward."""


def adam_precondition(g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> torch.Tensor:
    """LESS ``adam`` feature ``Γ = m' / sqrt(v' + 1e-8)``; g fp32 [B, n], moments fp32 [n]; inputs not modified."""
    m = ADAM_BETA1 * exp_avg + (1 - ADAM_BETA1) * g
    v = ADAM_BETA2 * exp_avg_sq + (1 - ADAM_BETA2) * g * g
    return m / torch.sqrt(v + ADAM_EPS)


def _image_token_id(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None:
            return int(value)
    return None
