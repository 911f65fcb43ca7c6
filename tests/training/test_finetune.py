"""finetune: answer loss goes down, runs are bit-identical; evaluate_answers: exact match on a hand case."""

from __future__ import annotations

import math

import pytest
import torch

from datasel_ray.config import ModelConfig
from datasel_ray.training.recipes import tiny
from datasel_ray.models.vlm import VLMProcessor
from datasel_ray.training.finetune import (FinetuneConfig, batch_indices, evaluate_answers, finetune, lr_at,
                                           prepare_samples)


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory):
    """The tiny LLaVA at its random initialisation (no pretraining): a couple of seconds to build."""
    path = tmp_path_factory.mktemp("tiny-random")
    tiny._write_tiny_model(path, seed=0, pretrain=False)
    return path


def _load(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    return model, VLMProcessor.load(ModelConfig(name_or_path=str(path)))


def _chat(question: str, answer: str, task: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "image": None, "task": task}


def test_schedule_and_data_order():
    cfg = FinetuneConfig(steps=10, lr=1.0, warmup_steps=2, schedule="linear")
    assert [round(lr_at(s, cfg), 3) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_at(0, FinetuneConfig(steps=4, lr=2.0, schedule="cosine")) == 2.0
    batches = batch_indices(5, steps=4, batch_size=3, seed=1)
    assert [len(b) for b in batches] == [3, 3, 3, 3]
    assert sorted(batches[0].tolist() + batches[1].tolist()[:2]) == [0, 1, 2, 3, 4]  # epoch 0 first
    assert all((a == b).all() for a, b in zip(batches, batch_indices(5, 4, 3, seed=1)))


@pytest.mark.slow  # two full fine-tuning runs of the tiny VLM
def test_finetune_lowers_held_out_loss_and_is_deterministic(random_tiny):
    train = tiny.pretrain_samples(48, seed=123)
    held_out = tiny.pretrain_samples(14, seed=456)
    cfg = FinetuneConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, seed=5, num_threads=1)

    model, processor = _load(random_tiny)
    before = evaluate_answers(model, processor, held_out)["loss_mean"]
    prepared = prepare_samples(processor, train)
    log = finetune(model, processor, prepared, cfg)
    after = evaluate_answers(model, processor, held_out)
    assert len(log.step_loss) == 12 and log.samples_seen == 96 and log.epochs == 2.0
    assert after["loss_mean"] < before - 1.0, (before, after["loss_mean"])
    assert set(after["accuracy"]) == {"caption", "color_qa", "counting", "ocr", "position", "multi_turn",
                                      "text_chat"}

    again, _ = _load(random_tiny)
    log2 = finetune(again, processor, prepared, cfg)
    assert log2.step_loss == log.step_loss
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_projector_lm_freezes_vision_tower(random_tiny):
    model, processor = _load(random_tiny)
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n}
    log = finetune(model, processor, tiny.pretrain_samples(8, seed=1),
                   FinetuneConfig(steps=2, batch_size=4, lr=1e-3, train="projector_lm", num_threads=1))
    assert log.trainable_params < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if n in vision)


def test_evaluate_answers_exact_match_hand_case(random_tiny):
    model, processor = _load(random_tiny)
    taught = [_chat("Say the word.", "stone", "a"), _chat("Count to three.", "one two three", "b")]
    finetune(model, processor, taught, FinetuneConfig(steps=40, batch_size=2, lr=1e-2, schedule="constant",
                                                      num_threads=1))
    held = [
        taught[0],                                   # learnt: correct
        _chat("Say the word.", "  STONE ", "a"),      # same answer after strip/lower: correct (decoded)
        _chat("Say the word.", "pebble", "a"),        # wrong
        taught[1],                                   # correct
    ]
    fast = evaluate_answers(model, processor, held, batch_size=3)
    assert fast["accuracy"] == {"a": pytest.approx(2 / 3), "b": 1.0}
    assert fast["n_items"] == {"a": 3, "b": 1} and fast["n_samples"] == {"a": 3, "b": 1}
    assert fast["loss"]["b"] < 0.5 and fast["loss"]["a"] > fast["loss"]["b"]
    slow = evaluate_answers(model, processor, held, verify=True)
    assert slow["accuracy"] == fast["accuracy"]
    assert all(math.isclose(slow["loss"][t], fast["loss"][t], rel_tol=1e-4) for t in fast["loss"])
    loss_only = evaluate_answers(model, processor, held, batch_size=3, accuracy=False)
    assert loss_only["loss"] == pytest.approx(fast["loss"], rel=1e-6)
    assert all(math.isnan(v) for v in loss_only["accuracy"].values()) and math.isnan(loss_only["accuracy_mean"])
