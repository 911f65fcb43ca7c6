"""The scorer: reference model + frozen run state → per-sample scores (batch and Ray Serve paths).

One :class:`Scorer` serves both :func:`score_pool_samples` (in-process) and the Ray Serve app in
``serve/app.py`` (which only parses HTTP and forwards here). It loads once the reference model (and the TIVE
LoRA adapter when the run used TIVE) through the extraction stages, so a new sample's features are computed
exactly as the extract phase computes them, and the run's frozen state (:mod:`datasel_ray.scoring.state`).
Per sample it returns the task (given, or inferred with the pool's task rules) and, per scored method the run
selected with (in registry order), the fields of that method's ``score_new(features, sample)`` (their meaning
is documented on each method's state class in :mod:`datasel_ray.pipeline.fit`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.scoring.request import SampleError, SampleParser, ScoringLimits, ValidatedSample
from datasel_ray.scoring.state import RunStats

__all__ = ["Scorer", "score_pool_samples"]


class Scorer:
    """Reference model + frozen run statistics → per-sample scores (thread-safe for concurrent calls).

    Args:
        run_dir: a run directory with ``stats/`` and ``selections/`` (local path or filesystem URI).
        image_roots: folders that image paths may resolve under; default: the pool's image root.
        limits: :class:`ScoringLimits`.
        device: torch device for the model (default: cuda when available).
        reuse: a previous scorer whose loaded model is reused when the model (and adapter) are the same.
    """

    def __init__(self, run_dir: str, image_roots: list[str] | None = None, limits: ScoringLimits | None = None,
                 device=None, reuse: Scorer | None = None):
        from datasel_ray.pipeline.ingest import resolve_image_root

        self.run_dir = str(run_dir)
        self.stats = RunStats.load(RunDir(self.run_dir))
        cfg = self.stats.config
        self.limits = limits or ScoringLimits()
        self.image_roots = [str(r) for r in (image_roots or [resolve_image_root(cfg.pool)])]
        self.parser = SampleParser(cfg, self.stats.tasks, self.image_roots, self.limits)
        self.model_cfg: ModelConfig = cfg.model
        self.lora_dir = self._lora_dir()
        if reuse is not None and reuse.model_cfg == self.model_cfg and reuse.lora_dir == self.lora_dir:
            self.preprocessor, self.extractor, self.gradients = reuse.preprocessor, reuse.extractor, reuse.gradients
            self._model_lock = reuse._model_lock
        else:
            self._load_model(device)
        self._check_projector()

    def _check_projector(self) -> None:
        """TIVE instance values compare this scorer's projected gradients with the run's: the projection must be
        the one extraction used (CPU and CUDA generators give different matrices and default dimensions)."""
        if self.gradients is None:
            return
        recorded = self.stats.manifest.get("phases", {}).get("extract", {}).get("result", {}).get("projector")
        if recorded is None:
            return  # a run extracted before projections were recorded
        self.gradients.setup()
        mine = self.gradients.projector_fingerprint()
        if mine != recorded:
            diff = {k: (recorded.get(k), mine.get(k)) for k in sorted(set(recorded) | set(mine))
                    if recorded.get(k) != mine.get(k)}
            raise ValueError(f"tive: this scorer's gradient projection differs from the one {self.run_dir} was "
                             f"extracted with ((run, scorer) per field: {diff}); score on the same device kind "
                             f"as extraction (replica num_gpus) or re-extract")

    def _lora_dir(self) -> str | None:
        if not self.stats.needs_gradients:
            return None
        from datasel_ray.pipeline.warmup import adapter_location

        adapter = adapter_location(RunDir(self.run_dir))
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter} is missing: the run used TIVE but has no warm-up adapter")
        return str(adapter)

    def _load_model(self, device) -> None:
        from datasel_ray.features.extractor import FeatureExtractor, Preprocessor

        self.preprocessor = Preprocessor(self.model_cfg)
        self.preprocessor.setup()
        self.extractor = FeatureExtractor(self.model_cfg, device=device)
        self.extractor.setup()
        self.gradients = None
        if self.lora_dir is not None:
            from datasel_ray.features.gradient_stage import GradientStage

            cfg = self.stats.config
            self.gradients = GradientStage(self.model_cfg, cfg.tive, self.lora_dir, cfg.seed,
                                           base=self.extractor.vlm)
        self._model_lock = threading.Lock()  # torch modules with hooks are not re-entrant

    # ---- info
    def info(self) -> dict:
        """Run id, model, scored methods, budgets, tasks, versions."""
        from datasel_ray import __version__

        manifest = self.stats.manifest
        return {"run_id": self.stats.run_id, "run_dir": self.run_dir, "model": manifest.get("model_id"),
                "model_revision": manifest.get("model_revision"), "methods": self.stats.methods,
                "budgets": self.stats.budgets, "tasks": self.stats.tasks, "tive": self.stats.needs_gradients,
                "image_roots": self.image_roots, "limits": self.limits.__dict__,
                "versions": {"run": manifest.get("versions", {}), "datasel-ray": __version__},
                "feature_schema_version": manifest.get("feature_schema_version")}

    # ---- input
    def parse(self, payload: Any) -> list[ValidatedSample]:
        """Validate and tokenise a request body (one sample or ``{"samples": [...]}``); raise SampleError."""
        items, _ = self.parser.parse_payload(payload)
        out = []
        for i, (value, prefix) in enumerate(items):
            try:
                sample, images = self.parser.validate(value, i)
                sample.prepared = self._prepare(sample, images)
            except SampleError as err:
                raise err.within(prefix) from None
            out.append(sample)
        return out

    def _prepare(self, sample: ValidatedSample, images: list):
        """Tokenise one validated sample with its decoded images, as extraction does
        (:meth:`~datasel_ray.features.extractor.Preprocessor.prepare_row`); a refusal names its field."""
        from datasel_ray.schema import FieldError, RowError

        try:
            return self.preprocessor.prepare_row(sample.conversations, images)
        except FieldError as err:
            raise SampleError(err.field, err.reason, err.detail) from None
        except RowError as err:  # too long for the context, or the processor/template refuses this sample
            raise SampleError("conversations", err.reason, str(err)) from None

    # ---- scoring
    def score_records(self, records: list[dict] | dict) -> list[dict]:
        """Batch entry: validate + score records in LLaVA format; raises SampleError on the first bad one."""
        payload = {"samples": records} if isinstance(records, list) else records
        results = self.score_samples(self.parse(payload))
        for r in results:
            if isinstance(r, SampleError):
                raise r
        return results

    def score_samples(self, samples: list[ValidatedSample]) -> list[dict | SampleError]:
        """One model pass over validated samples; per sample a result dict, or a SampleError for a row the
        model failed on (the other rows are unaffected)."""
        if not samples:
            return []
        features = self.features(samples)
        out: list[dict | SampleError] = []
        for i, sample in enumerate(samples):
            reason = str(features[schema.ERROR_REASON][i])
            if reason:
                out.append(SampleError("", reason, str(features[schema.ERROR_MESSAGE][i])))
                continue
            out.append(self.score_features({k: v[i] for k, v in features.items()}, sample))
        return out

    def features(self, samples: list[ValidatedSample]) -> dict[str, np.ndarray]:
        """Feature columns of the extract phase (``features/`` schema, same dtypes) for ``samples``."""
        row_ids = np.arange(len(samples), dtype=np.int64)
        prepared = [s.prepared for s in samples]
        batch = self.preprocessor.columns(row_ids, prepared, [""] * len(samples), [""] * len(samples))
        with self._model_lock:
            out = self.extractor(batch)
            if self.gradients is not None:
                out = self.gradients.add_gradients(batch, out)
        return out

    def score_features(self, row: dict[str, Any], sample: ValidatedSample) -> dict:
        """Scores of one sample from its feature row (``features/`` columns) against the run's statistics."""
        result: dict[str, Any] = {
            "index": sample.index, "id": sample.sample_id, "task": sample.task, "task_source": sample.task_source,
            "features": {"n_turns": sample.n_turns, "n_images": len(sample.image_refs),
                         "n_image_tokens": int(row[schema.N_IMAGE_TOKENS]),
                         "n_text_tokens": int(row[schema.N_TEXT_TOKENS]),
                         "n_answer_tokens": int(row[schema.N_ANSWER_TOKENS]), "truncated": bool(row[schema.TRUNCATED]),
                         "tau": float(row[schema.TAU]), "answer_loss": _finite_or_none(row[schema.ANSWER_LOSS])},
        }
        result.update(self.stats.score_new(row, sample))
        if self.stats.duplicates is not None:
            result["duplicate"] = self.stats.duplicates.answer(row, sample.conversations, sample.image_bytes)
        return result


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def score_pool_samples(run_dir: str | Path, samples: list[dict], image_roots: list[str] | None = None) -> list[dict]:
    """Score LLaVA-format ``samples`` against the run in ``run_dir`` (loads a :class:`Scorer` once per call).

    Raises :class:`SampleError` (field, reason, message) on the first invalid sample.
    """
    return Scorer(str(run_dir), image_roots=image_roots).score_records(samples)
