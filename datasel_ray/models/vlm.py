"""Generic reference-VLM wrapper for any HF image-text-to-text model (local dir or hub id).

Two halves, so CPU preprocessing never loads weights:

- :class:`VLMProcessor` (processor only): LLaVA-form conversation + a list of images (one per ``<image>``
  placeholder, none for text-only) -> :class:`PreparedSample` (token ids, pixel values, image/text/answer masks),
  with the chat template of the model itself.
- :class:`ReferenceVLM` (weights): a padded forward pass with hooks that returns, per sample, the COINCIDE
  activations (``self_attn.o_proj`` outputs, COINCIDE Eq. 2-3), the pre-final-norm output of the last decoder
  block (DataTailor Eq. 2 features) and the mean answer-token cross-entropy.

The models this project builds offline (``tiny``, ``smol-llava``; :mod:`datasel_ray.models.loading`) go through
exactly the same code, and so do the reference architectures whose processor needs no torchvision once its
video processor is left out (Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, LLaVA-OneVision;
:func:`datasel_ray.models.processors.load_processor`).

Several images per sample: every image is placed where its ``<image>`` placeholder stands in the turns; the
sample's pixels hold all of them along their leading axis, in placeholder order, and ``image_mask`` marks every
image token of all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datasel_ray.config import ModelConfig
from datasel_ray.models.loading import resolve_model
from datasel_ray.roles import IMAGE_PLACEHOLDER, KNOWN_ROLES, chat_role

_ATTN_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
# processor outputs that describe the text, not the image
_TEXT_OUTPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})
# per-token model inputs besides input_ids that a processor returns and the model needs (Qwen2-VL's M-RoPE reads
# which tokens are image tokens from it); padded with 0 (= text) in a batch
TOKEN_INPUTS = ("mm_token_type_ids",)
# present when a processor returns all images' patches concatenated instead of one array per image (Qwen2-VL):
# image i has prod(image_grid_thw[i]) rows of pixel_values
CONCATENATED_PATCHES_KEY = "image_grid_thw"
# present when a processor keeps a batch axis in front of the images (Idefics3 / SmolVLM: pixel_values
# [batch, images, C, H, W] with pixel_attention_mask [batch, images, H, W]; all-zero images are padding)
BATCH_AXIS_KEY = "pixel_attention_mask"


class ContextTooShortError(ValueError):
    """The image span does not fit in the model context, so the sample cannot be truncated safely."""


class ChatTemplateError(ValueError):
    """The chat template does not render conversation prefixes as token prefixes (answer spans undefined)."""


@dataclass
class PreparedSample:
    """One tokenised sample. All arrays have the same length L (no padding).

    input_ids: int64 [L]; pixel_values: float32, the processor's pixels of the sample's N >= 1 images in
    placeholder order, or None (text-only): [N, C, H, W] for LLaVA-1.5-style processors, [N, tiles, C, H, W] for
    LLaVA-NeXT / LLaVA-OneVision (any-resolution tiles, zero-padded to the sample's largest count),
    [sum_i prod(grid_thw_i), patch_dim] for processors that concatenate patches (Qwen2-VL / Qwen2.5-VL, marked by
    ``image_grid_thw``), [tiles of all images, C, H, W] for Idefics3 / SmolVLM (batch axis dropped; marked by
    ``pixel_attention_mask``); image_mask: bool [L] (input_ids == image token id, every image of the sample);
    text_mask: bool [L] (COINCIDE text span: every token after the last image token, every token for text-only
    samples); answer_mask: bool [L] (assistant answer tokens plus the end-of-turn token the template emits after
    each); truncated: cut to the model context; image_inputs: the processor's other image inputs with the same
    leading axis convention (e.g. ``image_sizes`` int64 [N, 2] for LLaVA-NeXT, ``image_grid_thw`` int64 [N, 3]
    for Qwen2-VL, ``pixel_attention_mask`` bool [tiles, H, W] for Idefics3), or None; token_inputs: per-token
    model inputs of :data:`TOKEN_INPUTS` the processor returned (int64 [L] each, e.g. ``mm_token_type_ids``), or
    None.
    """

    input_ids: np.ndarray
    pixel_values: np.ndarray | None
    image_mask: np.ndarray
    text_mask: np.ndarray
    answer_mask: np.ndarray
    truncated: bool = False
    image_inputs: dict[str, np.ndarray] | None = None
    token_inputs: dict[str, np.ndarray] | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def has_image(self) -> bool:
        return self.pixel_values is not None

    @property
    def pixel_rows(self) -> int:
        """Leading-axis entries of ``pixel_values`` (images, tiles or patches; 0 for text-only)."""
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


@dataclass
class PaddedBatch:
    """Right-padded batch of :class:`PreparedSample`.

    input_ids int64 [B, T]; attention_mask int64 [B, T]; labels int64 [B, T] (input id on answer tokens, -100
    elsewhere, unshifted as HF causal-LM losses expect); pixel_values float32 for the rows with an image, in row
    order, or None: the samples' pixels concatenated along their leading axis (each zero-padded to the batch's
    largest trailing shape, as the processors pad a batch: LLaVA-NeXT tiles, Idefics3 tile sizes), with the batch
    axis put back in front for ``pixel_attention_mask`` processors ([1, all tiles, C, H, W]); lengths int64 [B]
    (non-pad tokens per row); image_inputs: the samples' ``image_inputs`` concatenated per key the same way;
    pixel_counts int64 [B]: leading-axis entries of ``pixel_values`` per row (images, tiles, or for
    ``image_grid_thw`` models the rows' cumulative ``prod(grid_thw)`` patches; 0 for text-only rows);
    image_input_counts: {key: int64 [B]} the same for each image input; token_inputs: {key: int64 [B, T]} per-token
    inputs (:data:`TOKEN_INPUTS`), 0 on padding.
    """

    input_ids: Any
    attention_mask: Any
    labels: Any
    pixel_values: Any
    lengths: Any
    image_inputs: dict = field(default_factory=dict)
    pixel_counts: Any = None
    image_input_counts: dict = field(default_factory=dict)
    token_inputs: dict = field(default_factory=dict)

    def image_kwargs(self, device, dtype) -> dict:
        """Model keyword arguments for the images: ``pixel_values`` cast to ``dtype`` plus ``image_inputs``
        (integer/bool tensors, not cast) and ``token_inputs``, all on ``device``; ``pixel_values=None`` for a
        text-only batch."""
        pixels = None if self.pixel_values is None else self.pixel_values.to(device, dtype=dtype)
        return {"pixel_values": pixels, **{k: v.to(device) for k, v in self.image_inputs.items()},
                **{k: v.to(device) for k, v in self.token_inputs.items()}}


@dataclass
class SampleActivations:
    """Hooked activations of one sample, restricted to its non-pad tokens (float32, CPU).

    layer_outputs: one Tensor [L, d] per COINCIDE layer (o_proj outputs, layer order);
    last_hidden: Tensor [L, d], pre-final-norm output of the last decoder block;
    answer_loss: mean CE over answer tokens (shifted by one), nan when there is none.
    """

    layer_outputs: list
    last_hidden: Any
    answer_loss: float


def conversation_to_messages(conversations: list[dict], with_image: bool | int,
                             image_first: bool = False) -> list[dict]:
    """Convert LLaVA-form turns (``from``/``value`` with ``<image>``) to chat-template messages.

    ``with_image``: the number of images of the sample (True = 1, False = 0). Content becomes
    ``[{"type": "image"}, {"type": "text", "text": ...}]`` items. The k-th ``<image>`` placeholder, in turn
    order, becomes the k-th image item, where it stands; when the row writes no placeholder, all images go to
    the start of the first human turn (as LLaVA inserts one); placeholders beyond the number of images and the
    newline that LLaVA writes next to a placeholder are dropped. Without an image every placeholder is dropped:
    text-only samples carry no image tokens. Fewer placeholders than images (but at least one) is a ValueError:
    where the others stand is unknown (ingest quarantines such rows as ``placeholder_mismatch``).

    ``image_first`` (the references' ``preprocess_multimodal``): with one image, every placeholder is removed,
    the first human turn is stripped and the image item put at its front, wherever the row wrote ``<image>``.
    Rows with several images keep their placeholders where they stand, as LLaVA-NeXT / OneVision's
    ``preprocess_multimodal`` moves the image only when a turn holds exactly one.
    """
    n_images = int(with_image)
    if n_images == 1 and image_first:
        conversations = _image_to_front(conversations, n_images)
    n_placeholders = sum(str(t.get("value", t.get("content", ""))).count(IMAGE_PLACEHOLDER) for t in conversations)
    if 0 < n_placeholders < n_images:
        raise ValueError(f"conversations: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for {n_images} images")
    has_placeholder = n_placeholders > 0
    image_left = n_images
    messages = []
    for turn in conversations:
        role = chat_role(turn.get("from", turn.get("role", "")))
        if role is None:
            raise ValueError(f"Unknown conversation role {turn.get('from')!r}; expected one of {sorted(KNOWN_ROLES)}")
        value = str(turn.get("value", turn.get("content", "")))
        if image_left and not has_placeholder and role == "user":
            value = (IMAGE_PLACEHOLDER + "\n") * image_left + value
        content = []
        pieces = value.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                piece = piece.removeprefix("\n")
                if image_left:
                    content.append({"type": "image"})
                    image_left -= 1
            if i < len(pieces) - 1:
                piece = piece.removesuffix("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def _image_to_front(conversations: list[dict], n_images: int = 1) -> list[dict]:
    """Turns with every ``<image>`` removed and ``n_images`` x ``"<image>\\n"`` + the stripped text as the first
    human turn."""
    out = []
    placed = False
    for turn in conversations:
        key = "value" if "value" in turn else "content"
        value = str(turn.get(key, "")).replace(IMAGE_PLACEHOLDER, "")
        role = chat_role(turn.get("from", turn.get("role", "")))
        if role == "user" and not placed:
            value = (IMAGE_PLACEHOLDER + "\n") * n_images + value.strip()
            placed = True
        elif IMAGE_PLACEHOLDER in str(turn.get(key, "")):
            value = value.strip()
        out.append({**turn, key: value})
    return out


def expand2square(image, background: tuple[int, int, int]):
    """LLaVA's ``expand2square``: ``image`` (PIL) centred on a square canvas of its longer side filled with
    ``background`` (RGB 0-255); a square image is returned as is."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background if image.mode == "RGB" else background[0])
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def processor_mean_colour(processor) -> tuple[int, int, int]:
    """The image processor's ``image_mean`` as RGB 0-255 (``int(x * 255)`` per channel, as LLaVA)."""
    image_processor = getattr(processor, "image_processor", processor)
    mean = getattr(image_processor, "image_mean", None)
    if mean is None or len(mean) != 3:
        raise ValueError(f"model.pad_to_square needs the image processor's image_mean (3 values), got {mean!r}; "
                         "set model.pad_to_square=false")
    return tuple(int(x * 255) for x in mean)


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().is_dir()


def _load_kwargs(model_cfg: ModelConfig, path: str) -> dict:
    return {
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "local_files_only": _is_local(path),
    }


class VLMProcessor:
    """Chat template + tokenizer + image processor of a reference model; no weights.

    ``pad_to_square``: :func:`expand2square` with the processor's mean colour before the processor;
    ``image_first``: ``<image>`` moved to the front of the first human turn (see :func:`conversation_to_messages`);
    both off by default here, set from :class:`ModelConfig` by :meth:`load`.
    """

    def __init__(self, processor, max_length: int | None = None, pad_to_square: bool = False,
                 image_first: bool = False):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_first = image_first
        self.pad_colour = processor_mean_colour(processor) if pad_to_square else None
        token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        self.image_token_id = int(getattr(processor, "image_token_id", None)
                                  or self.tokenizer.convert_tokens_to_ids(token))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @classmethod
    def load(cls, model_cfg: ModelConfig) -> VLMProcessor:
        """Load the processor of ``model_cfg.name_or_path``; context = ``min(max_length, the model's limit)``
        (either when the other is unknown); preprocessing switches resolved from ``model_cfg``, except that
        ``pad_to_square`` left unset stays off for processors with other image inputs than ``pixel_values``
        (LLaVA-NeXT any-resolution tiles, Qwen2-VL patches: the references pad only single-tile LLaVA inputs)."""
        from transformers import AutoConfig

        from datasel_ray.models.processors import load_processor

        path = resolve_model(model_cfg)
        kwargs = _load_kwargs(model_cfg, path)
        processor = load_processor(path, **kwargs)
        config = AutoConfig.from_pretrained(path, **kwargs)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limits = [n for n in (model_cfg.max_length, getattr(text_config, "max_position_embeddings", None))
                  if n is not None]
        out = cls(processor, max_length=min(limits) if limits else None, image_first=model_cfg.resolved_image_first())
        pad = model_cfg.resolved_pad_to_square()
        if model_cfg.pad_to_square is None and pad and out.extra_image_inputs():
            pad = False  # any-resolution processors (LLaVA-NeXT tiles, Qwen2-VL patches) take the aspect ratio as is
        out.pad_colour = processor_mean_colour(processor) if pad else None
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _text_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (one tokenizer call); no special tokens: the chat template renders BOS/EOS."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _encode(self, text: str, images: list) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray] | None,
                                                       dict[str, np.ndarray] | None]:
        """Processor output of one sample: token ids int64 [L], its pixels and image inputs (leading axis =
        images / tiles / patches, see :class:`PreparedSample`; None without images) and its token inputs."""
        out = self.processor(text=[text], images=list(images) if images else None,
                             add_special_tokens=False, return_tensors="np")
        ids = np.asarray(out["input_ids"][0], dtype=np.int64)
        tokens = {k: np.asarray(out[k][0], dtype=np.int64) for k in TOKEN_INPUTS if k in out}
        if not images:
            return ids, None, None, tokens or None
        extra = {k: np.asarray(v) for k, v in out.items() if k not in _TEXT_OUTPUTS and k != "pixel_values"}
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        if BATCH_AXIS_KEY in extra:  # [1, images, ...] -> [images, ...]
            pixels = pixels[0]
            extra = {k: v[0] for k, v in extra.items()}
        return ids, pixels, extra or None, tokens or None

    def extra_image_inputs(self, size: int = 64) -> list[str]:
        """Names of the model inputs besides ``pixel_values`` the processor makes of an image (probed with a grey
        ``size`` x ``size`` image): [] for LLaVA-1.5, ``['image_sizes']`` for LLaVA-NeXT, ..."""
        from PIL import Image

        probe = Image.new("RGB", (size, size), (127, 127, 127))
        return sorted(self._encode(self.image_token, [probe])[2] or {})

    @property
    def image_token(self) -> str:
        """The text of the processor's image placeholder token (``<image>``, Qwen2-VL's ``<|image_pad|>``)."""
        return getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)

    def pixel_values(self, image) -> np.ndarray:
        """float32 pixel values the processor makes of ``image`` (a PIL image); see :class:`PreparedSample`."""
        return self._encode(self.image_token, [image])[1]

    def image_token_counts(self, images: list) -> list[int]:
        """Tokens the processor puts in place of one placeholder for each image alone (one processor call per
        image): the run of image tokens and the markers around them (Idefics3's ``<fake_token_around_image>``)."""
        return [int(self._encode(self.image_token, [image])[0].shape[0]) for image in images]

    def prepare(self, conversations: list[dict], image=None, max_length: int | None = None) -> PreparedSample:
        """Tokenise one LLaVA-form sample with the model's chat template and compute its token masks.

        ``image``: a list of PIL images, one per ``<image>`` placeholder in turn order (empty for text-only;
        see :func:`conversation_to_messages` for rows without placeholders), or one PIL image, or None. The
        sample is cut to ``max_length`` (default: the model context) but never inside the image span:
        :class:`ContextTooShortError` when the span alone does not fit. :class:`ChatTemplateError` when the
        template does not render conversation prefixes as token prefixes.
        """
        images = as_image_list(image)
        messages = conversation_to_messages(conversations, with_image=len(images), image_first=self.image_first)
        if images and self.pad_colour is not None:
            images = [expand2square(im, self.pad_colour) for im in images]
        full_text = self.render(messages)
        # each assistant turn spans [the prefix before it + generation prompt, the prefix through it); all texts
        # are tokenised in one call (the last turn's end is the full text)
        texts = [full_text]
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                texts.append(self.render(messages[:k], add_generation_prompt=True))
                texts.append(full_text if k + 1 == len(messages) else self.render(messages[: k + 1]))
        text_ids = self._text_ids(texts)
        ids, pixels, image_inputs, token_inputs = self._encode(full_text, images)
        runs = self.image_token_counts(images) if len(images) > 1 else None
        to_full = self._prefix_mapper(text_ids[0], ids, runs)
        answer = np.zeros(ids.shape[0], dtype=bool)
        for start_ids, end_ids in zip(text_ids[1::2], text_ids[2::2]):
            answer[to_full(start_ids):to_full(end_ids)] = True
        image_mask = ids == self.image_token_id
        if images and not image_mask.any():
            raise ChatTemplateError("the processor inserted no image token for a sample with an image")
        text_mask = np.ones_like(image_mask)
        if image_mask.any():
            text_mask[: int(np.flatnonzero(image_mask)[-1]) + 1] = False
        sample = PreparedSample(ids, pixels, image_mask, text_mask, answer, image_inputs=image_inputs,
                                token_inputs=token_inputs)
        return truncate(sample, max_length or self.max_length)

    def _prefix_mapper(self, text_ids: np.ndarray, full_ids: np.ndarray, runs: list[int] | None = None):
        """Return f(prefix_text_ids) -> prefix length in ``full_ids`` (processor output with the images expanded).

        The processor replaces the k-th image placeholder token by a run of ``runs[k]`` tokens (one image: the
        run is whatever makes the lengths agree; several: ``runs`` from :meth:`image_token_counts`); ids
        between placeholders are unchanged and shifted by the runs before them. Both facts are checked.
        """
        hits = np.flatnonzero(text_ids == self.image_token_id)
        delta = full_ids.shape[0] - text_ids.shape[0]
        if runs is None:
            if delta and hits.size != 1:
                raise ChatTemplateError(f"expected one image placeholder token, found {hits.size}")
            runs = [delta + 1] * hits.size
        elif len(runs) != hits.size or sum(runs) - len(runs) != delta:
            raise ChatTemplateError(f"{hits.size} image placeholder tokens and {delta} added tokens do not match "
                                    f"the processor's {len(runs)} image runs of {runs} tokens")
        shifts = np.cumsum([0] + [r - 1 for r in runs])  # shift of the text after placeholder k
        bounds = [0, *(int(h) for h in hits), text_ids.shape[0]]
        for k in range(len(bounds) - 1):
            lo = bounds[k] + (1 if k else 0)
            hi = bounds[k + 1]
            if not np.array_equal(full_ids[lo + shifts[k]:hi + shifts[k]], text_ids[lo:hi]):
                raise ChatTemplateError("processor output differs from the tokenised chat template outside the "
                                        "images")

        def to_full(prefix: np.ndarray) -> int:
            n = prefix.shape[0]
            if n > text_ids.shape[0] or not np.array_equal(prefix, text_ids[:n]):
                raise ChatTemplateError(
                    "the chat template renders a conversation prefix that is not a token prefix of the full "
                    "conversation, so answer tokens cannot be located; use a model whose template is prefix-stable")
            return n + int(shifts[int(np.searchsorted(hits, n))])

        return to_full


