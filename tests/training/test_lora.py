"""Warm-up sample (equal per task, seeded) and the LoRA training loop on the tiny reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasel_ray.config import LoraConfig, ModelConfig
from datasel_ray.features.gradients import AdamState, tive_param_filter
from datasel_ray.training.lora import (
    attach_lora,
    epoch_batches,
    load_optimizer_state,
    optimizer_state_by_name,
    save_checkpoint,
    select_warmup_rows,
    train_lora,
    trainable_names,
    warmup_counts,
)


def test_warmup_counts_equal_split_capped():
    counts = warmup_counts({"a": 1000, "b": 300, "c": 20}, 0.08)
    # 0.08 * 1320 / 3 = 35.2 -> 35 per task, capped at the task size
    assert counts == {"a": 35, "b": 35, "c": 20}


def test_warmup_sample_equal_per_task_and_seeded():
    rng = np.random.default_rng(0)
    tasks = np.array(["vqa"] * 500 + ["ocr"] * 300 + ["caption"] * 200, dtype=object)
    order = rng.permutation(len(tasks))
    row_ids = np.arange(len(tasks), dtype=np.int64)[order] * 7 + 3
    tasks = tasks[order]
    picked = select_warmup_rows(row_ids, tasks, 0.08, seed=11)
    by_task = {t: int(np.isin(picked, row_ids[tasks == t]).sum()) for t in ("vqa", "ocr", "caption")}
    assert by_task == {"vqa": 27, "ocr": 27, "caption": 27}  # round(0.08 * 1000 / 3)
    assert len(np.unique(picked)) == len(picked) and np.all(np.diff(picked) > 0)
    again = select_warmup_rows(row_ids[::-1], tasks[::-1], 0.08, seed=11)
    np.testing.assert_array_equal(picked, again)  # independent of the row order
    assert not np.array_equal(picked, select_warmup_rows(row_ids, tasks, 0.08, seed=12))


def test_epoch_batches_seeded_and_sharded():
    a = epoch_batches(10, 3, epoch=0, seed=5)
    assert [len(b) for b in a] == [3, 3, 3, 1]
    assert sorted(np.concatenate(a).tolist()) == list(range(10))
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(epoch_batches(10, 3, 0, 5)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch_batches(10, 3, 1, 5)))
    shards = [epoch_batches(9, 2, 0, 5, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # padded: equal steps per rank
    assert set(np.concatenate([np.concatenate(s) for s in shards]).tolist()) == set(range(9))


@pytest.fixture(scope="module")
def tiny_samples(tiny_model_dir):
    from datasel_ray.models.vlm import VLMProcessor

    processor = VLMProcessor.load(ModelConfig())
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
    samples = []
    for name, rgb in colours.items():
        image = Image.new("RGB", (32, 32), rgb)
        conv = [{"from": "human", "value": "<image>\nWhat colour is the background?"},
                {"from": "gpt", "value": f"The background is {name}."}]
        samples.append(processor.prepare(conv, image))
    samples.append(processor.prepare([{"from": "human", "value": "Answer with one word."},
                                      {"from": "gpt", "value": "Yes, there is."}]))
    return processor, samples


def _load_tiny():
    from transformers import AutoModelForImageTextToText

    from datasel_ray.models.loading import resolve_model_path

    return AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny"), local_files_only=True)


def _mean_loss(model, samples, pad):
    from datasel_ray.models.vlm import collate
    from datasel_ray.models.answer_loss import answer_cross_entropy

    batch = collate(samples, pad)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.pixel_values, use_cache=False)
    return float(answer_cross_entropy(out.logits, batch.labels, "batch"))


def test_training_lowers_answer_loss_and_only_lora_changes(tiny_samples, tmp_path):
    processor, samples = tiny_samples
    model = attach_lora(_load_tiny(), LoraConfig(r=4, alpha=8), seed=3)
    names = trainable_names(model)
    assert names and all("lora" in n and "language_model" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pad = processor.pad_token_id
    loss0 = _mean_loss(model.eval(), samples, pad)
    optimizer, log = train_lora(model, samples, pad, learning_rate=1e-2, epochs=6, batch_size=3, seed=1)
    loss1 = _mean_loss(model, samples, pad)
    assert log.steps == 6 * 2 and len(log.epoch_loss) == 6
    assert loss1 < 0.92 * loss0, (loss0, loss1)
    assert log.epoch_loss[-1] < log.epoch_loss[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= set(names)
    assert any("lora_B" in n for n in changed)  # B starts at zero and moves

    state = optimizer_state_by_name(optimizer, names)
    assert set(state["state"]) == set(names)
    save_checkpoint(model, optimizer, names, tmp_path, {"complete": False})
    loaded = load_optimizer_state(tmp_path / "optimizer.pt")
    attn = [n for n in names if tive_param_filter(n)]
    adam = AdamState.from_named(loaded["state"], attn)
    assert adam.exp_avg.shape == (sum(dict(model.named_parameters())[n].numel() for n in attn),)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow  # the default run covers it: test_loop.py trains two fresh models and asserts bit-equal curves
def test_training_is_deterministic(tiny_samples):
    processor, samples = tiny_samples
    runs = []
    for _ in range(2):
        model = attach_lora(_load_tiny(), LoraConfig(r=4, alpha=8), seed=3)
        _, log = train_lora(model, samples, processor.pad_token_id, learning_rate=1e-3, epochs=2, batch_size=2,
                            seed=1)
        runs.append((log.step_loss, {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
