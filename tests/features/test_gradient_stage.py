"""GradientStage (what the extraction actors run) against a plain single-sample backward loop, and the
projection matrix being identical across instances and across Ray actors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasel_ray import schema
from datasel_ray.config import LoraConfig, ModelConfig, TiveConfig
from datasel_ray.features.gradient_stage import GradientStage, projector_seed, resolve_proj_dim
from datasel_ray.features.gradients import tive_param_filter

PROJ_DIM = 48


def _tiny_peft(seed=0):
    from transformers import AutoModelForImageTextToText

    from datasel_ray.models.tiny import resolve_model_path
    from datasel_ray.training.lora import attach_lora

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny"), local_files_only=True)
    return attach_lora(base, LoraConfig(r=2, alpha=4), seed=seed)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A warm-up-like adapter with non-zero B (so A gets gradients too), plus a name-keyed optimizer.pt."""
    out = tmp_path_factory.mktemp("lora")
    model = _tiny_peft()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(out / "adapter"))
    return out / "adapter"


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """Preprocessor output of 4 rows (2 with images, 1 text-only, 1 failed) and a matching extractor `out`."""
    from datasel_ray.features.extractor import Preprocessor

    folder = tmp_path_factory.mktemp("img")
    paths = []
    for i, rgb in enumerate([(200, 20, 20), (20, 20, 200)]):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), rgb).save(path)
        paths.append(str(path))
    convs = [[{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}],
             [{"from": "human", "value": "Describe the picture."}, {"from": "gpt", "value": "A blue square."}],
             [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}],
             [{"from": "human", "value": "<image>\nBroken"}, {"from": "gpt", "value": "no"}]]
    batch = {schema.ROW_ID: np.arange(4, dtype=np.int64),
             schema.CONVERSATIONS: np.array([json.dumps(c) for c in convs], dtype=object),
             schema.IMAGE_PATH: np.array([paths[0], paths[1], "", str(folder / "missing.png")], dtype=object)}
    rows = Preprocessor(ModelConfig())(batch)
    assert list(rows[schema.ERROR_REASON]) == ["", "", "", schema.Reason.IMAGE_MISSING]
    out = {schema.ROW_ID: rows[schema.ROW_ID], schema.ERROR_REASON: rows[schema.ERROR_REASON].copy(),
           schema.ERROR_MESSAGE: rows[schema.ERROR_MESSAGE].copy()}
    return rows, out


def _reference(adapter_dir, rows, matrix):
    """Plain loop: one sample, loss.backward(), flat LoRA attention gradient @ the projector's matrix."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from datasel_ray.features.extractor import sample_from_row
    from datasel_ray.models.tiny import resolve_model_path
    from datasel_ray.models.vlm import VLMProcessor, collate

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny"), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    names = [n for n, _ in model.named_parameters() if tive_param_filter(n)]
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    params = dict(model.named_parameters())
    pad = VLMProcessor.load(ModelConfig()).pad_token_id
    projs, norms = [], []
    for i in range(3):
        batch = collate([sample_from_row(rows, i)], pad)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, batch.labels[0, 1:], ignore_index=-100).backward()
        flat = torch.cat([params[n].grad.reshape(-1) for n in names]).double()
        projs.append((flat @ matrix.double()).numpy())
        norms.append(float(flat.norm()))
    return np.stack(projs), np.array(norms)


def _stage(adapter_dir, **tive):
    return GradientStage(ModelConfig(), TiveConfig(proj_dim=PROJ_DIM, **tive), str(adapter_dir), seed=5)


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_stage_matches_plain_single_sample_backward(adapter_dir, prepared, method):
    rows, out = prepared
    stage = _stage(adapter_dir, per_sample=method)
    result = stage.add_gradients(rows, out)
    assert result[schema.GRAD_PROJ].dtype == np.float32 and result[schema.GRAD_PROJ].shape == (4, PROJ_DIM)
    assert result[schema.GRAD_NORM].dtype == np.float32 and result[schema.GRAD_NORM].shape == (4,)
    np.testing.assert_array_equal(result[schema.ROW_ID], out[schema.ROW_ID])
    assert not result[schema.GRAD_PROJ][3].any() and result[schema.GRAD_NORM][3] == 0  # failed row: zeros
    assert list(result[schema.ERROR_REASON]) == list(out[schema.ERROR_REASON])
    proj, norms = _reference(adapter_dir, rows, stage.projector.materialize())
    assert np.all(norms > 0)
    np.testing.assert_allclose(result[schema.GRAD_NORM][:3], norms, rtol=1e-4)
    scale = np.abs(proj).max()
    np.testing.assert_allclose(result[schema.GRAD_PROJ][:3], proj, rtol=1e-3, atol=1e-4 * scale)


def test_adam_preconditioning_reads_name_keyed_state(adapter_dir, prepared, tmp_path):
    """gradient_type='adam' maps optimizer.pt (keyed by name) onto the featurizer's parameters."""
    from datasel_ray.features.extractor import sample_from_row
    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.training.lora import save_checkpoint, train_lora, trainable_names

    rows, out = prepared
    model = _tiny_peft(seed=2)
    samples = [sample_from_row(rows, i) for i in range(3)]
    pad = VLMProcessor.load(ModelConfig()).pad_token_id
    optimizer, _ = train_lora(model, samples, pad, learning_rate=1e-3, epochs=1, batch_size=3, seed=0)
    save_checkpoint(model, optimizer, trainable_names(model), tmp_path / "lora", {"complete": True})
    sgd = _stage(tmp_path / "lora" / "adapter").add_gradients(rows, out)
    adam = _stage(tmp_path / "lora" / "adapter", gradient_type="adam").add_gradients(rows, out)
    np.testing.assert_array_equal(sgd[schema.GRAD_NORM], adam[schema.GRAD_NORM])  # norm of the raw gradient
    assert not np.allclose(sgd[schema.GRAD_PROJ][:3], adam[schema.GRAD_PROJ][:3])


