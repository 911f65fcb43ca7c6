"""A reference model whose processor returns more than pixel_values: a tiny LLaVA-NeXT (any-resolution tiles,
``image_sizes``), built offline. Features must not depend on how images of different tile counts are batched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.training.recipes import tiny
from datasel_ray.models.vlm import ReferenceVLM, collate
from numeric import assert_batched_features_match_single, assert_gradients_match_single_passes, lora_model_with_nonzero_b

PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
QUESTION = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor

    try:
        from transformers import LlavaNextImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import LlavaNextImageProcessor as ImageProcessor
    tokenizer = tiny._build_tokenizer()
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                            image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=tiny.PATCH_SIZE,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tiny.CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**tiny.VISION_CONFIG),
        text_config=LlamaConfig(vocab_size=len(tokenizer), **tiny.TEXT_CONFIG, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava-next")
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vlm(next_dir):
    return ReferenceVLM.load(ModelConfig(name_or_path=str(next_dir)))


def _images():
    return [Image.new("RGB", (32, 32), (200, 20, 20)), Image.new("RGB", (64, 32), (20, 200, 20)),
            Image.new("RGB", (20, 50), (20, 20, 200))]


def test_prepare_keeps_image_sizes_and_tiles(vlm):
    samples = [vlm.processor.prepare(QUESTION, image) for image in _images()]
    assert [s.image_inputs["image_sizes"].tolist() for s in samples] == [[[32, 32]], [[32, 64]], [[50, 20]]]
    assert [s.pixel_values.shape[1] for s in samples] == [2, 3, 3]  # base tile + any-resolution tiles
    assert len({int(s.image_mask.sum()) for s in samples}) > 1  # the image span depends on the aspect ratio
    batch = collate(samples, vlm.processor.pad_token_id)
    assert batch.pixel_values.shape == (3, 3, 3, 32, 32)  # zero-padded to the largest tile count
    assert not batch.pixel_values[0, 2].any()
    assert batch.image_inputs["image_sizes"].tolist() == [[32, 32], [32, 64], [50, 20]]


def test_batched_features_equal_single_sample_features(vlm):
    text_only = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}]
    samples = [vlm.processor.prepare(QUESTION, image) for image in _images()]
    samples.append(vlm.processor.prepare(text_only))
    assert_batched_features_match_single(vlm, samples, vlm.forward_features(samples), atol=1e-4)


def test_extractor_columns_carry_variable_tiles_and_image_inputs(next_dir, tmp_path):
    from datasel_ray.features.extractor import IMAGE_INPUTS, FeatureExtractor, Preprocessor

    paths = []
    for i, image in enumerate(_images()):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    cfg = ModelConfig(name_or_path=str(next_dir))
    batch = {schema.ROW_ID: np.arange(3, dtype=np.int64),
             schema.CONVERSATIONS: np.array([json.dumps(QUESTION)] * 3, dtype=object),
             schema.IMAGE_PATH: np.array(paths, dtype=object)}
    rows = Preprocessor(cfg)(batch)
    assert list(rows[schema.ERROR_REASON]) == ["", "", ""]
    assert rows[IMAGE_INPUTS][1]["image_sizes"].tolist() == [[32, 64]]
    out = FeatureExtractor(cfg)(rows)
    assert list(out[schema.ERROR_REASON]) == ["", "", ""]
    vectors = np.stack(out[schema.COINCIDE_VECTOR]).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    assert not np.allclose(vectors[0], vectors[1])  # different images, different features


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_tive_gradients_slice_tiles_and_image_sizes_per_row(next_dir, vlm, method):
    """Per-sample LoRA gradients of a mixed batch (tile counts 2, 3, 3 and a text-only row) equal plain
    single-sample backward passes on each sample alone."""

    from datasel_ray.features.gradients import LoraGradientFeaturizer, tive_param_filter
    from datasel_ray.features.projector import make_projector

    model, names = lora_model_with_nonzero_b(next_dir)
    params = dict(model.named_parameters())
    projector = make_projector("rademacher", sum(params[n].numel() for n in names), 16)
    featurizer = LoraGradientFeaturizer(model, projector, param_filter=tive_param_filter, method=method)
    text_only = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}]
    samples = [vlm.processor.prepare(QUESTION, image) for image in _images()] + [vlm.processor.prepare(text_only)]
    got = featurizer.compute(collate(samples, vlm.processor.pad_token_id))

    assert_gradients_match_single_passes(model, samples, got, projector, names, vlm.processor.pad_token_id)


def test_preflight_accepts_tive_for_tiles_and_concatenated_patches(next_dir, tmp_path, monkeypatch):
    """TIVE slices every processor's images per row (tiles + image_sizes; Qwen2-VL's concatenated patches by
    the cumulative image_grid_thw products, tests/models/test_architectures.py): preflight refuses neither."""
    from datasel_ray.config import RunConfig
    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.pipeline.runner import preflight

    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(next_dir)},
                                    "tive": {"enabled": True}})
    preflight(cfg, ["warmup", "extract"])
    monkeypatch.setattr(VLMProcessor, "extra_image_inputs", lambda self, size=64: ["image_grid_thw"])
    preflight(cfg, ["warmup", "extract"])