def as_image_list(images) -> list:
    """The images of one sample as a list: None -> [], one PIL image -> [image], a list/tuple -> a list."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def truncate(sample: PreparedSample, max_length: int | None) -> PreparedSample:
    """Cut ``sample`` to ``max_length`` tokens, never inside the image span (raise ContextTooShortError)."""
    if max_length is None or sample.length <= max_length:
        return sample
    if sample.image_mask.any() and int(np.flatnonzero(sample.image_mask)[-1]) >= max_length:
        raise ContextTooShortError(
            f"the image span ends at token {int(np.flatnonzero(sample.image_mask)[-1]) + 1} but the model context "
            f"is {max_length} tokens")
    cut = slice(0, max_length)
    tokens = None if sample.token_inputs is None else {k: v[cut] for k, v in sample.token_inputs.items()}
    return PreparedSample(sample.input_ids[cut], sample.pixel_values, sample.image_mask[cut],
                          sample.text_mask[cut], sample.answer_mask[cut], truncated=True,
                          image_inputs=sample.image_inputs, token_inputs=tokens)


def collate(samples: Sequence[PreparedSample], pad_token_id: int) -> PaddedBatch:
    """Right-pad ``samples`` into a :class:`PaddedBatch` of torch tensors (CPU)."""
    import torch

    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = torch.tensor([s.length for s in samples], dtype=torch.int64)
    width = int(lengths.max())
    ids = torch.full((len(samples), width), pad_token_id, dtype=torch.int64)
    labels = torch.full((len(samples), width), -100, dtype=torch.int64)
    attention = torch.zeros((len(samples), width), dtype=torch.int64)
    for b, s in enumerate(samples):
        row = torch.from_numpy(np.ascontiguousarray(s.input_ids, dtype=np.int64))
        ids[b, : s.length] = row
        attention[b, : s.length] = 1
        answer = torch.from_numpy(np.ascontiguousarray(s.answer_mask, dtype=bool))
        labels[b, : s.length] = torch.where(answer, row, torch.full_like(row, -100))
    with_image = [s for s in samples if s.has_image]
    keys = sorted(with_image[0].image_inputs or {}) if with_image else []
    if any(sorted(s.image_inputs or {}) != keys for s in with_image):
        raise ValueError("collate: samples with images carry different image inputs "
                         f"({sorted({tuple(sorted(s.image_inputs or {})) for s in with_image})})")
    pixel_counts = torch.tensor([s.pixel_rows for s in samples], dtype=torch.int64)
    input_counts = {k: torch.tensor([s.image_inputs[k].shape[0] if s.has_image else 0 for s in samples],
                                    dtype=torch.int64) for k in keys}
    if with_image:
        pixels = _concat_padded([s.pixel_values for s in with_image])
        extra = {k: _concat_padded([s.image_inputs[k] for s in with_image]) for k in keys}
        if BATCH_AXIS_KEY in keys:  # the model takes [batch, images, ...]; all tiles as one batch entry
            pixels = pixels[None]
            extra = {k: v[None] for k, v in extra.items()}
    else:
        pixels, extra = None, {}
    token_keys = sorted({k for s in samples for k in (s.token_inputs or {})})
    token_inputs = {k: torch.zeros((len(samples), width), dtype=torch.int64) for k in token_keys}
    for b, s in enumerate(samples):
        for k in token_keys:
            if s.token_inputs and k in s.token_inputs:
                token_inputs[k][b, : s.length] = torch.from_numpy(np.asarray(s.token_inputs[k], dtype=np.int64))
    return PaddedBatch(ids, attention, labels, pixels, lengths, extra, pixel_counts, input_counts, token_inputs)


def _concat_padded(arrays: list):
    """Concatenate arrays of the same rank along axis 0, each zero-padded (zeros / False) to the largest trailing
    shape: LLaVA-NeXT images with different tile counts and Idefics3 tiles of different sizes, padded as their
    own processors pad a batch (the models read the real extent from ``image_sizes`` / ``pixel_attention_mask``
    and drop all-zero Idefics3 images)."""
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if len({t.ndim for t in tensors}) != 1:
        raise ValueError(f"collate: image arrays of different ranks {sorted({t.ndim for t in tensors})}")
    trailing = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
    out = []
    for t in tensors:
        if list(t.shape[1:]) != trailing:
            padded = torch.zeros([t.shape[0], *trailing], dtype=t.dtype)
            padded[tuple(slice(0, n) for n in t.shape)] = t
            t = padded
        out.append(t)
    return torch.cat(out)


def length_groups(lengths: Sequence[int], max_padding: float | None) -> list[list[int]]:
    """Split a batch into padded passes of similar length: indices sorted by length, each group grown while its
    padded size ``max(len) * |group|`` stays within ``(1 + max_padding) * sum(len)``.

    Right-padding a short sample to a long one costs the full long pass on a CPU (and idle lanes on a GPU);
    grouping keeps that waste bounded. ``max_padding=None`` keeps one group in input order. Returns groups of
    positions into ``lengths``; every position appears once.
    """
    positions = list(range(len(lengths)))
    if max_padding is None or len(positions) < 2:
        return [positions] if positions else []
    if max_padding < 0:
        raise ValueError(f"max_padding must be >= 0 or None, got {max_padding}")
    order = sorted(positions, key=lambda i: (lengths[i], i))
    groups: list[list[int]] = [[order[0]]]
    total = lengths[order[0]]
    for i in order[1:]:
        group = groups[-1]
        if lengths[i] * (len(group) + 1) <= (1.0 + max_padding) * (total + lengths[i]):
            group.append(i)
            total += lengths[i]
        else:
            groups.append([i])
            total = lengths[i]
    return groups


def default_coincide_layers(n_layers: int) -> list[int]:
    """~5 evenly spaced 0-based layers: ``(i+1)*n//6 - 1`` (24 layers -> 3, 7, 11, 15, 19 as COINCIDE); all if n<=5."""
    if n_layers <= 5:
        return list(range(n_layers))
    return [(i + 1) * n_layers // 6 - 1 for i in range(5)]


def find_decoder_layers(model):
    """The language model's decoder layers (an ``nn.ModuleList`` whose blocks have ``self_attn``).

    Tries the usual attribute paths first, then the first matching ModuleList outside any vision tower.
    """
    import torch.nn as nn

    for path in ("model.language_model.layers", "language_model.model.layers", "language_model.layers",
                 "model.layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) and hasattr(obj[0], "self_attn"):
            return obj
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "self_attn")
                and not any(v in name.lower() for v in ("vision", "visual", "image", "encoder"))):
            return module
    raise ValueError(f"No decoder layers with `self_attn` found in {type(model).__name__}")


