"""Extraction stages: CPU preprocessing and the reference-model feature pass (DESIGN.md, ``extract`` phase).

Both are plain callables over ``dict[str, np.ndarray]`` batches and never import Ray; the pipeline adapter maps
them onto Ray Data ``map_batches``. A failing row never fails its batch: it carries ``error_reason`` (a
:class:`datasel_ray.schema.Reason` code) and ``error_message``, with dummy arrays of the right dtypes and shapes.

Ragged per-row arrays (token ids, masks) travel as numpy object arrays of 1-D arrays, which Ray Data stores as
variable-shaped tensors; a batch whose rows happen to share a length comes back as a 2-D array, and both forms
are accepted on input.
"""

from __future__ import annotations

import numpy as np

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.features.activations import coincide_vector
from datasel_ray.features.spectrum import spectrum_stats
from datasel_ray.io.images import load_image, load_row_images
from datasel_ray.models.vlm import (
    ContextTooShortError,
    PreparedSample,
    ReferenceVLM,
    SampleActivations,
    VLMProcessor,
    length_groups,
    load_conversations,
)
from datasel_ray.schema import RowError

INPUT_IDS = "input_ids"
IMAGE_MASK = "image_mask"
TEXT_MASK = "text_mask"
IMAGE_INPUTS = "image_inputs"
TOKEN_INPUTS = "token_inputs"
ANSWER_MASK = "answer_mask"
PIXEL_VALUES = "pixel_values"
HAS_IMAGE = "has_image"


def object_column(arrays: list[np.ndarray]) -> np.ndarray:
    """1-D object array holding one array per row (never broadcast into a 2-D array by numpy)."""
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


class Preprocessor:
    """CPU stage: image decode, chat template, tokenisation and token masks (no model weights).

    Input columns: ``row_id`` int64, ``conversations`` (JSON string), and the row's images: ``images`` (ingest's
    list of image references per row, read with ``datasel_ray.io.images.load_row_images``; several images per
    sample, empty for text-only) when the batch has that column, else ``image_path`` (one path, "" for
    text-only). Output columns (B rows, row order kept): ``row_id`` int64 [B]; ``input_ids`` object [B] of int64
    [L_i]; ``image_mask`` / ``text_mask`` / ``answer_mask`` object [B] of bool [L_i]; ``pixel_values`` float32
    [B, 1, C, H, W] (one image per row; zeros where ``has_image`` is False), or object [B] of per-sample arrays
    when the pixel shapes vary by row (several images, LLaVA-NeXT tiles, Qwen2-VL patches; see
    :class:`~datasel_ray.models.vlm.PreparedSample`); ``image_inputs`` object [B] of dict | None, only when the
    processor returns other image inputs (``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``);
    ``token_inputs`` object [B] of dict | None, only when it returns per-token inputs (``mm_token_type_ids``);
    ``has_image`` bool [B];
    ``truncated`` bool [B]; ``error_reason`` / ``error_message`` str [B] ("" when fine). Failed rows get length-1
    dummy token arrays.
    """

    def __init__(self, model_cfg: ModelConfig):
        self.model_cfg = model_cfg
        self.processor: VLMProcessor | None = None
        self.pixel_shape: tuple[int, ...] | None = None

    def setup(self) -> None:
        """Load the processor and probe the pixel shape the image processor produces."""
        from PIL import Image

        if self.processor is not None:
            return
        self.processor = VLMProcessor.load(self.model_cfg)
        size = self.model_cfg.image_size or 64
        probe = self.processor.pixel_values(Image.new("RGB", (size, size), (127, 127, 127)))
        self.pixel_shape = tuple(probe.shape)

    def prepare_row(self, conversations, images) -> PreparedSample:
        """One row -> PreparedSample. ``images``: the row's PIL images in placeholder order (empty for text-only),
        or one image path ("" for text-only). Raises RowError with the quarantine reason on the row's own
        failure, and StorageError (:mod:`datasel_ray.io.images`) when an image cannot be read for another cause."""
        if isinstance(images, str):
            images = [load_image(images, self.model_cfg.image_size)] if images else []
        try:
            return self.processor.prepare(load_conversations(conversations), list(images))
        except ContextTooShortError as err:
            raise RowError(schema.Reason.TOO_LONG, str(err)) from err
        except Exception as err:
            if schema.is_machine_fault(err):
                raise
            raise RowError(schema.Reason.EXTRACT_FAILED, f"{type(err).__name__}: {err}") from err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.setup()
        samples: list[PreparedSample] = []
        reasons: list[str] = []
        messages: list[str] = []
        for i in range(len(batch[schema.ROW_ID])):
            try:
                sample = self.prepare_row(batch[schema.CONVERSATIONS][i], self.row_images(batch, i))
                reason, message = "", ""
            except RowError as err:
                sample, reason, message = self._dummy(), err.reason, str(err)
            samples.append(sample)
            reasons.append(reason)
            messages.append(message)
        return self.columns(np.asarray(batch[schema.ROW_ID], dtype=np.int64), samples, reasons, messages)

    def row_images(self, batch: dict[str, np.ndarray], i: int):
        """Row ``i``'s images: ingest's ``images`` list read by ``load_row_images`` (a list of PIL images,
        resized to ``model.image_size`` when set), else its ``image_path`` string ("" for text-only)."""
        if schema.IMAGES in batch:
            return load_row_images({key: column[i] for key, column in batch.items()}, self.model_cfg.image_size)
        paths = batch.get(schema.IMAGE_PATH)
        return "" if paths is None or paths[i] is None else str(paths[i])

    def _dummy(self) -> PreparedSample:
        ids = np.full(1, self.processor.pad_token_id, dtype=np.int64)
        empty = np.zeros(1, dtype=bool)
        return PreparedSample(ids, None, empty, empty.copy(), empty.copy())

    def columns(self, row_ids, samples, reasons, messages) -> dict[str, np.ndarray]:
        """Batch columns (see the class docstring) from prepared samples and their per-row errors."""
        shapes = {s.pixel_values.shape for s in samples if s.has_image}
        if shapes <= {self.pixel_shape}:
            pixels = np.zeros((len(samples), *self.pixel_shape), dtype=np.float32)
            for i, sample in enumerate(samples):
                if sample.has_image:
                    pixels[i] = sample.pixel_values
        else:  # per-image shapes differ (LLaVA-NeXT tiles, Qwen2-VL patches)
            pixels = object_column([s.pixel_values if s.has_image else np.zeros(0, np.float32) for s in samples])
        extra = {}
        if any(s.image_inputs for s in samples):
            extra[IMAGE_INPUTS] = object_column([s.image_inputs for s in samples])
        if any(s.token_inputs for s in samples):
            extra[TOKEN_INPUTS] = object_column([s.token_inputs for s in samples])
        return {
            schema.ROW_ID: row_ids,
            INPUT_IDS: object_column([s.input_ids for s in samples]),
            IMAGE_MASK: object_column([s.image_mask for s in samples]),
            TEXT_MASK: object_column([s.text_mask for s in samples]),
            ANSWER_MASK: object_column([s.answer_mask for s in samples]),
            PIXEL_VALUES: pixels,
            HAS_IMAGE: np.array([s.has_image for s in samples], dtype=bool),
            schema.TRUNCATED: np.array([s.truncated for s in samples], dtype=bool),
            schema.ERROR_REASON: np.array(reasons, dtype=object),
            schema.ERROR_MESSAGE: np.array(messages, dtype=object),
            **extra,
        }


