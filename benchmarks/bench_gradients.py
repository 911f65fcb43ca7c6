"""Benchmark: per-sample LoRA gradients (vmap vs loop) and the projectors at 7B-LoRA scale.

Prints one JSON record ``{"params": {...}, "metrics": {...}}`` and appends it, with an ISO date, to
``benchmarks/results/bench_gradients.jsonl``.

Metrics:

- ``loop_*`` / ``vmap_sdpa_*`` / ``vmap_eager_*`` (samples/s, ms per sample): median over interleaved
  rounds (one batch each, after a warm-up round) of :class:`LoraGradientFeaturizer` on the tiny LLaVA
  (``datasel_ray.training.recipes.tiny.build_tiny_model``, SDPA attention as loaded), random token ids with one image each,
  answer = last ``answer_tokens`` tokens, projection to ``small_proj_dim``. ``vmap_sdpa`` keeps the model's SDPA
  attention inside vmap (``vmap_attention=None``: functorch has no batching rule for the CPU flash kernel and
  loops over the batch inside it), ``vmap_eager`` is the default (``vmap_attention="eager"``).
  ``*_cpu_ms_per_sample``: the process's CPU time per sample (``time.process_time``); with ``--torch-threads 1``
  it does not grow with other processes' load as wall time does, so ``*_over_loop_cpu`` is the ratio to trust on
  a busy machine (the load average is recorded).
- ``*_peak_mb``: the projectors' own working memory when projecting ``proj_batch`` samples of a LoRA gradient of
  7B size (grad_dim = 32 layers x 4 (q,k,v,o) x 2 (A,B) x 128 x 4096 = 134,217,728) to 8192 dims: peak process
  RSS (sampled by a thread every 2 ms) minus the RSS after the input was allocated. The input itself
  (``input_mb``, fp32, 537 MB per sample) is reported separately.
- Dense Rademacher at that size needs ~1.1e12 random signs per batch (about an hour on 2 CPUs), so it runs
  over the first ``dense_blocks`` matrix blocks only and the full time is extrapolated linearly in the number
  of blocks (every block costs the same: same shape, fresh generator). The sparse projector runs in full
  (or over the same fraction of the input with ``--quick``); ``sparse_speedup`` = dense (extrapolated) /
  sparse time on the same input.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit_record  # noqa: E402

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasel_ray.config import LoraConfig  # noqa: E402
from datasel_ray.features.gradients import LoraGradientFeaturizer, tive_param_filter  # noqa: E402
from datasel_ray.features.projector import RademacherProjector, SparseJLProjector  # noqa: E402

GRAD_DIM_7B = 32 * 4 * 2 * 128 * 4096  # 134,217,728


class PeakRSS:
    """Context manager sampling this process's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _tiny_peft_model(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    from datasel_ray.training.recipes.tiny import build_tiny_model

    path = build_tiny_model(Path(tempfile.gettempdir()) / "datasel-bench-tiny", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)  # init_lora_weights=False draws B at random
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, init_lora_weights=False,
                              target_modules=lora.target_modules)
    return get_peft_model(model.eval(), peft_cfg), "datasel_ray.models.tiny"


