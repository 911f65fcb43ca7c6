"""VLMProcessor token spans and ReferenceVLM hooks/loss against the plain HF model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from datasel_ray.config import ModelConfig
from datasel_ray.models.vlm import (
    ChatTemplateError,
    ContextTooShortError,
    ReferenceVLM,
    VLMProcessor,
    capture_outputs,
    default_coincide_layers,
    find_decoder_layers,
    length_groups,
)

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "There are three shapes."},
]


@pytest.fixture(scope="module")
def vlm(tiny_model_dir):
    return ReferenceVLM.load(ModelConfig(name_or_path=str(tiny_model_dir)), device="cpu")


@pytest.fixture(scope="module")
def proc(vlm):
    return vlm.processor


def image():
    return Image.new("RGB", (48, 40), (200, 30, 30))


def runs(mask):
    """Contiguous True runs of a bool mask as (start, end) pairs."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_image_span_and_text_span(proc, vlm):
    s = proc.prepare(TWO_TURNS, image())
    span = runs(s.image_mask)
    assert len(span) == 1 and span[0][1] - span[0][0] == vlm.model.config.image_seq_length == 16
    assert s.pixel_values.shape == (1, 3, 32, 32) and s.pixel_values.dtype == np.float32  # [images, C, H, W]
    assert s.input_ids.dtype == np.int64
    assert np.array_equal(np.flatnonzero(s.text_mask), np.arange(span[0][1], s.length))
    assert not s.truncated


def test_answer_mask_is_exactly_the_answers(proc):
    for sample in (proc.prepare(TWO_TURNS, image()), proc.prepare(TWO_TURNS, None)):
        answers = [proc.tokenizer.decode(sample.input_ids[a:b]) for a, b in runs(sample.answer_mask)]
        assert [a.strip() for a in answers] == [t["value"] + "</s>" for t in TWO_TURNS if t["from"] == "gpt"]
        assert not (sample.answer_mask & sample.image_mask).any()


def test_text_only_is_explicit(proc):
    s = proc.prepare(TWO_TURNS, None)
    assert s.pixel_values is None and not s.has_image
    assert not s.image_mask.any() and s.text_mask.all()
    assert proc.image_token_id not in s.input_ids.tolist()
    assert "What colour is the circle?" in proc.tokenizer.decode(s.input_ids)


def test_image_without_placeholder_is_inserted_in_first_user_turn(proc):
    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A red square."}]
    s = proc.prepare(turns, image())
    assert s.image_mask.sum() == 16
    assert proc.tokenizer.decode(s.input_ids[s.text_mask]).startswith("\nDescribe it.")


def test_truncation_keeps_masks_consistent(proc):
    full = proc.prepare(TWO_TURNS, image())
    cut = proc.prepare(TWO_TURNS, image(), max_length=60)
    assert cut.truncated and cut.length == 60
    for name in ("input_ids", "image_mask", "text_mask", "answer_mask"):
        assert np.array_equal(getattr(cut, name), getattr(full, name)[:60])
    image_end = int(np.flatnonzero(full.image_mask)[-1]) + 1
    assert proc.prepare(TWO_TURNS, image(), max_length=image_end).image_mask.sum() == 16
    with pytest.raises(ContextTooShortError, match="image span"):
        proc.prepare(TWO_TURNS, image(), max_length=image_end - 1)


def test_default_context_is_model_limit(proc):
    long = [{"from": "human", "value": "<image>\n" + "red circle " * 400}, {"from": "gpt", "value": "ok"}]
    s = proc.prepare(long, image())
    assert proc.max_length == 512 and s.length == 512 and s.truncated and not s.answer_mask.any()


def test_prefix_unstable_template_is_rejected(proc):
    bad = copy.copy(proc.processor)
    bad.chat_template = proc.processor.chat_template.replace(
        "{% if add_generation_prompt %} ASSISTANT:", "{% if add_generation_prompt %} BOT:")
    with pytest.raises(ChatTemplateError, match="prefix"):
        VLMProcessor(bad).prepare(TWO_TURNS, image())


