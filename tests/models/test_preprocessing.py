"""The references' preprocessing (expand2square, <image> first, 2,048-token cut) and the switches back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasel_ray.config import ModelConfig
from datasel_ray.models.vlm import VLMProcessor, conversation_to_messages, expand2square, processor_mean_colour

IMAGE_LAST = [{"from": "human", "value": "  What colour is it?\n<image>"}, {"from": "gpt", "value": "red"},
              {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]


def test_expand2square_centres_on_the_mean_colour():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    square = np.asarray(expand2square(wide, (122, 116, 104)))
    assert square.shape == (40, 40, 3)
    assert (square[:10] == (122, 116, 104)).all() and (square[30:] == (122, 116, 104)).all()
    assert (square[10:30] == (255, 0, 0)).all()
    tall = np.asarray(expand2square(Image.new("RGB", (21, 40), (0, 0, 255)), (1, 2, 3)))
    assert tall.shape == (40, 40, 3) and (tall[:, :9] == (1, 2, 3)).all() and (tall[:, 9:30] == (0, 0, 255)).all()
    assert (tall[:, 30:] == (1, 2, 3)).all()
    same = Image.new("RGB", (8, 8))
    assert expand2square(same, (0, 0, 0)) is same


def test_image_first_moves_the_placeholder_to_the_front_of_the_first_human_turn():
    in_place = conversation_to_messages(IMAGE_LAST, with_image=True)
    assert in_place[0]["content"] == [{"type": "text", "text": "  What colour is it?"}, {"type": "image"}]
    first = conversation_to_messages(IMAGE_LAST, with_image=True, image_first=True)
    assert first[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    assert first[1:] == in_place[1:]
    later = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
             {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a dog"}]
    moved = conversation_to_messages(later, with_image=True, image_first=True)
    assert moved[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Hi"}]
    assert moved[2]["content"] == [{"type": "text", "text": "What is this?"}]
    text_only = conversation_to_messages(IMAGE_LAST, with_image=False, image_first=True)
    assert text_only[0]["content"] == [{"type": "text", "text": "  What colour is it?"}]


def test_defaults_are_the_references_for_real_checkpoints_and_off_for_tiny():
    tiny, real = ModelConfig(), ModelConfig(name_or_path="org/llava-7b")
    assert tiny.max_length == real.max_length == 2048
    assert (tiny.resolved_pad_to_square(), tiny.resolved_image_first()) == (False, False)
    assert (real.resolved_pad_to_square(), real.resolved_image_first()) == (True, True)
    back = ModelConfig(name_or_path="org/llava-7b", pad_to_square=False, image_first=False, max_length=None)
    assert (back.resolved_pad_to_square(), back.resolved_image_first(), back.max_length) == (False, False, None)
    assert ModelConfig(pad_to_square=True, image_first=True).resolved_image_first() is True


def test_processor_load_resolves_the_switches_and_the_context(tiny_model_dir):
    as_tiny = VLMProcessor.load(ModelConfig())
    assert (as_tiny.pad_colour, as_tiny.image_first, as_tiny.max_length) == (None, False, 512)
    as_checkpoint = VLMProcessor.load(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert as_checkpoint.pad_colour == processor_mean_colour(as_checkpoint.processor) == (122, 116, 104)
    assert as_checkpoint.image_first is True and as_checkpoint.max_length == 512
    assert VLMProcessor.load(ModelConfig(max_length=100)).max_length == 100
    assert VLMProcessor.load(ModelConfig(max_length=None)).max_length == 512


def test_prepare_pads_before_the_processor_and_moves_the_image(tiny_model_dir):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = VLMProcessor.load(ModelConfig(name_or_path=str(tiny_model_dir)))
    plain = VLMProcessor.load(ModelConfig(name_or_path=str(tiny_model_dir), pad_to_square=False, image_first=False))
    a = padded.prepare(IMAGE_LAST, wide)
    manual = plain.prepare(IMAGE_LAST, expand2square(wide, (122, 116, 104)))
    assert np.array_equal(a.pixel_values, manual.pixel_values)
    assert not np.array_equal(a.pixel_values, plain.prepare(IMAGE_LAST, wide).pixel_values)
    first_image = int(np.flatnonzero(a.image_mask)[0])
    kept = plain.prepare(IMAGE_LAST, wide)
    assert first_image < int(np.flatnonzero(kept.image_mask)[0])
    assert a.answer_mask.sum() == kept.answer_mask.sum()
    text = padded.tokenizer.decode(a.input_ids[: first_image])
    assert text.endswith("USER: ")


def test_mean_colour_is_required_for_padding():
    class NoMean:
        tokenizer = None

    with pytest.raises(ValueError, match="model.pad_to_square needs the image processor's image_mean"):
        processor_mean_colour(NoMean())