def test_two_instances_share_the_projection(adapter_dir):
    a, b = _stage(adapter_dir), _stage(adapter_dir)
    assert a.projector_fingerprint() == b.projector_fingerprint()
    assert a.projector_fingerprint()["seed"] == projector_seed(5)
    assert a.projector_fingerprint()["proj_dim"] == PROJ_DIM
    assert torch.equal(a.projector.materialize(), b.projector.materialize())
    assert resolve_proj_dim(TiveConfig(), "cpu") == 512 and resolve_proj_dim(TiveConfig(), "cuda") == 8192


@pytest.mark.integration  # two Ray actors; the in-process twin is test_two_instances_share_the_projection
def test_two_ray_actors_share_the_projection(ray_local, adapter_dir):
    ray = ray_local

    @ray.remote(num_cpus=0.5)
    class Holder:
        def __init__(self, path):
            self.stage = GradientStage(ModelConfig(), TiveConfig(proj_dim=PROJ_DIM), path, seed=5)

        def matrix(self):
            return self.stage.projector_fingerprint(), self.stage.projector.block_matrix(0).numpy()

    actors = [Holder.remote(str(adapter_dir)) for _ in range(2)]
    (fa, ma), (fb, mb) = ray.get([actor.matrix.remote() for actor in actors])
    local = _stage(adapter_dir)
    assert fa == fb == local.projector_fingerprint()
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(ma, local.projector.block_matrix(0).numpy())
    for actor in actors:
        ray.kill(actor)


def test_sharing_the_extractors_model_keeps_features_and_gradients(adapter_dir, prepared):
    """One copy of the weights: the adapter goes into the extractor's model, whose feature passes run with the
    adapter disabled, so features equal a plain extractor's bit for bit and gradients equal a separate stage's."""
    from datasel_ray.features.extractor import FeatureExtractor

    rows, out = prepared
    plain = FeatureExtractor(ModelConfig())
    before = plain(rows)
    shared = FeatureExtractor(ModelConfig())
    shared.setup()
    stage = GradientStage(ModelConfig(), TiveConfig(proj_dim=PROJ_DIM), str(adapter_dir), seed=5, base=shared.vlm)
    grads = stage.add_gradients(rows, out)
    assert stage.featurizer.model.base_model.model is shared.vlm.model  # no second copy
    after = shared(rows)
    for column in (schema.COINCIDE_VECTOR, schema.LAST_TOKEN, schema.INFORMATIVENESS, schema.TAU, schema.ANSWER_LOSS):
        np.testing.assert_array_equal(np.stack(after[column][:3]), np.stack(before[column][:3]), err_msg=column)
    separate = _stage(adapter_dir).add_gradients(rows, out)
    np.testing.assert_array_equal(grads[schema.GRAD_PROJ], separate[schema.GRAD_PROJ])
    again = stage.add_gradients(rows, out)  # after a feature pass the adapter is active again
    np.testing.assert_array_equal(again[schema.GRAD_PROJ], separate[schema.GRAD_PROJ])
