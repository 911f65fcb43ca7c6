"""Extraction-side TIVE/LESS gradients: the warm-up LoRA model + projector that every extraction actor runs.

TIVE §3.3 (``compute_gradient_features.py``) / LESS ``collect_grad_reps.py``: per-sample gradients of the mean
answer-token CE w.r.t. the LoRA A/B matrices of the language model's attention, at the warm-up adapter, with
``||g||_2`` of the raw gradient and a seeded random projection
(:class:`~datasel_ray.features.gradients.LoraGradientFeaturizer`).

The projection matrix must be the same on every actor, on every re-run and in the HTTP scorer, or the
projected vectors cannot be compared. It is fully determined by
``(projection kind, grad_dim, proj_dim, seed = derive_seed(run seed, "tive", "projector"), model_id = 0,
device kind)``; nothing is shipped between processes. :meth:`GradientStage.projector_fingerprint` is written
into every feature shard's parquet metadata and the extract phase's manifest entry; extraction refuses shards that
disagree and :class:`~datasel_ray.scoring.Scorer` refuses to score with a different projection.
``model_id = 0`` as in LESS (one matrix for every checkpoint). ⚠ CUDA and CPU generators give different
matrices, and ``proj_dim`` defaults by device (8192 on CUDA, 512 on CPU): a run must not mix devices for
extraction (the fingerprint says which one was used).

Given the feature extractor's :class:`~datasel_ray.models.vlm.ReferenceVLM` (``base``), the stage injects the
adapter into that same model (peft modifies it in place) and makes every feature pass run inside the adapter's
``disable_adapter()``, whose LoRA layers then compute exactly the base layer: one copy of the weights per actor
(a 7B reference model in fp16 is ~14 GB). Without ``base`` it loads its own copy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from datasel_ray import schema
from datasel_ray.config import ModelConfig, TiveConfig
from datasel_ray.io.storage import Location
from datasel_ray.seeds import derive_seed

GPU_PROJ_DIM = 8192
CPU_PROJ_DIM = 512


def resolve_proj_dim(tive_cfg: TiveConfig, device_type: str) -> int:
    """``tive.proj_dim``, else 8192 on CUDA (TIVE/LESS) and 512 on CPU."""
    if tive_cfg.proj_dim is not None:
        return tive_cfg.proj_dim
    return GPU_PROJ_DIM if device_type == "cuda" else CPU_PROJ_DIM


def projector_seed(seed: int) -> int:
    """Seed of the projection matrix, derived from the run seed (TIVE/LESS use 0)."""
    return derive_seed(seed, "tive", "projector")


def local_directory(path: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """``path`` itself when local, else a temporary local copy of the directory (and its handle)."""
    loc = Location.parse(path)
    if loc.is_local:
        return loc.path, None
    tmp = tempfile.TemporaryDirectory(prefix="datasel-adapter-")
    prefix = loc.path.rstrip("/") + "/"
    for f in loc.list(recursive=True):
        target = Path(tmp.name) / f.path[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    return tmp.name, tmp


class GradientStage:
    """Adds ``grad_proj`` float32 [B, k] and ``grad_norm`` float32 [B] to the feature extractor's output.

    Args:
        model_cfg: the reference model.
        tive_cfg: ``proj_dim``, ``projection``, ``gradient_type`` (``"adam"``: LESS preconditioning with the
            warm-up moments from ``<lora>/optimizer.pt``, never modified), ``per_sample`` method.
        lora_dir: the warm-up adapter directory (``<run>/lora/adapter``; any filesystem).
        seed: the run seed (the projection seed derives from it).
        device: default cuda when available, else cpu (ignored with ``base``: its device is used).
        base: the feature extractor's loaded model to share (see the module docstring); None loads a copy.

    Weights load lazily on first use (:meth:`setup`).
    """

    def __init__(self, model_cfg: ModelConfig, tive_cfg: TiveConfig, lora_dir: str, seed: int, device=None,
                 base=None):
        self.base = base
        self.model_cfg = model_cfg
        self.tive_cfg = tive_cfg
        self.lora_dir = str(lora_dir)
        self.seed = int(seed)
        self.device = device
        self.featurizer = None
        self.pad_token_id: int | None = None

    def setup(self) -> None:
        """Load the reference model, inject the adapter, build the projector and the featurizer."""
        if self.featurizer is not None:
            return
        import torch
        from peft import PeftModel

        from datasel_ray.features.gradients import LoraGradientFeaturizer, tive_param_filter
        from datasel_ray.features.projector import make_projector
        from datasel_ray.models.vlm import ReferenceVLM

        vlm = self.base if self.base is not None else ReferenceVLM.load(self.model_cfg, device=self.device)
        adapter, handle = local_directory(self.lora_dir)
        try:
            model = PeftModel.from_pretrained(vlm.model, adapter, is_trainable=False).to(vlm.device).eval()
        finally:
            if handle is not None:
                handle.cleanup()
        vlm.feature_context = model.disable_adapter
        names = [n for n, _ in model.named_parameters() if tive_param_filter(n)]
        if not names:
            raise ValueError(f"the adapter in {self.lora_dir} has no LoRA weights on attention ('self_attn') "
                             f"modules: TIVE gradients need them (tive.lora.target_modules)")
        params = dict(model.named_parameters())
        grad_dim = int(sum(params[n].numel() for n in names))
        device = torch.device(vlm.device)
        projector = make_projector(self.tive_cfg.projection, grad_dim, resolve_proj_dim(self.tive_cfg, device.type),
                                   seed=projector_seed(self.seed), model_id=0, device=device)
        adam = self._adam_state(names) if self.tive_cfg.gradient_type == "adam" else None
        self.pad_token_id = vlm.processor.pad_token_id
        self.featurizer = LoraGradientFeaturizer(model, projector, param_filter=tive_param_filter, adam_state=adam,
                                                 method=self.tive_cfg.per_sample)

    def _adam_state(self, names: list[str]):
        """LESS Adam moments of ``names`` from the name-keyed ``optimizer.pt`` next to the adapter."""
        import io

        import torch

        from datasel_ray.features.gradients import AdamState
        from datasel_ray.training.lora import OPTIMIZER_FILE

        path = Location.parse(self.lora_dir).parent / OPTIMIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"tive.gradient_type='adam' needs {path} (written by the warmup phase)")
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        return AdamState.from_named(state["state"], names)

    @property
    def projector(self):
        self.setup()
        return self.featurizer.projector

    def projector_fingerprint(self) -> dict:
        """Everything that determines the projection matrix (equal fingerprints <=> equal matrices)."""
        return {**self.projector.fingerprint(), "gradient_type": self.tive_cfg.gradient_type}

    def add_gradients(self, prepared: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``out`` plus ``grad_proj`` float32 [B, k] and ``grad_norm`` float32 [B]; row order unchanged.

        ``prepared``: the :class:`~datasel_ray.features.extractor.Preprocessor` rows of ``out``. Rows whose
        ``out["error_reason"]`` is set get zeros; a row whose gradient fails gets zeros and ``extract_failed``.
        """
        from datasel_ray.features.extractor import sample_from_row

        self.setup()
        n = len(out[schema.ROW_ID])
        k = self.featurizer.projector.proj_dim
        result = dict(out)
        result[schema.GRAD_PROJ] = np.zeros((n, k), dtype=np.float32)
        result[schema.GRAD_NORM] = np.zeros(n, dtype=np.float32)
        result[schema.ERROR_REASON] = np.array(out[schema.ERROR_REASON], dtype=object, copy=True)
        result[schema.ERROR_MESSAGE] = np.array(out[schema.ERROR_MESSAGE], dtype=object, copy=True)
        todo = [i for i in range(n) if not result[schema.ERROR_REASON][i]]
        for rows, values in self._compute({i: sample_from_row(prepared, i) for i in todo}):
            if isinstance(values, Exception):
                result[schema.ERROR_REASON][rows[0]] = schema.Reason.EXTRACT_FAILED
                result[schema.ERROR_MESSAGE][rows[0]] = f"gradient: {type(values).__name__}: {values}"
                continue
            result[schema.GRAD_PROJ][rows] = values[schema.GRAD_PROJ]
            result[schema.GRAD_NORM][rows] = values[schema.GRAD_NORM]
        return result

    def _compute(self, samples: dict):
        """Yield (row indices, featurizer output | Exception): the batch, or each row alone after a failure."""
        from datasel_ray.models.vlm import collate

        if not samples:
            return
        keys = list(samples)
        try:
            yield keys, self.featurizer.compute(collate([samples[i] for i in keys], self.pad_token_id))
            return
        except Exception as err:  # retried per row below, so one bad row only fails itself
            if schema.is_machine_fault(err):
                raise
            if len(keys) == 1:
                yield keys, err
                return
        for i in keys:
            try:
                yield [i], self.featurizer.compute(collate([samples[i]], self.pad_token_id))
            except Exception as err:  # recorded per row as extract_failed
                if schema.is_machine_fault(err):
                    raise
                yield [i], err
