"""Reference architectures through the generic loader (``AutoModelForImageTextToText`` + the model's own processor,
image-only where its video half needs torchvision): tiny random Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM and
LLaVA-OneVision built offline (:mod:`tiny_architectures`). For each: single- and multi-image rows through the
three feature families (COINCIDE activations, DataTailor last block, TIVE LoRA gradients), batched features equal
single-sample features for a mixed batch (one image, two images, none), and image-grid sizes of odd image sizes
follow the model's own resize rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image
from tiny_architectures import ARCHITECTURES, build

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.models.vlm import ReferenceVLM, collate
from numeric import assert_batched_features_match_single, assert_gradients_match_single_passes, lora_model_with_nonzero_b

ONE = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]
TWO = [{"from": "human", "value": "Image one: <image>\nImage two: <image>\nWhich one is red?"},
       {"from": "gpt", "value": "The first one."}, {"from": "human", "value": "And the other?"},
       {"from": "gpt", "value": "It is green."}]
TEXT = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}]
RED, GREEN = Image.new("RGB", (30, 45), (200, 20, 20)), Image.new("RGB", (64, 40), (20, 200, 20))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request, tmp_path_factory):
    return request.param, build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def vlm(arch_dir):
    return ReferenceVLM.load(ModelConfig(name_or_path=str(arch_dir[1])))


def _samples(vlm):
    return [vlm.processor.prepare(ONE, [RED]), vlm.processor.prepare(TWO, [RED, GREEN]),
            vlm.processor.prepare(TEXT, [])]


def test_loads_without_video_processor_and_places_each_image(vlm):
    processor = vlm.processor.processor
    assert getattr(processor, "video_processor", None) is None
    assert type(processor.image_processor).__name__.endswith("Pil")
    one, two, text = _samples(vlm)
    alone = vlm.processor.prepare(ONE, [GREEN])
    # the two-image row holds exactly the image tokens of each image alone, the first before "Image two"
    assert int(two.image_mask.sum()) == int(one.image_mask.sum()) + int(alone.image_mask.sum())
    assert two.pixel_rows == one.pixel_rows + alone.pixel_rows or two.pixel_values.ndim == 5  # anyres: padded
    assert not text.image_mask.any() and text.pixel_values is None
    for sample in (one, two, text):
        assert sample.answer_mask.any() and not (sample.answer_mask & sample.image_mask).any()
        assert sample.text_mask[-1] and not (sample.text_mask & sample.image_mask).any()
    # both answers of the two-turn row are answer tokens
    decoded = vlm.processor.tokenizer.decode(two.input_ids[two.answer_mask])
    assert "The first one." in decoded and "It is green." in decoded


def test_batched_features_equal_single_sample_features(vlm):
    samples = _samples(vlm)
    assert_batched_features_match_single(vlm, samples, vlm.forward_features(samples), atol=1e-5)


def test_extractor_features_of_single_and_multi_image_rows(arch_dir, vlm, tmp_path):
    from datasel_ray.features.activations import coincide_vector
    from datasel_ray.features.extractor import FeatureExtractor, Preprocessor
    from datasel_ray.features.spectrum import spectrum_stats

    cfg = ModelConfig(name_or_path=str(arch_dir[1]))
    pre = Preprocessor(cfg)
    pre.setup()
    rows = pre.columns(np.arange(3, dtype=np.int64), _samples(vlm), ["", "", ""], ["", "", ""])
    extractor = FeatureExtractor(cfg)
    extractor.vlm = vlm
    out = extractor(rows)
    assert list(out[schema.ERROR_REASON]) == ["", "", ""]
    vectors = out[schema.COINCIDE_VECTOR].astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
    # COINCIDE's image half averages every image token of the row; DataTailor's matrix holds every token
    two = _samples(vlm)[1]
    acts = vlm.forward_features([two])[0]
    expected = coincide_vector(acts.layer_outputs, two.image_mask, two.text_mask).numpy()
    np.testing.assert_allclose(vectors[1], expected, atol=2e-3)
    informativeness, _ = spectrum_stats(acts.last_hidden)
    assert out[schema.INFORMATIVENESS][1] == pytest.approx(informativeness, rel=1e-4)
    assert out[schema.N_IMAGE_TOKENS].tolist() == [int(s.image_mask.sum()) for s in _samples(vlm)]
    assert not np.allclose(vectors[0], vectors[1])


@pytest.mark.parametrize("method", ["auto", pytest.param("loop", marks=pytest.mark.slow)])
def test_tive_gradients_of_a_mixed_batch_equal_single_sample_passes(arch_dir, vlm, method):
    """Per-sample LoRA gradients of rows with one image, two images and none equal plain single-sample backward
    passes (Qwen2-VL's concatenated patches sliced per row by the cumulative image_grid_thw products)."""

    from datasel_ray.features.gradients import (
        LoraGradientFeaturizer,
        tive_param_filter,
    )
    from datasel_ray.features.projector import make_projector

    model, names = lora_model_with_nonzero_b(arch_dir[1])
    assert names, "LoRA found no attention projection of the language model"
    params = dict(model.named_parameters())
    projector = make_projector("rademacher", sum(params[n].numel() for n in names), 16)
    featurizer = LoraGradientFeaturizer(model, projector, param_filter=tive_param_filter, method=method)
    samples = _samples(vlm)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback from vmap to the loop
        got = featurizer.compute(collate(samples, vlm.processor.pad_token_id))
    if method == "auto":  # vmap for every architecture (Qwen2-VL: with its own M-RoPE positions)
        assert featurizer.method == "vmap"
    assert_gradients_match_single_passes(model, samples, got, projector, names, vlm.processor.pad_token_id)


@pytest.mark.parametrize("size", [(17, 33), (45, 30), (101, 7), (64, 64)])
def test_image_grid_of_odd_sizes_follows_the_models_resize_rule(arch_dir, vlm, size):
    arch = arch_dir[0]
    image = Image.new("RGB", size, (90, 60, 30))
    sample = vlm.processor.prepare(ONE, [image])
    processor = vlm.processor.processor.image_processor
    if arch.startswith("qwen"):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,
        )

        factor = processor.patch_size * processor.merge_size
        height, width = smart_resize(size[1], size[0], factor=factor, min_pixels=processor.size["shortest_edge"],
                                     max_pixels=processor.size["longest_edge"])
        grid = [1, height // processor.patch_size, width // processor.patch_size]
        assert sample.image_inputs["image_grid_thw"].tolist() == [grid]
        assert int(sample.image_mask.sum()) == grid[1] * grid[2] // processor.merge_size ** 2
    elif arch in ("idefics3", "smolvlm"):
        # tiles (the split image plus the global image) as the image processor's own rule counts them
        tiles, rows, cols = processor.get_number_of_image_patches(size[1], size[0])
        assert sample.pixel_rows == tiles == rows * cols + (1 if rows * cols > 1 else 0)
        assert int(sample.image_mask.sum()) == tiles * vlm.processor.processor.image_seq_len
    else:  # LLaVA-OneVision: image_sizes as given; tiles of the best pinpoint + the base image
        assert sample.image_inputs["image_sizes"].tolist() == [[size[1], size[0]]]
        from transformers.image_processing_utils import select_best_resolution

        best_h, best_w = select_best_resolution((size[1], size[0]), processor.image_grid_pinpoints)
        tile = processor.size["height"]
        assert sample.pixel_values.shape[1] == (best_h // tile) * (best_w // tile) + 1
    vlm.forward_features([sample])  # the model accepts the processor's token count for this grid


def test_hook_points_name_the_language_models_modules(arch_dir, vlm):
    """COINCIDE hooks the language model's self_attn output projections, DataTailor its last decoder block (the
    names the extract manifest records)."""
    hooks = vlm.hook_points()
    modules = dict(vlm.model.named_modules())
    lm = "text_model" if arch_dir[0] in ("idefics3", "smolvlm") else "language_model"
    n = hooks["decoder_layers"]
    assert n == 4 and hooks["coincide_layers"] == [0, 1, 2, 3]
    assert hooks["coincide_modules"] == [f"model.{lm}.layers.{i}.self_attn.o_proj" for i in range(n)]
    assert hooks["datatailor_module"] == f"model.{lm}.layers.{n - 1}"
    assert all(name in modules for name in [*hooks["coincide_modules"], hooks["datatailor_module"]])
