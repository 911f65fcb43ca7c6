"""Where a model name points: built-in reference models by name, anything else as given.

``model.name_or_path`` is a local HF checkpoint directory, a hub id, or the name of a model this project builds
offline (:data:`BUILT_MODELS`: ``tiny``, ``smol-llava``). A built model's recipe (its architecture, pretraining
and cache key) lives in :mod:`datasel_ray.training.recipes`; this module names the recipe modules and imports
one only when a built model is resolved, so ``datasel_ray.models`` imports no training or synthetic-data code.

Every loader of this project calls :func:`register_model_classes` before ``from_pretrained``: a built model may
use a vision tower that is not part of transformers (``smol-llava``'s EfficientNet, see
:mod:`datasel_ray.models.efficientnet`), and ``AutoConfig`` / ``AutoModel`` only know it once registered.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

BUILT_MODELS: dict[str, str] = {
    "tiny": "datasel_ray.training.recipes.tiny",
    "smol-llava": "datasel_ray.training.recipes.smol_llava",
}


def datasel_home() -> Path:
    """``$DATASEL_HOME``, default ``~/.cache/datasel_ray``: the cache of built models."""
    home = os.environ.get("DATASEL_HOME")
    return Path(home) if home else Path.home() / ".cache" / "datasel_ray"


def recipe(name: str) -> ModuleType:
    """The recipe module of built model ``name``; it provides ``default_dir()``, ``build(out_dir, seed)`` and
    ``recipe_fingerprint(seed)``."""
    if name not in BUILT_MODELS:
        raise ValueError(f"Unknown built model {name!r}. Choose from: {', '.join(sorted(BUILT_MODELS))}")
    return importlib.import_module(BUILT_MODELS[name])


def register_model_classes() -> None:
    """Register the custom model classes that built models use with transformers' auto classes (idempotent)."""
    from datasel_ray.models.efficientnet import register

    register()


def resolve_model_path(name_or_path: str) -> str:
    """Map a built model's name to its directory (building it on first use); return anything else as is.

    Registers the custom model classes as well, so ``from_pretrained`` of the returned path works.
    """
    register_model_classes()
    if name_or_path in BUILT_MODELS:
        module = recipe(name_or_path)
        return str(module.build(module.default_dir()))
    return name_or_path


def resolve_model(model_cfg) -> str:
    """The local folder to load ``model_cfg`` from: the run's shared copy when ``model.shared`` is set (checked
    by sha256, downloaded once per node; never built here), else :func:`resolve_model_path` of the name."""
    register_model_classes()
    if model_cfg.shared is not None:
        from datasel_ray.models.shared_copy import local_model_dir

        return local_model_dir(model_cfg.shared.uri, model_cfg.shared.sha256)
    return resolve_model_path(model_cfg.name_or_path)
