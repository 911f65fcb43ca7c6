"""Which weights a model name stands for, as a short string recorded in the run manifest.

``model.name_or_path`` alone does not pin the weights: a built model (``tiny``) is rebuilt when its recipe changes, a local
directory can be overwritten with another checkpoint, a hub id moves with its default branch. Phases that run
the model (warm-up, extract) add this identity to their manifest fingerprint, so a run directory is not resumed
with features from other weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from datasel_ray.models.loading import BUILT_MODELS, recipe

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG_FILES = ("config.json", "adapter_config.json")


def model_identity(name_or_path: str, revision: str | None = None) -> str:
    """``<name>:<recipe sha256[:16]>`` for a built model (``tiny``, ``smol-llava``), ``local:<sha256[:16]>`` of a directory's config files and its weight
    files' names and sizes (weights are not read: a 7B checkpoint would take minutes), or ``id:<name>@<revision>``
    (``main`` when unset) for anything else (a hub id, a remote path)."""
    if name_or_path in BUILT_MODELS:
        return f"{name_or_path}:{recipe(name_or_path).recipe_fingerprint(0)[:16]}"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            if file.name in _CONFIG_FILES:
                digest.update(json.dumps([rel, file.read_text(errors="replace")]).encode())
            elif file.name.endswith(_WEIGHT_SUFFIXES):
                digest.update(json.dumps([rel, file.stat().st_size]).encode())
        return f"local:{digest.hexdigest()[:16]}"
    return f"id:{name_or_path}@{revision or 'main'}"