def sample_from_row(batch: dict[str, np.ndarray], i: int) -> PreparedSample:
    """Rebuild row ``i`` of a Preprocessor batch (object or 2-D token columns) as a PreparedSample."""
    has_image = bool(batch[HAS_IMAGE][i])
    return PreparedSample(
        input_ids=np.asarray(batch[INPUT_IDS][i], dtype=np.int64),
        pixel_values=np.asarray(batch[PIXEL_VALUES][i], dtype=np.float32) if has_image else None,
        image_mask=np.asarray(batch[IMAGE_MASK][i], dtype=bool),
        text_mask=np.asarray(batch[TEXT_MASK][i], dtype=bool),
        answer_mask=np.asarray(batch[ANSWER_MASK][i], dtype=bool),
        truncated=bool(batch[schema.TRUNCATED][i]),
        image_inputs=batch[IMAGE_INPUTS][i] if IMAGE_INPUTS in batch and has_image else None,
        token_inputs=batch[TOKEN_INPUTS][i] if TOKEN_INPUTS in batch else None,
    )


class FeatureExtractor:
    """Model stage: COINCIDE vector, DataTailor spectrum stats, last-token vector and answer loss per row.

    Input: the :class:`Preprocessor` output. Output columns (B rows, row order kept):
    ``row_id`` int64 [B]; ``coincide_vector`` float16 [B, 2 * n_layers * hidden]; ``informativeness`` /
    ``tau`` / ``answer_loss`` float32 [B] (nan on failed rows; answer_loss also nan without answer tokens);
    ``last_token`` float16 [B, hidden]; ``n_image_tokens`` / ``n_text_tokens`` / ``n_answer_tokens`` int32 [B];
    ``truncated`` bool [B]; ``error_reason`` / ``error_message`` str [B]. Failed rows carry zero vectors.
    """

    def __init__(self, model_cfg: ModelConfig, device=None):
        self.model_cfg = model_cfg
        self.device = device
        self.vlm: ReferenceVLM | None = None

    def setup(self) -> None:
        """Load the reference model (weights + processor); called lazily by the first batch otherwise."""
        if self.vlm is None:
            self.vlm = ReferenceVLM.load(self.model_cfg, device=self.device)

    @property
    def coincide_dim(self) -> int:
        self.setup()
        return 2 * len(self.vlm.coincide_layers) * self.vlm.hidden_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.setup()
        n = len(batch[schema.ROW_ID])
        out = self._empty_columns(batch, n)
        reasons = out[schema.ERROR_REASON]
        todo = [i for i in range(n) if not reasons[i]]
        samples = {i: sample_from_row(batch, i) for i in todo}
        for i, acts in self._forward(samples).items():
            try:
                if isinstance(acts, Exception):
                    raise acts
                row = self._row_features(samples[i], acts)
            except Exception as err:  # recorded per row as extract_failed
                if schema.is_machine_fault(err):
                    raise
                reasons[i] = schema.Reason.EXTRACT_FAILED
                out[schema.ERROR_MESSAGE][i] = f"{type(err).__name__}: {err}"
                continue
            for col, value in row.items():
                out[col][i] = value
        return out

    @staticmethod
    def _row_features(sample: PreparedSample, acts: SampleActivations) -> dict:
        """Feature values of one row from its hooked activations (COINCIDE Eq. 2-3, DataTailor Eq. 2)."""
        u = coincide_vector(acts.layer_outputs, sample.image_mask, sample.text_mask)
        informativeness, tau = spectrum_stats(acts.last_hidden)
        return {
            schema.COINCIDE_VECTOR: u.numpy().astype(np.float16),
            schema.INFORMATIVENESS: informativeness,
            schema.TAU: tau,
            schema.LAST_TOKEN: acts.last_hidden[-1].numpy().astype(np.float16),
            schema.ANSWER_LOSS: acts.answer_loss,
            schema.N_IMAGE_TOKENS: int(sample.image_mask.sum()),
            schema.N_TEXT_TOKENS: int(sample.text_mask.sum()),
            schema.N_ANSWER_TOKENS: int(sample.answer_mask.sum()),
        }

    def _forward(self, samples: dict[int, PreparedSample]) -> dict[int, SampleActivations | Exception]:
        """Padded passes over groups of similar length (``model.max_padding``, see :func:`length_groups`);
        when a pass fails, each of its rows alone so one bad row only fails itself."""
        keys = list(samples)
        results: dict[int, SampleActivations | Exception] = {}
        for group in length_groups([samples[i].length for i in keys], self.model_cfg.max_padding):
            results.update(self._forward_group({keys[g]: samples[keys[g]] for g in group}))
        return results

    def _forward_group(self, samples: dict[int, PreparedSample]) -> dict[int, SampleActivations | Exception]:
        keys = list(samples)
        try:
            return dict(zip(keys, self.vlm.forward_features([samples[i] for i in keys]), strict=True))
        except Exception as err:  # recorded per row as extract_failed
            if schema.is_machine_fault(err):
                raise
            if len(keys) == 1:
                return {keys[0]: err}
        results: dict[int, SampleActivations | Exception] = {}
        for i in keys:
            try:
                results[i] = self.vlm.forward_features([samples[i]])[0]
            except Exception as err:  # recorded per row as extract_failed
                if schema.is_machine_fault(err):
                    raise
                results[i] = err
        return results

    def _empty_columns(self, batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        hidden = self.vlm.hidden_size
        reasons = batch.get(schema.ERROR_REASON)
        messages = batch.get(schema.ERROR_MESSAGE)
        return {
            schema.ROW_ID: np.asarray(batch[schema.ROW_ID], dtype=np.int64),
            schema.COINCIDE_VECTOR: np.zeros((n, self.coincide_dim), dtype=np.float16),
            schema.INFORMATIVENESS: np.full(n, np.nan, dtype=np.float32),
            schema.TAU: np.full(n, np.nan, dtype=np.float32),
            schema.LAST_TOKEN: np.zeros((n, hidden), dtype=np.float16),
            schema.N_IMAGE_TOKENS: np.zeros(n, dtype=np.int32),
            schema.N_TEXT_TOKENS: np.zeros(n, dtype=np.int32),
            schema.N_ANSWER_TOKENS: np.zeros(n, dtype=np.int32),
            schema.ANSWER_LOSS: np.full(n, np.nan, dtype=np.float32),
            schema.TRUNCATED: np.asarray(batch[schema.TRUNCATED], dtype=bool).copy(),
            schema.ERROR_REASON: np.array([str(r or "") for r in (reasons if reasons is not None else [""] * n)],
                                          dtype=object),
            schema.ERROR_MESSAGE: np.array([str(m or "") for m in (messages if messages is not None else [""] * n)],
                                           dtype=object),
        }
