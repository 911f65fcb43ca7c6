"""Import path kept for callers outside ``datasel_ray`` (test fixtures, benchmarks): :func:`resolve_model_path`.

The tiny model's recipe lives in :mod:`datasel_ray.training.recipes.tiny`; name resolution in
:mod:`datasel_ray.models.loading`.
"""

from datasel_ray.models.loading import resolve_model_path

__all__ = ["resolve_model_path"]
