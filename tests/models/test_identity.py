"""Model identity in the run manifest: other weights under the same name are not resumed."""

from __future__ import annotations

import json

import pytest

from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import ManifestMismatch, RunDir, phase_fingerprint
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


def test_extract_outputs_of_other_weights_are_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt", b"x" * 10)
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(ckpt)}})
    assert phase_fingerprint(cfg, "extract")["model.weights"] == model_identity(str(ckpt))
    assert "model.weights" in phase_fingerprint(cfg, "warmup")
    assert "model.weights" not in phase_fingerprint(cfg, "aggregate")
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    rd.start_phase(cfg, "extract")
    rd.check_phase(cfg, "extract")
    _checkpoint(ckpt, b"x" * 12)  # the directory now holds another checkpoint
    with pytest.raises(ManifestMismatch, match="model.weights=.local:"):
        rd.check_phase(cfg, "extract")
