"""smol-llava: a real pretrained LLaVA built offline (EfficientNet-Lite0 + SmolLM2-135M, projector aligned on
easy-VQA), loaded through the generic path; its answers depend on the image.

Two builds: the architecture, processor, chat template and eval-mode tests need only the pretrained parts, so they
run (``slow``, in ``make test``) on the recipe's unaligned model (``build(..., align=False)``: the same tower, LM,
tokenizer and processor with a seeded random projector; ~20 s). The grounding test needs the aligned model (the
one-time build, 200 alignment steps: ~7 min of 2 CPUs) and is marked ``real_model``: ``make smol-llava`` runs it
right after the build as its acceptance check; ``make test`` leaves it out (it was 37% of a CI run).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datasel_ray.config import ModelConfig

pytest.importorskip("easy_vqa")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("gguf")

from datasel_ray.training.recipes import smol_llava  # noqa: E402

# The aligned build (real_model test): the suite's 900 s per-test timeout is a hang guard sized for tests, not for
# this build, which it cut short on a loaded machine.
pytestmark = pytest.mark.timeout(2700)


def test_the_alignment_corpus_is_the_pinned_one():
    assert smol_llava.corpus_digest(smol_llava.ALIGN_SAMPLES, smol_llava.ALIGN_DATA_SEED) == \
        smol_llava.ALIGN_CORPUS_DIGEST
    samples = smol_llava.grounded_samples("train", 6, seed=1)
    assert [s["task"] for s in samples][2::3] == ["caption", "caption"]
    caption = samples[2]["conversations"]
    assert caption[0]["value"] == "<image>\n" + smol_llava.CAPTION_PROMPT
    colour, shape = caption[1]["value"].split()[1:]
    assert colour in smol_llava.COLOURS and shape in smol_llava.SHAPES
    assert all(s["image"].size == (64, 64) and s["image"].mode == "RGB" for s in samples)


def test_fingerprint_follows_the_recipe_and_reads_no_weights(monkeypatch):
    before = smol_llava.recipe_fingerprint(0)
    assert smol_llava.recipe_fingerprint(0) == before != smol_llava.recipe_fingerprint(1)
    monkeypatch.setattr(smol_llava, "ALIGN_STEPS", smol_llava.ALIGN_STEPS + 1)
    assert smol_llava.recipe_fingerprint(0) != before


@pytest.fixture(scope="module")
def smol_dir():
    """The aligned smol-llava (built once per machine into DATASEL_HOME)."""
    from pathlib import Path

    from datasel_ray.models.loading import resolve_model_path

    return Path(resolve_model_path("smol-llava"))


@pytest.fixture(scope="module")
def unaligned_dir(tmp_path_factory):
    """smol-llava's unaligned model: the recipe's tower, LM, tokenizer and processor, projector seeded random."""
    return smol_llava.build(tmp_path_factory.mktemp("smol-unaligned"), seed=0, align=False)


@pytest.fixture(scope="module")
def smol(unaligned_dir):
    from datasel_ray.models.vlm import ReferenceVLM

    return ReferenceVLM.load(ModelConfig(name_or_path=str(unaligned_dir)), device="cpu")


def _answer_losses(vlm, samples, images) -> np.ndarray:
    losses = []
    for lo in range(0, len(samples), 16):
        prepared = [vlm.processor.prepare(s["conversations"], im)
                    for s, im in zip(samples[lo:lo + 16], images[lo:lo + 16])]
        losses += [a.answer_loss for a in vlm.forward_features(prepared)]
    return np.asarray(losses)


@pytest.mark.real_model
def test_answers_depend_on_the_image(smol_dir):
    """Held-out easy-VQA test questions (colour and shape): the answer loss with the true images is at most a
    third of the loss with the images shuffled among the questions."""
    from datasel_ray.models.vlm import ReferenceVLM

    smol = ReferenceVLM.load(ModelConfig(name_or_path="smol-llava"), device="cpu")
    meta = json.loads((smol_dir / smol_llava.MARKER_FILE).read_text())
    assert meta["build"]["align_steps"] == smol_llava.ALIGN_STEPS
    assert meta["build"]["last10_loss"] < meta["build"]["first_loss"] / 3
    samples = smol_llava.grounded_samples("test", 64, seed=31_337, with_captions=False)
    true_images = [s["image"] for s in samples]
    shuffled = true_images[1:] + true_images[:1]
    true_loss = float(_answer_losses(smol, samples, true_images).mean())
    shuffled_loss = float(_answer_losses(smol, samples, shuffled).mean())
    print(f"held-out answer loss: true images {true_loss:.3f}, shuffled {shuffled_loss:.3f}")
    assert true_loss <= shuffled_loss / 3


@pytest.mark.slow
def test_architecture_loads_through_the_generic_path(smol, unaligned_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(unaligned_dir, local_files_only=True)
    processor = AutoProcessor.from_pretrained(unaligned_dir, local_files_only=True)
    config = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert config.vision_config.model_type == "datasel_efficientnet_lite"
    assert (config.image_seq_length, config.vision_feature_select_strategy, config.vision_feature_layer) == (
        4, "full", -1)
    assert config.text_config.num_hidden_layers == 30 and config.text_config.hidden_size == 576
    assert config.text_config.vocab_size == 49_153 == len(processor.tokenizer)
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>") == 49_152
    projector = model.model.multi_modal_projector
    assert (projector.linear_1.in_features, projector.linear_1.out_features) == (1280, 576)
    assert (projector.linear_2.in_features, projector.linear_2.out_features) == (576, 576)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32
    assert smol.coincide_layers == [4, 9, 14, 19, 24] and smol.hidden_size == 576
    assert smol.processor.max_length == 2048


@pytest.mark.slow
def test_chat_template_places_the_image_and_masks_the_answer(smol):
    from PIL import Image

    conversations = [{"from": "human", "value": "<image>\nwhat color is the shape?"}, {"from": "gpt", "value": "blue"},
                     {"from": "human", "value": "what shape is it?"}, {"from": "gpt", "value": "circle"}]
    prepared = smol.processor.prepare(conversations, Image.new("RGB", (64, 64), (0, 0, 255)))
    tokenizer = smol.processor.tokenizer
    assert tokenizer.decode(prepared.input_ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n<image><image><image><image>\nwhat color is the shape?<|im_end|>\n"
        "<|im_start|>assistant\nblue<|im_end|>\n<|im_start|>user\nwhat shape is it?<|im_end|>\n"
        "<|im_start|>assistant\ncircle<|im_end|>")
    assert int(prepared.image_mask.sum()) == 4
    assert tokenizer.decode(prepared.input_ids[prepared.answer_mask]) == "blue<|im_end|>circle<|im_end|>"
    assert prepared.pixel_values.shape == (1, 3, 128, 128)  # a leading image axis: one image


@pytest.mark.slow
def test_batchnorm_stays_in_eval_and_a_round_trip_keeps_the_logits(smol, tmp_path):
    from transformers import AutoModelForImageTextToText

    model = smol.model
    samples = smol_llava.grounded_samples("test", 3, seed=7, with_captions=False)
    batch = smol.collate([smol.processor.prepare(s["conversations"], s["image"]) for s in samples])
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "pixel_values": batch.pixel_values, "use_cache": False}
    with torch.no_grad():
        eval_logits = model(**inputs).logits
        model.train()
        try:
            norms = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            assert norms and not any(m.training for m in norms)
            train_logits = model(**inputs).logits
        finally:
            model.eval()
    assert torch.equal(eval_logits, train_logits)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, eval_logits)
