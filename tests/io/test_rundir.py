"""The run directory's manifest: which config values make each phase's fingerprint, and reuse refused when they
(or the weights a model path names) change."""

from __future__ import annotations

import json

import pytest

from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import ManifestMismatch, RunDir, phase_fingerprint
from datasel_ray.methods.registry import registry
from datasel_ray.models.identity import model_identity


def _checkpoint(path, weights: bytes, hidden: int = 128):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    (path / "model.safetensors").write_bytes(weights)
    return path


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


def _aggregate(overrides: dict) -> dict:
    return phase_fingerprint(RunConfig.model_validate({"run_dir": "/tmp/unused", **overrides}), "aggregate")


def test_aggregate_fingerprint_holds_each_methods_fit_fields():
    base = _aggregate({})
    for method in registry().values():
        if not method.config_section:
            continue
        keys = {k.split(".", 1)[1] for k in base if k.startswith(method.config_section + ".")}
        assert keys, method.name
        if method.fit_fields is not None:
            assert keys == set(method.fit_fields), (method.name, keys)
    # a switch of a method's fit changes the fingerprint; a TIVE setting of the warm-up and extraction does not
    assert _aggregate({"coincide": {"niter": 7}}) != base
    assert _aggregate({"datatailor": {"dense_max_rows": 300}}) != base
    assert _aggregate({"tive": {"enabled": False, "task_value": "sq_norm"}}) != base
    assert _aggregate({"tive": {"enabled": False, "proj_dim": 64}}) == base
    with pytest.raises(KeyError):
        base["tive.proj_dim"]
