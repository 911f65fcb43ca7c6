"""Recipes of the reference models this project builds offline (architecture, pretraining, cache key).

Each recipe module provides ``default_dir()``, ``build(out_dir, seed=0) -> Path`` and
``recipe_fingerprint(seed) -> str``; :data:`datasel_ray.models.loading.BUILT_MODELS` maps model names to them.
"""