def attention_output_module(layer):
    """The attention output projection of a decoder block (``self_attn.o_proj`` or its usual aliases)."""
    for name in _ATTN_OUT_NAMES:
        module = getattr(layer.self_attn, name, None)
        if module is not None:
            return module
    raise ValueError(f"No attention output projection ({', '.join(_ATTN_OUT_NAMES)}) in {type(layer).__name__}")


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_outputs(modules: dict) -> Iterator[dict]:
    """Forward hooks storing each module's output tensor under its key; hooks are removed on exit."""
    store: dict = {}
    handles = []

    def make_hook(key):
        def hook(_module, _inputs, output):
            store[key] = _first_tensor(output).detach()
        return hook

    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(key)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


class ReferenceVLM:
    """A loaded reference model plus its :class:`VLMProcessor` and the COINCIDE layer choice."""

    def __init__(self, model, processor: VLMProcessor, device, coincide_layers: list[int] | None = None):
        self.model = model
        self.processor = processor
        self.device = device
        self.decoder_layers = find_decoder_layers(model)
        n = len(self.decoder_layers)
        layers = list(coincide_layers) if coincide_layers is not None else default_coincide_layers(n)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad or not layers:
            raise ValueError(f"model.coincide_layers: layers {bad or layers} out of range for a {n}-layer model")
        self.coincide_layers = layers
        # entered around every feature pass; a GradientStage sharing this model sets it to the adapter's
        # disable_adapter() so that features always come from the base weights
        self.feature_context: Callable[[], AbstractContextManager] = nullcontext

    @classmethod
    def load(cls, model_cfg: ModelConfig, device=None) -> ReferenceVLM:
        """Load weights (``AutoModelForImageTextToText``) and processor; device default: cuda if available."""
        import torch
        from transformers import AutoModelForImageTextToText

        path = resolve_model(model_cfg)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if model_cfg.dtype == "auto" else getattr(torch, model_cfg.dtype)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **_load_kwargs(model_cfg, path))
        model.to(device).eval()
        return cls(model, VLMProcessor.load(model_cfg), torch.device(device), model_cfg.coincide_layers)

    def hook_points(self) -> dict:
        """Where the features come from in this architecture (written to the extract manifest): the model class,
        the hooked modules' qualified names (COINCIDE: ``self_attn`` output projections of ``coincide_layers``;
        DataTailor: the last decoder block, whose output is taken before the final norm) and the number of
        decoder layers."""
        names = {id(module): name for name, module in self.model.named_modules()}
        return {
            "architecture": type(self.model).__name__,
            "decoder_layers": len(self.decoder_layers),
            "coincide_layers": list(self.coincide_layers),
            "coincide_modules": [names[id(attention_output_module(self.decoder_layers[layer]))]
                                 for layer in self.coincide_layers],
            "datatailor_module": names[id(self.decoder_layers[-1])],
        }

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.hidden_size)

    def collate(self, samples: Sequence[PreparedSample]) -> PaddedBatch:
        return collate(samples, self.processor.pad_token_id)

    def forward_features(self, samples: Sequence[PreparedSample]) -> list[SampleActivations]:
        """One no-grad padded forward pass; per sample the hooked activations over its non-pad tokens.

        Hooks: ``layers[l].self_attn.o_proj`` for l in ``coincide_layers`` (COINCIDE Eq. 2-3: MSA output before
        the residual add) and the last decoder block (pre-final-norm output, DataTailor features).
        """
        import torch

        from datasel_ray.models.answer_loss import answer_cross_entropy

        batch = self.collate(samples)
        modules = {("layer", layer): attention_output_module(self.decoder_layers[layer])
                   for layer in self.coincide_layers}
        modules["last"] = self.decoder_layers[-1]
        dtype = next(self.model.parameters()).dtype
        ids = batch.input_ids.to(self.device)
        with self.feature_context(), torch.inference_mode(), capture_outputs(modules) as store:
            out = self.model(input_ids=ids, attention_mask=batch.attention_mask.to(self.device),
                             **batch.image_kwargs(self.device, dtype), use_cache=False)
            losses = answer_cross_entropy(out.logits, batch.labels.to(self.device), "row").tolist()
        results = []
        for b, n in enumerate(batch.lengths.tolist()):
            layer_outputs = [store[("layer", layer)][b, :n].float().cpu() for layer in self.coincide_layers]
            results.append(SampleActivations(layer_outputs, store["last"][b, :n].float().cpu(), losses[b]))
        return results


def load_conversations(value) -> list[dict]:
    """Conversations from a JSON string (schema column) or an already decoded list."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError(f"conversations must be a list of turns, got {type(value).__name__}")
    return value