def test_layer_choice_and_discovery(vlm):
    assert default_coincide_layers(24) == [3, 7, 11, 15, 19]
    assert default_coincide_layers(12) == [1, 3, 5, 7, 9]
    assert default_coincide_layers(4) == [0, 1, 2, 3]
    layers = find_decoder_layers(vlm.model)
    assert layers is vlm.model.model.language_model.layers  # not the CLIP encoder layers
    with pytest.raises(ValueError, match="coincide_layers"):
        ReferenceVLM(vlm.model, vlm.processor, vlm.device, coincide_layers=[4])


def test_capture_handles_tuple_outputs_and_removes_hooks():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x

    module = Pair()
    with capture_outputs({"m": module}) as store:
        module(torch.ones(2))
    assert torch.equal(store["m"], torch.full((2,), 2.0))
    assert not module._forward_hooks


def test_forward_features_against_hf(vlm, proc):
    samples = [proc.prepare(TWO_TURNS, image()), proc.prepare(TWO_TURNS[:2], None)]
    model = vlm.model
    acts = vlm.forward_features(samples)
    ours = [h for m in model.modules() for h in m._forward_hooks.values() if "capture_outputs" in h.__qualname__]
    assert not ours  # HF installs its own output-capturing hooks lazily; ours must be gone
    batch = vlm.collate(samples)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.pixel_values, output_hidden_states=True)
    norm = model.model.language_model.norm
    for b, (sample, act) in enumerate(zip(samples, acts)):
        n = sample.length
        assert act.last_hidden.shape == (n, 128) and len(act.layer_outputs) == 4
        post = out.hidden_states[-1][b, :n]
        assert not torch.allclose(act.last_hidden, post, atol=1e-3)
        with torch.no_grad():
            assert torch.allclose(norm(act.last_hidden), post, atol=1e-5)
        ids = torch.from_numpy(sample.input_ids)
        pos = np.flatnonzero(sample.answer_mask)
        manual = -torch.log_softmax(out.logits[b, pos - 1].float(), dim=-1)[torch.arange(len(pos)), ids[pos]].mean()
        assert act.answer_loss == pytest.approx(float(manual), rel=1e-5)
        labels = torch.where(torch.from_numpy(sample.answer_mask), ids, -100)[None]
        with torch.no_grad():
            hf = model(input_ids=ids[None], labels=labels,
                       pixel_values=batch.pixel_values if sample.has_image else None).loss
        assert act.answer_loss == pytest.approx(float(hf), rel=1e-4)


def test_answer_loss_nan_without_answer_tokens(vlm, proc):
    s = proc.prepare(TWO_TURNS, image())
    s.answer_mask[:] = False
    assert np.isnan(vlm.forward_features([s])[0].answer_loss)


@pytest.mark.parametrize("lengths,max_padding,expected", [
    ([10, 40, 11, 39], 0.25, [[0, 2], [3, 1]]),  # sorted by length; 10+40 would pad 30 tokens
    ([10, 40, 11, 39], None, [[0, 1, 2, 3]]),  # off: one pass in input order
    ([10, 40, 11, 39], 10.0, [[0, 2, 3, 1]]),  # loose budget: one pass, sorted
    ([5, 5, 5], 0.0, [[0, 1, 2]]),  # equal lengths never pad
    ([7], 0.0, [[0]]),
    ([], 0.25, []),
])
def test_length_groups(lengths, max_padding, expected):
    groups = length_groups(lengths, max_padding)
    assert groups == expected
    for group in groups:
        padded = max(lengths[i] for i in group) * len(group)
        assert max_padding is None or padded <= (1 + max_padding) * sum(lengths[i] for i in group)


def test_length_groups_rejects_negative_padding():
    with pytest.raises(ValueError, match="max_padding"):
        length_groups([3, 4], -0.1)
