"""Several images per sample on the default tiny LLaVA: placeholder placement, batched features equal
single-sample features for mixed batches (one image, several, none), TIVE gradients of such a batch equal
single-sample backward passes, and the Preprocessor reading ingest's per-row image lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.models.vlm import ReferenceVLM, collate, conversation_to_messages
from numeric import assert_batched_features_match_single, assert_gradients_match_single_passes, lora_model_with_nonzero_b

TWO = [{"from": "human", "value": "Left: <image>\nRight: <image>\nAre they the same colour?"},
       {"from": "gpt", "value": "No, there is not."}]
THREE_NO_PLACEHOLDER = [{"from": "human", "value": "Describe the picture in detail."},
                        {"from": "gpt", "value": "The image shows a simple drawing."}]
ONE = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "The square is red."}]
TEXT = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}]


def _image(rgb):
    return Image.new("RGB", (32, 32), rgb)


@pytest.fixture(scope="module")
def vlm(tiny_model_dir):
    return ReferenceVLM.load(ModelConfig(name_or_path=str(tiny_model_dir)))


def test_each_image_goes_where_its_placeholder_stands():
    messages = conversation_to_messages(TWO, with_image=2)
    assert messages[0]["content"] == [{"type": "text", "text": "Left: "}, {"type": "image"},
                                      {"type": "text", "text": "Right: "}, {"type": "image"},
                                      {"type": "text", "text": "Are they the same colour?"}]
    front = conversation_to_messages(THREE_NO_PLACEHOLDER, with_image=3)
    assert front[0]["content"][:3] == [{"type": "image"}] * 3
    # image_first moves a single image only (LLaVA-NeXT's preprocess_multimodal); two stay where they stand
    assert conversation_to_messages(TWO, with_image=2, image_first=True) == messages
    moved = conversation_to_messages([{"from": "human", "value": "Look: <image>"}, TWO[1]], 1, image_first=True)
    assert moved[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Look:"}]
    with pytest.raises(ValueError, match="1 <image> placeholders for 2 images"):
        conversation_to_messages(ONE, with_image=2)


def test_image_spans_in_placeholder_order(vlm):
    red, blue = _image((220, 0, 0)), _image((0, 0, 220))
    sample = vlm.processor.prepare(TWO, [red, blue])
    assert sample.pixel_values.shape == (2, 3, 32, 32)
    assert int(sample.image_mask.sum()) == 2 * 16
    swapped = vlm.processor.prepare(TWO, [blue, red])
    np.testing.assert_array_equal(sample.pixel_values[0], swapped.pixel_values[1])
    text = vlm.processor.tokenizer.decode(sample.input_ids[sample.answer_mask])
    assert "No, there is not." in text
    # the text between the two images is neither image nor COINCIDE text (the text half starts after the last)
    between = np.flatnonzero(sample.image_mask)
    assert not sample.text_mask[: between[-1] + 1].any() and sample.text_mask[between[-1] + 1:].all()


def _mixed(vlm):
    return [vlm.processor.prepare(ONE, [_image((200, 30, 30))]),
            vlm.processor.prepare(TWO, [_image((30, 200, 30)), _image((30, 30, 200))]),
            vlm.processor.prepare(TEXT, []),
            vlm.processor.prepare(THREE_NO_PLACEHOLDER, [_image((90, 90, 0)), _image((0, 90, 90)),
                                                         _image((90, 0, 90))])]


def test_batched_features_equal_single_sample_features_for_mixed_batches(vlm):
    samples = _mixed(vlm)
    for order in ([0, 1, 2, 3], [2, 3, 1, 0]):
        batch = [samples[i] for i in order]
        assert_batched_features_match_single(vlm, batch, vlm.forward_features(batch), atol=1e-5)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_tive_gradients_of_multi_image_rows_equal_single_sample_passes(tiny_model_dir, vlm, method):

    from datasel_ray.features.gradients import LoraGradientFeaturizer
    from datasel_ray.features.projector import make_projector

    model, names = lora_model_with_nonzero_b(tiny_model_dir)
    params = dict(model.named_parameters())
    projector = make_projector("rademacher", sum(params[n].numel() for n in names), 16)
    featurizer = LoraGradientFeaturizer(model, projector, method=method)
    samples = _mixed(vlm)
    got = featurizer.compute(collate(samples, vlm.processor.pad_token_id))
    assert_gradients_match_single_passes(model, samples, got, projector, names, vlm.processor.pad_token_id)


def test_preprocessor_reads_ingests_image_lists(tiny_model_dir, vlm, monkeypatch):
    """With ingest's ``images`` column the Preprocessor takes each row's images from
    ``io.images.load_row_images(row)`` (the ingest side's contract) and features equal the direct path."""
    import datasel_ray.features.extractor as extractor_module
    from datasel_ray.features.extractor import FeatureExtractor, Preprocessor

    colours = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}
    seen = []

    def load_row_images(row, image_size=None):
        seen.append(list(row["images"]))
        return [_image(colours[ref]) for ref in row["images"]]

    monkeypatch.setattr(extractor_module, "load_row_images", load_row_images)
    rows = [(ONE, ["a"]), (TWO, ["b", "c"]), (TEXT, [])]
    batch = {schema.ROW_ID: np.arange(3, dtype=np.int64),
             schema.CONVERSATIONS: np.array([json.dumps(c) for c, _ in rows], dtype=object),
             "images": np.array([refs for _, refs in rows] + [None], dtype=object)[:3]}
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    prepared = Preprocessor(cfg)(batch)
    assert seen == [["a"], ["b", "c"], []]
    assert list(prepared[schema.ERROR_REASON]) == ["", "", ""]
    assert prepared["has_image"].tolist() == [True, True, False]
    assert prepared["pixel_values"][1].shape == (2, 3, 32, 32)
    extractor = FeatureExtractor(cfg)
    extractor.vlm = vlm
    out = extractor(prepared)
    direct = vlm.processor.prepare(TWO, [_image(colours["b"]), _image(colours["c"])])
    assert out[schema.N_IMAGE_TOKENS].tolist() == [16, 32, 0]
    acts = vlm.forward_features([direct])[0]
    from datasel_ray.features.activations import coincide_vector

    expected = coincide_vector(acts.layer_outputs, direct.image_mask, direct.text_mask).numpy()
    np.testing.assert_allclose(out[schema.COINCIDE_VECTOR][1].astype(np.float32), expected, atol=2e-3)
