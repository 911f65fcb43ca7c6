"""Tiny offline LLaVA: deterministic, idempotent, loads through the generic path."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from datasel_ray.config import ModelConfig
from datasel_ray.training.recipes import tiny
from datasel_ray.models.loading import resolve_model_path
from datasel_ray.training.recipes.tiny import build_tiny_model, default_tiny_model_dir
from datasel_ray.models.vlm import ReferenceVLM


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    """Two builds with a shortened pretraining (same code path, a fraction of the steps) to compare bytes."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "PRETRAIN_STEPS", 6)
        builds = build_tiny_model(root / "a", seed=0), build_tiny_model(root / "b", seed=0)
    return builds


def test_same_seed_gives_identical_weights_and_tokenizer(two_builds):
    a, b = two_builds
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "processor_config.json").read_bytes() == (b / "processor_config.json").read_bytes()


def test_build_is_idempotent_and_rebuilds_stale(two_builds, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 6)
    a, _ = two_builds
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(a, seed=0) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp

    stale = tmp_path / "stale"
    shutil.copytree(a, stale)
    (stale / tiny.MARKER_FILE).write_text(json.dumps({"version": -1, "seed": 0}))
    (stale / "model.safetensors").write_bytes(b"partial")
    assert build_tiny_model(stale, seed=0) == stale.resolve()
    assert json.loads((stale / tiny.MARKER_FILE).read_text())["version"] == tiny.TINY_MODEL_VERSION
    assert load_file(stale / "model.safetensors").keys() == load_file(a / "model.safetensors").keys()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_changed_recipe_rebuilds(two_builds, tmp_path, monkeypatch):
    """A cached model built with another pretraining recipe is not reused."""
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 6)
    a, _ = two_builds
    old = json.loads((a / tiny.MARKER_FILE).read_text())
    assert old["recipe"] == tiny.recipe_fingerprint(0)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    monkeypatch.setattr(tiny, "PRETRAIN_LR", tiny.PRETRAIN_LR / 2)
    assert tiny.recipe_fingerprint(0) != old["recipe"]
    build_tiny_model(copy, seed=0)
    assert json.loads((copy / tiny.MARKER_FILE).read_text())["recipe"] == tiny.recipe_fingerprint(0)
    assert (copy / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_the_pretraining_corpus_is_the_pinned_one():
    assert tiny.corpus_digest(tiny.PRETRAIN_SAMPLES, tiny.PRETRAIN_DATA_SEED) == tiny.PRETRAIN_CORPUS_DIGEST
    assert tiny.pretrain_corpus_spec() == {
        "version": 1, "generator": "datasel_ray.synthetic.plan_rows", "num_samples": 1200, "seed": 10_000,
        "duplicate_rate": 0.0, "noise_rate": 0.0, "bad_rate": 0.0, "digest": tiny.PRETRAIN_CORPUS_DIGEST}


def test_a_changed_corpus_is_refused_not_rebuilt(two_builds, tmp_path, monkeypatch):
    """Other corpus data under the same pinned version: the cached model is still reused (the fingerprint does
    not follow the generator's output) and a fresh build raises before training."""
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 6)
    cached = tmp_path / "cached"
    shutil.copytree(two_builds[0], cached)
    before = tiny.recipe_fingerprint(0)
    monkeypatch.setattr(tiny, "corpus_digest", lambda n, seed: "0" * 64)
    assert tiny.recipe_fingerprint(0) == before
    assert build_tiny_model(cached, seed=0) == cached.resolve()
    with pytest.raises(tiny.PretrainCorpusChanged, match=r"has sha256 0{64}, the recipe pins bed17f5b"):
        build_tiny_model(tmp_path / "fresh", seed=0)
    assert not (tmp_path / "fresh").exists()


def test_models_package_imports_no_training_or_synthetic_code():
    import subprocess
    import sys

    code = ("import sys, datasel_ray.models.vlm, datasel_ray.models.identity, datasel_ray.models.tiny; "
            "print(sorted(m for m in sys.modules if m.startswith(('datasel_ray.training', 'datasel_ray.synthetic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_resolve_model_path(two_builds, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 6)  # the recipe of two_builds
    monkeypatch.setenv("DATASEL_HOME", str(tmp_path))
    assert default_tiny_model_dir() == tmp_path / tiny.TINY_SUBDIR == tmp_path / "tiny-llava-v1"
    shutil.copytree(two_builds[0], tmp_path / tiny.TINY_SUBDIR)  # already built: resolve must not rebuild
    assert resolve_model_path("tiny") == str(tmp_path / tiny.TINY_SUBDIR)
    assert resolve_model_path("org/some-vlm") == "org/some-vlm"
    assert resolve_model_path("/abs/dir") == "/abs/dir"


def test_loads_through_generic_path(two_builds):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = two_builds[0]
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    text = model.config.text_config
    assert text.hidden_size <= 128 and model.config.vision_config.hidden_size <= 128
    assert text.num_hidden_layers == 4 and text.max_position_embeddings == 512
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.image_seq_length == 16
    assert model.config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert 500 <= len(processor.tokenizer) <= 2000

    vlm = ReferenceVLM.load(ModelConfig(name_or_path=str(path)))
    assert vlm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert vlm.hidden_size == 128 and vlm.coincide_layers == [0, 1, 2, 3]
    assert vlm.decoder_layers is vlm.model.model.language_model.layers


@pytest.mark.slow  # generates answers for held-out samples with the tiny VLM
def test_reference_model_is_pretrained_on_the_synthetic_tasks(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.training.finetune import evaluate_answers

    path = tiny_model_dir
    meta = json.loads((path / tiny.MARKER_FILE).read_text())
    assert meta["pretrain"]["steps"] == tiny.PRETRAIN_STEPS
    assert meta["pretrain"]["last10_loss"] < meta["pretrain"]["first_loss"] / 3
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    held_out = tiny.pretrain_samples(14, seed=31_337)  # not the pretraining seed
    result = evaluate_answers(model, VLMProcessor.load(ModelConfig(name_or_path=str(path))), held_out)
    assert result["loss_mean"] < 2.0  # random init: ~6.8


def test_pretraining_keeps_the_vision_tower_at_its_initialisation(tiny_model_dir):
    """LLaVA-style: the vision tower is frozen (trained from scratch here it collapsed to a constant output)."""
    from transformers import AutoModelForImageTextToText

    init = tiny._build_model(tiny._build_tokenizer(), seed=0).state_dict()
    trained = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    vision = [k for k in init if "vision_tower" in k]
    rest = [k for k in init if "vision_tower" not in k and k in trained]
    assert vision and all(torch.equal(init[k], trained[k]) for k in vision)
    assert any(not torch.equal(init[k], trained[k]) for k in rest if "multi_modal_projector" in k)
    assert any(not torch.equal(init[k], trained[k]) for k in rest if "language_model" in k)
