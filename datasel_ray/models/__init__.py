"""Reference VLM wrapper (any HF image-text-to-text model) and model-name resolution; no training code."""

from datasel_ray.models.loading import BUILT_MODELS, resolve_model_path

__all__ = ["BUILT_MODELS", "resolve_model_path"]