def _random_batch(model, batch_size: int, answer_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    image_token = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
    n_image = int(cfg.image_seq_length)
    vocab = int(cfg.text_config.vocab_size)
    size = int(cfg.vision_config.image_size)
    lengths = torch.randint(n_image + answer_tokens + 20, n_image + answer_tokens + 50, (batch_size,), generator=gen)
    width = int(lengths.max())
    ids = torch.zeros(batch_size, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, n in enumerate(lengths.tolist()):
        row = torch.randint(10, vocab, (n,), generator=gen)
        row[2:2 + n_image] = image_token
        ids[b, :n], mask[b, :n] = row, 1
        labels[b, n - answer_tokens:n] = row[n - answer_tokens:]
    pixels = torch.randn(batch_size, 3, size, size, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}, lengths


def bench_per_sample(args) -> tuple[dict, dict]:
    model, source = _tiny_peft_model(LoraConfig())
    grad_dim = sum(p.numel() for n, p in model.named_parameters() if tive_param_filter(n))
    projector = RademacherProjector(grad_dim, args.small_proj_dim, seed=0)
    batch, lengths = _random_batch(model, args.batch_size, args.answer_tokens, seed=0)
    arms = {"loop": {"method": "loop"}, "vmap_sdpa": {"method": "vmap", "vmap_attention": None},
            "vmap_eager": {"method": "vmap", "vmap_attention": "eager"}}
    featurizers = {name: LoraGradientFeaturizer(model, projector, **kw) for name, kw in arms.items()}
    wall = {name: [] for name in arms}
    cpu = {name: [] for name in arms}
    with warnings.catch_warnings():
        # vmap_sdpa measures exactly the fallback that functorch warns about on every call
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        for round_ in range(args.repeats + 1):  # interleaved rounds; round 0 is a warm-up
            for name in arms:
                start, start_cpu = time.perf_counter(), time.process_time()
                featurizers[name].compute(batch)
                if round_:
                    wall[name].append((time.perf_counter() - start) / args.batch_size)
                    cpu[name].append((time.process_time() - start_cpu) / args.batch_size)
    metrics = {}
    for name in arms:
        seconds = float(np.median(wall[name]))
        metrics[f"{name}_samples_per_s"] = round(1 / seconds, 2)
        metrics[f"{name}_ms_per_sample"] = round(1000 * seconds, 2)
        metrics[f"{name}_cpu_ms_per_sample"] = round(1000 * float(np.median(cpu[name])), 2)
    for name in ("vmap_sdpa", "vmap_eager"):
        metrics[f"{name}_over_loop"] = round(metrics["loop_ms_per_sample"] / metrics[f"{name}_ms_per_sample"], 2)
        metrics[f"{name}_over_loop_cpu"] = round(
            metrics["loop_cpu_ms_per_sample"] / metrics[f"{name}_cpu_ms_per_sample"], 2)
    params = {"model": source, "model_attention": model.config.text_config._attn_implementation,
              "lora_r": LoraConfig().r, "tiny_grad_dim": grad_dim,
              "batch_size": args.batch_size, "tokens_min_max": [int(lengths.min()), int(lengths.max())],
              "answer_tokens": args.answer_tokens, "small_proj_dim": args.small_proj_dim,
              "repeats": args.repeats, "torch_threads": torch.get_num_threads()}
    return params, metrics


def _timed_projection(projector, x, blocks: range) -> tuple[float, int]:
    """Seconds and peak extra RSS (bytes) of projecting ``x`` over ``blocks``."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        projector.project(x, blocks=blocks)
        seconds = time.perf_counter() - start
    return seconds, rss.peak - rss.start


def bench_projectors(args) -> tuple[dict, dict]:
    grad_dim, proj_dim = GRAD_DIM_7B, 8192
    x = torch.randn(args.proj_batch, grad_dim, generator=torch.Generator().manual_seed(0))
    dense = RademacherProjector(grad_dim, proj_dim, seed=0)
    sparse = SparseJLProjector(grad_dim, proj_dim, seed=0, nnz_per_col=args.nnz_per_col)
    dense_blocks = range(args.dense_blocks)
    dense_s, dense_peak = _timed_projection(dense, x, dense_blocks)
    dense_full_s = dense_s * dense.num_blocks / len(dense_blocks)
    sparse_fraction = 1.0 if not args.quick else len(dense_blocks) * dense.block_rows / grad_dim
    sparse_blocks = range(max(1, round(sparse.num_blocks * sparse_fraction)))
    sparse_s, sparse_peak = _timed_projection(sparse, x, sparse_blocks)
    sparse_full_s = sparse_s * sparse.num_blocks / len(sparse_blocks)
    params = {"grad_dim": grad_dim, "proj_dim": proj_dim, "proj_batch": args.proj_batch,
              "input_dtype": "float32", "dense_block_rows": dense.block_rows,
              "dense_blocks_timed": f"{len(dense_blocks)} of {dense.num_blocks}",
              "sparse_nnz_per_col": sparse.nnz_per_col, "sparse_block_rows": sparse.block_rows,
              "sparse_blocks_timed": f"{len(sparse_blocks)} of {sparse.num_blocks}",
              "extrapolation": "linear in the number of blocks"}
    metrics = {
        "input_mb": round(x.numel() * x.element_size() / 2**20, 1),
        "dense_peak_mb": round(dense_peak / 2**20, 1),
        "dense_s_per_block": round(dense_s / len(dense_blocks), 4),
        "dense_full_s_extrapolated": round(dense_full_s, 1),
        "sparse_peak_mb": round(sparse_peak / 2**20, 1),
        "sparse_full_s": round(sparse_full_s, 2),
        "sparse_speedup": round(dense_full_s / sparse_full_s, 1),
        "dense_peak_le_2gb": dense_peak <= 2 * 2**30,
    }
    return params, metrics


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: fewer repeats and blocks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=20)
    parser.add_argument("--small-proj-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--proj-batch", type=int, default=2)
    parser.add_argument("--dense-blocks", type=int, default=None)
    parser.add_argument("--nnz-per-col", type=int, default=4)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads (default: torch's, i.e. every CPU); 1 is robust to a busy machine")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.dense_blocks = args.dense_blocks or (2 if args.quick else 24)

    load_before = os.getloadavg()[0]
    p1, m1 = bench_per_sample(args)
    m1["load_average_1m_before_after_per_sample"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    p2, m2 = bench_projectors(args)
    record = {"params": {"quick": args.quick, **p1, **p2}, "metrics": {**m1, **m2}}
    emit_record("bench_gradients", record["params"], record["metrics"], save=not args.no_save)
    return record


if __name__ == "__main__":
    main()
