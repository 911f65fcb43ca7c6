"""Reference VLM wrapper (any HF image-text-to-text model) and the offline tiny LLaVA builder."""

from datasel_ray.models.tiny import build_tiny_model, default_tiny_model_dir, resolve_model_path

__all__ = ["build_tiny_model", "default_tiny_model_dir", "resolve_model_path"]
