"""Time the three feature families per reference architecture on tiny random models built offline.

Prints one JSON record ``{"params": {...}, "metrics": {...}}`` and appends it, with an ISO date, to
``benchmarks/results/bench_architectures.jsonl``. For each architecture of ``tests/tiny_architectures.py``
(Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, LLaVA-OneVision; a few dozen dims, 4 layers): milliseconds per row of
preprocessing (chat template + processor) for rows with one image, two images and none; of the batched feature
pass (COINCIDE + DataTailor hooks) over a mixed batch of ``rows``; and of the TIVE per-sample LoRA gradients of
that batch with ``per_sample: auto`` (vmap, or the loop for M-RoPE models), each the median of ``repeats``. The
models are tiny, so the numbers compare code paths (per-image processor calls, loop vs vmap), not model sizes.
CPU timings on a shared machine: the load average is recorded.

    python benchmarks/bench_architectures.py [--rows 6] [--repeats 3] [--no-save]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from record import emit_record


def _median_ms(fn, repeats: int, per: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times) / per, 2)


def bench(architecture: str, rows: int, repeats: int, workdir: Path) -> dict:
    from PIL import Image
    from tiny_architectures import build

    from datasel_ray.config import LoraConfig, ModelConfig
    from datasel_ray.features.gradients import LoraGradientFeaturizer, tive_param_filter
    from datasel_ray.features.projector import make_projector
    from datasel_ray.models.vlm import ReferenceVLM, collate
    from datasel_ray.training.lora import attach_lora

    path = build(architecture, workdir / architecture)
    vlm = ReferenceVLM.load(ModelConfig(name_or_path=str(path)))
    one = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "It is red."}]
    two = [{"from": "human", "value": "<image>\n<image>\nWhich one is red?"}, {"from": "gpt", "value": "The first."}]
    text = [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "How can I help you today?"}]
    red, green = Image.new("RGB", (45, 30), (200, 20, 20)), Image.new("RGB", (64, 40), (20, 200, 20))
    kinds = [(one, [red]), (two, [red, green]), (text, [])]
    metrics = {}
    for name, (conv, images) in zip(("one_image", "two_images", "text_only"), kinds):
        metrics[f"prepare_ms_{name}"] = _median_ms(lambda c=conv, i=images: vlm.processor.prepare(c, i), repeats, 1)
    samples = [vlm.processor.prepare(*kinds[i % 3]) for i in range(rows)]
    vlm.forward_features(samples)
    metrics["features_ms_per_row"] = _median_ms(lambda: vlm.forward_features(samples), repeats, rows)
    model = vlm.model
    lora = attach_lora(model, LoraConfig(r=8, alpha=16), seed=0)
    names = [n for n, _ in lora.named_parameters() if tive_param_filter(n)]
    params = dict(lora.named_parameters())
    projector = make_projector("rademacher", sum(params[n].numel() for n in names), 512)
    featurizer = LoraGradientFeaturizer(lora, projector)
    batch = collate(samples, vlm.processor.pad_token_id)
    featurizer.compute(batch)
    metrics["tive_ms_per_row"] = _median_ms(lambda: featurizer.compute(batch), repeats, rows)
    metrics["tive_method"] = featurizer.method
    return metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    from tiny_architectures import ARCHITECTURES

    with tempfile.TemporaryDirectory(prefix="bench-arch-") as tmp:
        metrics = {arch: bench(arch, args.rows, args.repeats, Path(tmp)) for arch in ARCHITECTURES}
    metrics["load_average"] = os.getloadavg()[0]
    params = {"rows": args.rows, "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    return emit_record("bench_architectures", params, metrics, save=not args.no_save)


if __name__ == "__main__":
    main()
