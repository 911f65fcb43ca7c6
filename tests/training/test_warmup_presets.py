"""TIVE warm-up presets (reference vs cpu), the cosine schedule with warm-up, gradient accumulation and the
trained projector."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from datasel_ray.config import LM_ATTENTION_MODULES, LM_LINEAR_MODULES, ModelConfig, TiveConfig
from datasel_ray.training.lora import attach_lora, lr_factor, train_lora, trainable_names


def test_auto_is_reference_for_real_checkpoints_and_cpu_for_tiny():
    real = TiveConfig().resolved(ModelConfig(name_or_path="smol-llava"))
    assert real.warmup_preset == "reference"
    assert (real.learning_rate, real.lr_schedule, real.warmup_ratio, real.effective_batch_size) == (
        2e-5, "cosine", 0.03, 128)
    assert (real.lora.r, real.lora.alpha, real.lora.target_modules, real.train_projector) == (
        128, 256, LM_LINEAR_MODULES, True)
    assert real.accumulation_steps() == 16  # 128 / (batch 8 x 1 worker)
    cpu = TiveConfig().resolved(ModelConfig())
    assert cpu.warmup_preset == "cpu"
    assert (cpu.learning_rate, cpu.lr_schedule, cpu.warmup_ratio, cpu.effective_batch_size) == (
        2e-4, "constant", 0.0, None)
    assert (cpu.lora.r, cpu.lora.alpha, cpu.lora.target_modules, cpu.train_projector) == (
        8, 16, LM_ATTENTION_MODULES, False)
    assert cpu.accumulation_steps() == 1


def test_explicit_fields_override_the_preset_and_cpu_switches_back():
    tive = TiveConfig.model_validate({"learning_rate": 1e-4, "warmup_batch_size": 4, "num_workers": 2,
                                      "lora": {"r": 16}})
    real = tive.resolved(ModelConfig(name_or_path="org/llava"))
    assert (real.learning_rate, real.lora.r, real.lora.alpha, real.lr_schedule) == (1e-4, 16, 256, "cosine")
    assert real.accumulation_steps() == 16  # 128 / (4 x 2)
    back = TiveConfig(warmup_preset="cpu").resolved(ModelConfig(name_or_path="org/llava"))
    assert (back.warmup_preset, back.learning_rate, back.lora.r, back.train_projector) == ("cpu", 2e-4, 8, False)
    assert TiveConfig(effective_batch_size=20).accumulation_steps() == 3  # ceil(20 / 8)
    again = real.resolved(ModelConfig(name_or_path="org/llava"))
    assert again == real
    spelled_out = TiveConfig.model_validate(TiveConfig().model_dump())
    assert spelled_out.resolved(ModelConfig(name_or_path="org/llava")).lora.r == 128


def test_lr_factor_warms_up_linearly_then_decays_by_a_cosine_to_zero():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)))
    assert lr_factor(9, 10, 2) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 1, 0) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def samples(tiny_model_dir):
    from datasel_ray.models.vlm import VLMProcessor

    processor = VLMProcessor.load(ModelConfig())
    out = []
    for k, (name, rgb) in enumerate({"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
                                     "yellow": (230, 230, 20), "black": (0, 0, 0)}.items()):
        conv = [{"from": "human", "value": "<image>\nWhat colour is the background?"},
                {"from": "gpt", "value": f"The background is {name}."}]
        out.append(processor.prepare(conv, Image.new("RGB", (32, 32), rgb)))
    return processor, out


def _tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True)


def test_accumulation_and_cosine_schedule_in_train_lora(samples, tiny_model_dir):
    processor, prepared = samples
    model = attach_lora(_tiny(tiny_model_dir), TiveConfig().lora, seed=0)
    lrs = []
    optimizer, log = train_lora(model, prepared, processor.pad_token_id, learning_rate=1e-3, epochs=2, batch_size=1,
                                seed=0, schedule="cosine", warmup_ratio=0.5, accumulation_steps=2,
                                on_step=lambda e, s, loss, n: lrs.append((s, n)))
    assert log.steps == 6 and log.samples_seen == 10  # 5 batches -> 3 steps (2 + 2 + 1) per epoch
    assert [n for _, n in lrs] == [2, 2, 1, 2, 2, 1]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(5, 6, 3), abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_one_step_of_accumulated_halves_equals_the_mean_of_their_gradients(samples, tiny_model_dir):
    """Accumulating two batches (each loss halved) gives the gradient of the mean of the two batch losses."""
    from datasel_ray.models.vlm import collate
    from datasel_ray.models.answer_loss import answer_cross_entropy

    processor, prepared = samples
    base = attach_lora(_tiny(tiny_model_dir), TiveConfig().lora, seed=0)
    params = [p for p in base.parameters() if p.requires_grad]
    losses = []
    for part in (prepared[:1], prepared[1:2]):
        batch = collate(part, processor.pad_token_id)
        out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                   use_cache=False)
        losses.append(answer_cross_entropy(out.logits, batch.labels, "batch"))
    expected = torch.autograd.grad((losses[0] + losses[1]) / 2, params)
    before = [p.detach().clone() for p in params]
    optimizer, log = train_lora(base, prepared[:2], processor.pad_token_id, learning_rate=1e-3, epochs=1,
                                batch_size=1, seed=0, accumulation_steps=2)
    assert log.steps == 1
    grads = [p.grad for p in params]
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))
    assert any(not torch.equal(b, p) for b, p in zip(before, params))


def test_train_projector_adds_a_trained_projector_copy(tiny_model_dir):
    model = attach_lora(_tiny(tiny_model_dir), TiveConfig().lora, seed=0, train_projector=True)
    names = trainable_names(model)
    projector = [n for n in names if "multi_modal_projector" in n]
    assert projector and all("modules_to_save" in n for n in projector)
    assert all("lora_" in n for n in names if n not in projector)
    frozen = attach_lora(_tiny(tiny_model_dir), TiveConfig().lora, seed=0)
    assert not [n for n in trainable_names(frozen) if "multi_modal_projector" in n]
