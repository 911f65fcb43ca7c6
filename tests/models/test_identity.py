"""Model identity in the run manifest: other weights under the same name are not resumed."""

from __future__ import annotations

import json

from datasel_ray.training.recipes import tiny
from datasel_ray.models.identity import model_identity


def _checkpoint(path, weights: bytes, hidden: int = 128):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("notes")
    return path


def test_local_identity_follows_config_and_weight_sizes(tmp_path):
    a = _checkpoint(tmp_path / "a", b"x" * 10)
    same = _checkpoint(tmp_path / "b", b"y" * 10)  # same names and sizes: weights are not read
    assert model_identity(str(a)) == model_identity(str(same))
    assert model_identity(str(a)).startswith("local:")
    before = model_identity(str(a))
    (a / "README.md").write_text("other notes")
    assert model_identity(str(a)) == before
    _checkpoint(a, b"x" * 11)
    assert model_identity(str(a)) != before
    assert model_identity(str(_checkpoint(tmp_path / "c", b"x" * 10, hidden=64))) != before


def test_hub_identity_names_the_revision():
    assert model_identity("org/vlm") == "id:org/vlm@main"
    assert model_identity("org/vlm", "abc123") == "id:org/vlm@abc123"


def test_tiny_identity_follows_the_recipe(monkeypatch):
    before = model_identity("tiny")
    assert before == f"tiny:{tiny.recipe_fingerprint(0)[:16]}"
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", tiny.PRETRAIN_STEPS + 1)
    assert model_identity("tiny") != before
