"""Benchmark: selection quality on a generated pool, by ground truth and by training on the subsets.

For each seed: generate a pool (:mod:`datasel_ray.synthetic`: 7 learnable tasks, near-duplicate groups, noisy
and bad rows), run the real pipeline (:func:`datasel_ray.pipeline.runner.run_phases` on
:func:`datasel_ray.demo.demo_config`, TIVE included unless ``--no-tive``) at the first budget, then re-run
``select`` at each other budget. A method that fails fails the benchmark: the record holds ``metrics.error`` (the
exception) and the script exits with status 1. Per method and budget:

- ground truth (:func:`datasel_ray.evaluation.selection_quality`): ``dup`` (share of selected rows repeating a
  near-duplicate group already selected), ``noise`` (share of noisy rows), ``coverage`` (share of tasks hit);
- training: the tiny LLaVA at its **random initialisation** (``datasel_ray.training.recipes.tiny`` config, seed 0, no
  pretraining; the pretrained reference model already knows the tasks from clean data, so it would hide the
  effect of the subset) is trained with :func:`datasel_ray.training.finetune.finetune` for the same number of
  steps, batch size and schedule on the subset and on the full pool (all good rows), then evaluated on a clean
  held-out set (``eval_per_task`` samples per task, generator seed ``90_000 + seed``):
  ``acc`` / ``loss`` = mean over tasks of per-task exact-match accuracy / answer loss;
  ``rel_acc`` = mean over tasks (with full-pool accuracy > 0) of subset acc / full acc x 100 (the papers'
  "Rel"); ``rel_loss`` = mean over tasks of full loss / subset loss x 100 (higher is better, as Rel).

Metrics are mean and std over seeds. Prints one JSON record ``{"params", "metrics"}`` and appends it, with an
ISO ``date``, to ``benchmarks/results/quality.jsonl``. ``--quick`` is a smoke run of a few minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit_record  # noqa: E402

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from datasel_ray import schema  # noqa: E402
from datasel_ray.demo import demo_config  # noqa: E402
from datasel_ray.evaluation import selection_quality  # noqa: E402
from datasel_ray.io import layout  # noqa: E402
from datasel_ray.io.rundir import RunDir  # noqa: E402
from datasel_ray.synthetic import SynthConfig, generate_pool, load_ground_truth, read_pool  # noqa: E402

METHODS = ["coincide", "datatailor", "tive", "random"]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budgets", default="0.15,0.2")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-per-task", type=int, default=30)
    p.add_argument("--no-tive", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.seeds, args.steps, args.eval_per_task = 700, "0", 20, 4
    return args


def _pool_samples(pool_path: Path, image_root: Path, truth: list[dict]) -> dict[int, dict]:
    """Good rows of the pool as finetune samples, keyed by pool index (images loaded, task from ground truth)."""
    from PIL import Image

    out = {}
    for index, (record, gt) in enumerate(zip(read_pool(pool_path), truth)):
        if gt["bad_kind"]:
            continue
        image = None
        if record.get("image"):
            with Image.open(image_root / record["image"]) as im:
                image = im.convert("RGB")
        out[index] = {"conversations": record["conversations"], "image": image, "task": gt["task"]}
    return out


def rel_score(sub: dict, full: dict, invert: bool) -> float:
    """Mean over tasks of a subset's metric relative to the full pool's, in percent (``invert`` for losses:
    full / subset); tasks the full pool scores 0 on (or a subset without a finite loss) are left out."""
    vals = []
    for task, f in full.items():
        s = sub.get(task, math.nan)
        if invert:
            if s > 0 and not math.isnan(s):
                vals.append(f / s * 100)
        elif f > 0:
            vals.append(s / f * 100)
    return float(np.mean(vals)) if vals else math.nan


def selections_at_budgets(cfg, methods: list[str], budgets: list[float]) -> dict[tuple[str, float], np.ndarray]:
    """Pool indices (row id without its file bits, int64) selected by each method at each budget: the run's own
    selection for ``budgets[0]`` (already run), then the select phase re-run for every further budget."""
    from datasel_ray.pipeline.runner import run_phases

    run_dir = RunDir(cfg.run_dir)
    mask = (1 << schema.ROW_ID_FILE_SHIFT) - 1
    selections: dict[tuple[str, float], np.ndarray] = {}
    for i, budget in enumerate(budgets):
        if i:
            cfg.select.budget = budget
            run_phases(cfg, ["select"], quiet=True)
        for m in methods:
            ids = (run_dir / layout.SELECTIONS / m / layout.SELECTED_IDS).read_npy()
            selections[(m, budget)] = np.asarray(ids, dtype=np.int64) & mask
    return selections


def run_seed(args, seed: int, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from datasel_ray.training.recipes import tiny
    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.pipeline.runner import run_phases
    from datasel_ray.training.finetune import FinetuneConfig, evaluate_answers, finetune, prepare_samples

    budgets = [float(b) for b in args.budgets.split(",")]
    info = generate_pool(workdir / f"pool{seed}", SynthConfig(num_samples=args.num_samples, seed=seed))
    truth = load_ground_truth(info.ground_truth_path)
    pool_tasks = {r["task"] for r in truth if not r["bad_kind"]}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tive = not args.no_tive
    cfg = demo_config(workdir / f"run{seed}", info.pool_path, tive=tive, seed=seed)
    phases = ["ingest", "warmup", "extract", "aggregate", "select"] if tive else \
        ["ingest", "extract", "aggregate", "select"]
    cfg.select.budget = budgets[0]
    run_phases(cfg, phases, quiet=True)
    methods = [m for m in METHODS if m in cfg.select.methods]
    selections = selections_at_budgets(cfg, methods, budgets)
    timings["pipeline_s"] = time.perf_counter() - t0

    # training: same init, same steps on every subset and on the full pool
    t0 = time.perf_counter()
    init_dir = workdir / "tiny_random_init"
    if not (init_dir / "model.safetensors").exists():
        tiny._write_tiny_model(init_dir, seed=0, pretrain=False)
    processor = VLMProcessor.load(tiny_model_cfg(init_dir))
    samples = _pool_samples(info.pool_path, info.image_root, truth)
    keys = sorted(samples)
    prepared = dict(zip(keys, prepare_samples(processor, [samples[k] for k in keys], 512)))
    held_out = tiny.pretrain_samples(args.eval_per_task * 7, seed=90_000 + seed)
    ft = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=max(1, args.steps // 10), schedule="cosine", min_lr_ratio=0.1, seed=seed)
    timings["prepare_s"] = time.perf_counter() - t0

    def train_eval(indices) -> dict:
        model = AutoModelForImageTextToText.from_pretrained(init_dir, local_files_only=True)
        torch.manual_seed(seed)
        finetune(model, processor, [prepared[int(i)] for i in indices if int(i) in prepared], ft)
        return evaluate_answers(model, processor, held_out)

    t0 = time.perf_counter()
    full = train_eval(keys)
    out = {"full": {"acc": full["accuracy_mean"], "loss": full["loss_mean"], "acc_by_task": full["accuracy"],
                    "loss_by_task": full["loss"], "rows": len(keys)}}
    for (m, budget), rows in selections.items():
        q = selection_quality(rows, truth, pool_tasks)
        ev = train_eval(rows)
        out[f"{m}@{budget:g}"] = {
            "rows": q["selected"], "dup": q["duplicate_rate"], "noise": q["noise_rate"],
            "coverage": q["task_coverage"], "acc": ev["accuracy_mean"], "loss": ev["loss_mean"],
            "rel_acc": rel_score(ev["accuracy"], full["accuracy"], invert=False),
            "rel_loss": rel_score(ev["loss"], full["loss"], invert=True),
            "acc_by_task": ev["accuracy"], "loss_by_task": ev["loss"],
        }
    timings["train_eval_s"] = time.perf_counter() - t0
    return {"results": out, "timings": timings}


def tiny_model_cfg(path: Path):
    from datasel_ray.config import ModelConfig

    return ModelConfig(name_or_path=str(path))


def _aggregate(per_seed: list[dict]) -> dict:
    metrics: dict = {}
    keys = per_seed[0]["results"].keys()
    for key in keys:
        entry = {}
        for field in ("rows", "dup", "noise", "coverage", "acc", "loss", "rel_acc", "rel_loss"):
            vals = [s["results"][key].get(field) for s in per_seed if key in s["results"]]
            vals = [v for v in vals if v is not None]
            if vals:
                entry[field] = {"mean": round(float(np.nanmean(vals)), 4),
                                "std": round(float(np.nanstd(vals)), 4)}
        by_task = {}
        for field in ("acc_by_task", "loss_by_task"):
            tasks = per_seed[0]["results"][key][field].keys()
            by_task[field] = {t: round(float(np.nanmean([s["results"][key][field].get(t, math.nan)
                                                         for s in per_seed])), 4) for t in tasks}
        entry.update(by_task)
        metrics[key] = entry
    return metrics


def main(argv=None) -> dict:
    args = _parse(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="datasel-quality-"))
    os.environ.setdefault("DATASEL_HOME", str(workdir / "home"))
    params = {
        "quick": args.quick, "num_samples": args.num_samples, "seeds": seeds, "budgets": args.budgets,
        "methods": [m for m in METHODS if not (args.no_tive and m == "tive")],
    }
    try:
        per_seed = [run_seed(args, seed, workdir / f"seed{seed}") for seed in seeds]
    except Exception as exc:  # noqa: BLE001 - any method failure fails the benchmark, recorded with its error
        traceback.print_exc()
        emit_record("quality", params, {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "total_s": round(time.perf_counter() - start, 1)}, save=not args.no_save)
        sys.exit(1)
    record = {
        "bench": "quality",
        "params": {
            **params,
            "train": {"init": "tiny LLaVA config, random init (seed 0, not pretrained)", "steps": args.steps,
                      "batch_size": args.batch_size, "lr": args.lr, "schedule": "warmup 10% + cosine to 0.1 lr",
                      "trained": "all parameters"},
            "eval": {"held_out_per_task": args.eval_per_task, "held_out_seed": "90000 + seed",
                     "accuracy": "greedy exact match after strip/lower, per assistant turn"},
            "reference_model": "tiny (pretrained, datasel_ray.training.recipes.tiny)",
            "cpus": os.cpu_count(),
        },
        "metrics": {**_aggregate(per_seed),
                    "timings_s": {k: round(float(np.mean([s["timings"][k] for s in per_seed])), 1)
                                  for k in per_seed[0]["timings"]},
                    "total_s": round(time.perf_counter() - start, 1)},
    }
    emit_record("quality", record["params"], record["metrics"], save=not args.no_save)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
