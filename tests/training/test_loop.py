"""The one training loop (training/loop.py) and the one answer-token CE (models/answer_loss.py).

The warm-up's loss curve must be the one it had before the loop was shared: `_warmup_loop_before` is the
pre-change `lora.train_lora` (commit 00300f0) kept verbatim as the oracle, compared bit for bit on the same weights.
No curve is pinned as numbers: the tiny reference model is built on the machine that runs the tests, and its
weights (so every loss) differ in the last bits between CPU kinds (a curve recorded on one machine was 0.2% to 3%
off on another).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasel_ray.config import LoraConfig, ModelConfig
from datasel_ray.models.answer_loss import answer_cross_entropy
from datasel_ray.models.vlm import collate
from datasel_ray.training.finetune import FinetuneConfig, lr_at
from datasel_ray.training.lora import attach_lora, epoch_batches, lr_factor, train_lora
from datasel_ray.training.loop import LrSchedule

STEPS = {"constant": 9, "cosine_accum": 6}
RUNS = {
    "constant": dict(learning_rate=1e-2, epochs=3, batch_size=2, seed=1),
    "cosine_accum": dict(learning_rate=1e-3, epochs=2, batch_size=1, seed=0, schedule="cosine", warmup_ratio=0.5,
                         accumulation_steps=2),
}


def _warmup_loop_before(model, samples, pad_token_id, *, learning_rate, epochs, batch_size, seed,
                        schedule="constant", warmup_ratio=0.0, accumulation_steps=1):
    """`lora.train_lora` as it was before training/loop.py (world size 1, CPU): the oracle."""
    def batch_answer_loss(logits, labels):
        target = labels[:, 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                               ignore_index=-100)

    def old_lr_factor(step, total_steps, warmup_steps):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps + 1) / span)))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    per_epoch = math.ceil(len(epoch_batches(len(samples), batch_size, 0, seed)) / accumulation_steps)
    total_steps = per_epoch * epochs
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    dtype = next(model.parameters()).dtype
    step_loss = []
    model.train()
    for epoch in range(epochs):
        batches = epoch_batches(len(samples), batch_size, epoch, seed)
        for lo in range(0, len(batches), accumulation_steps):
            group = batches[lo:lo + accumulation_steps]
            optimizer.zero_grad(set_to_none=True)
            values = []
            for indices in group:
                batch = collate([samples[int(i)] for i in indices], pad_token_id)
                if not bool((batch.labels[:, 1:] != -100).any()):
                    continue
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            **batch.image_kwargs("cpu", dtype), use_cache=False)
                loss = batch_answer_loss(out.logits, batch.labels)
                (loss / len(group)).backward()
                values.append(float(loss.detach()))
            if not values:
                continue
            factor = old_lr_factor(len(step_loss), total_steps, warmup_steps) if schedule == "cosine" else 1.0
            for group_params in optimizer.param_groups:
                group_params["lr"] = learning_rate * factor
            optimizer.step()
            step_loss.append(float(np.mean(values)))
    model.eval()
    return step_loss


@pytest.fixture(scope="module")
def warmup_samples(tiny_model_dir):
    from datasel_ray.models.vlm import VLMProcessor

    processor = VLMProcessor.load(ModelConfig())
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20),
               "black": (0, 0, 0)}
    samples = [processor.prepare([{"from": "human", "value": "<image>\nWhat colour is the background?"},
                                  {"from": "gpt", "value": f"The background is {name}."}],
                                 Image.new("RGB", (32, 32), rgb)) for name, rgb in colours.items()]
    samples.append(processor.prepare([{"from": "human", "value": "Answer with one word."},
                                      {"from": "gpt", "value": "Yes, there is."}]))
    return processor, samples


def _lora_tiny(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, local_files_only=True)
    return attach_lora(base, LoraConfig(r=4, alpha=8), seed=3)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_shared_loop_gives_the_warmup_loss_curve_of_before(run, warmup_samples, tiny_model_dir):
    processor, samples = warmup_samples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        old_model, new_model = _lora_tiny(tiny_model_dir), _lora_tiny(tiny_model_dir)
        old_curve = _warmup_loop_before(old_model, samples, processor.pad_token_id, **RUNS[run])
        _, log = train_lora(new_model, samples, processor.pad_token_id, **RUNS[run])
    finally:
        torch.set_num_threads(threads)
    assert log.step_loss == old_curve  # bit for bit
    new_params = dict(new_model.named_parameters())
    assert all(torch.equal(p, new_params[n]) for n, p in old_model.named_parameters())
    # 6 samples: 3 steps of 2 per epoch, or 6 batches of 1 accumulated by 2; the loss comes down
    assert len(log.step_loss) == STEPS[run] and log.step_loss[-1] < log.step_loss[0], log.step_loss


def test_schedules_keep_each_callers_convention():
    # the warm-up reads the decay one step later: lr 0 at the last step
    assert [lr_factor(s, 10, 2) for s in (0, 1, 9)] == [0.5, 1.0, 0.0]
    assert lr_factor(2, 10, 2) == 0.5 * (1 + math.cos(math.pi / 8))
    # fine-tuning reads it at the step (HF): full lr at the first step after warm-up
    cfg = FinetuneConfig(steps=10, lr=2.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in (0, 1, 2)] == [1.0, 2.0, 2.0]
    assert lr_at(9, cfg) == 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert LrSchedule("linear", 4).lr(1.0, 2) == 0.5
    with pytest.raises(ValueError, match="Unknown lr schedule 'step'"):
        LrSchedule("step", 4)


def _labels():
    # rows: two answer tokens; one answer token; none. Unshifted: position t predicts labels[t + 1].
    return torch.tensor([[-100, -100, 4, 5, -100], [-100, 3, -100, -100, -100], [-100] * 5])


def test_answer_cross_entropy_reductions_against_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = _labels()
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_ce = {(0, 1): -logp[0, 1, 4], (0, 2): -logp[0, 2, 5], (1, 0): -logp[1, 0, 3]}
    batch = answer_cross_entropy(logits, labels, "batch")
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch, sum(token_ce.values()) / 3)
    row = answer_cross_entropy(logits, labels, "row")
    torch.testing.assert_close(row[:2], torch.stack([(token_ce[0, 1] + token_ce[0, 2]) / 2, token_ce[1, 0]]))
    assert math.isnan(float(row[2]))
    masked = [answer_cross_entropy(logits[b], labels[b], "masked") for b in range(3)]
    torch.testing.assert_close(torch.stack(masked[:2]), row[:2])
    assert float(masked[2]) == 0.0
    shifted = answer_cross_entropy(logits[0, 1:3], labels[0, 2:4], "masked", shifted=True)
    torch.testing.assert_close(shifted, row[0])
    with pytest.raises(ValueError, match="Unknown reduction 'sum'"):
        answer_cross_entropy(logits, labels, "sum")


def test_masked_answer_cross_entropy_vmaps_like_the_per_sample_call():
    from torch.func import vmap

    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7)
    labels = _labels()
    batched = vmap(lambda lg, lb: answer_cross_entropy(lg, lb, "masked"))(logits, labels)
    torch.testing.assert_close(batched, torch.stack([answer_cross_entropy(logits[b], labels[b], "masked")
                                                     for b in range(3)]))
