"""Benchmark: selection quality with the real reference model (smol-llava) on a real-data pool (easy-VQA).

Protocol (issue #14, item 4; the papers' protocol, scaled to a CPU):

- pool: :func:`datasel_ray.pools.easy_vqa.generate_pool` (``--num-samples`` rows of easy-VQA train questions,
  near-duplicate groups and label noise at ``--duplicate-rate`` / ``--noise-rate``, pool seed ``--pool-seed``),
  or ``--pool synthetic`` (:mod:`datasel_ray.synthetic`, the generated pool);
- selection: the real pipeline (:func:`datasel_ray.pipeline.runner.run_phases`: ingest, TIVE warm-up on Ray
  Train, extract with TIVE gradients, aggregate, select) with ``model.name_or_path: smol-llava`` as reference,
  ``select.dedup`` from ``--dedup`` (``both``: each method also selects among the rows the dedup phase kept,
  recorded as ``<method>+dedup``; the budget stays a share of the whole pool),
  ``tive.warmup_preset`` from ``--warmup-preset``, at each budget of ``--budgets``; ``random`` is drawn per
  training seed;
- target training: smol-llava's unaligned model (the same pretrained EfficientNet-Lite0 and SmolLM2, a seeded
  random projector; :func:`datasel_ray.training.recipes.smol_llava.build` with ``align=False``), the projector
  trained (LLaVA stage 1) with :func:`datasel_ray.training.finetune.finetune` for the **same number of epochs**
  (``--epochs``) on every subset and on the full pool, so a subset gets proportionally fewer steps, as in the
  papers; batch ``--batch-size``, lr ``--lr`` with 10% warm-up and cosine decay, training seed = run seed;
- evaluation: the held-out set (easy-VQA test split, :func:`datasel_ray.pools.easy_vqa.heldout_samples`,
  ``--eval-samples`` questions; synthetic pool: clean generated samples of seed ``90_000``):
  ``acc`` = mean over tasks of exact-match accuracy, ``loss`` = mean over tasks of answer loss;
  ``rel_acc`` = mean over tasks of subset acc / full acc x 100 (the papers' Rel), ``rel_loss`` = mean over tasks
  of full loss / subset loss x 100;
- ground truth of each selection: ``dup``, ``noise``, ``coverage`` (:func:`datasel_ray.evaluation.selection_quality`);
- seeds: ``--seeds`` training seeds (random subsets are redrawn per seed, the methods' selections are
  deterministic given the pool, so their spread is the training seed's); metrics are mean and std over seeds;
- metric (``--metric``; ``auto``: ``acc`` on easy-VQA, whose answers are short labels, ``loss`` on the generated
  pool, whose answers are free-form sentences that exact match scores near 0 even after training on the full pool):
  with ``loss`` nothing is decoded (accuracy is not measured) and the protocol check reads Rel(loss);
- protocol check: ``protocol.full_minus_random_rel`` = 100 - Rel(metric) of random at the first budget; the
  protocol tells subsets apart only when it is >= 3 (on LLaVA-665k random 15% reaches about 95.7% of full);
  ``protocol.discriminates`` records the verdict. Methods are never tuned to the pool.

Any failure fails the benchmark: the record holds ``metrics.error`` and the script exits with status 1. Prints one
JSON record and appends it, dated, to ``benchmarks/results/quality_real.jsonl``. A run stopped early leaves the
aggregate of its finished seeds in ``WORKDIR/partial.json``; ``--emit-partial`` (same arguments) records it with
``metrics.error`` naming the seeds completed, and exits with status 1 (a stopped run is a failed run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import rel_score, selections_at_budgets  # noqa: E402
from record import emit_record  # noqa: E402

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

METHODS = ["coincide", "datatailor", "tive"]


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", choices=["easyvqa", "synthetic"], default="easyvqa")
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--pool-seed", type=int, default=0)
    p.add_argument("--duplicate-rate", type=float, default=0.3)
    p.add_argument("--noise-rate", type=float, default=0.1)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budgets", default="0.15,0.2")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=120)
    p.add_argument("--warmup-preset", choices=["cpu", "reference"], default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dedup", choices=["off", "on", "both"], default="off",
                   help="select.dedup for the methods (the dedup phase runs before aggregate): off, on, or both "
                        "(every method twice; the dedup selections are keyed '<method>+dedup'); random stays "
                        "drawn from the whole pool")
    p.add_argument("--metric", choices=["auto", "acc", "loss"], default="auto",
                   help="what the protocol check and Rel read (auto: acc on easyvqa, loss on synthetic)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--emit-partial", action="store_true",
                   help="record the per-seed aggregate a stopped run left in WORKDIR/partial.json, as a failed run "
                   "(--seeds: the seeds it completed, when partial.json does not list them)")
    p.add_argument("--note", default="", help="with --emit-partial: appended to the recorded error")
    return p.parse_args(argv)


def _pool(args, workdir: Path):
    """(pool info, ground truth, task map, held-out samples, image tasks)."""
    from datasel_ray.synthetic import load_ground_truth

    if args.pool == "easyvqa":
        from datasel_ray.pools import easy_vqa

        info = easy_vqa.generate_pool(workdir / "pool", easy_vqa.EasyVQAPoolConfig(
            num_samples=args.num_samples, seed=args.pool_seed, duplicate_rate=args.duplicate_rate,
            noise_rate=args.noise_rate, heldout_samples=0))
        task_map = {f"{folder}/": task for task, folder in easy_vqa.TASK_FOLDERS.items()}
        held_out = easy_vqa.heldout_samples(args.eval_samples, seed=90_000)
    else:
        from datasel_ray.io.tasks import TEXT_ONLY_KEY
        from datasel_ray.synthetic import TASK_FOLDERS, TEXT_TASK, SynthConfig, generate_pool
        from datasel_ray.training.recipes import tiny

        info = generate_pool(workdir / "pool", SynthConfig(num_samples=args.num_samples, seed=args.pool_seed,
                                                            duplicate_rate=args.duplicate_rate,
                                                            noise_rate=args.noise_rate))
        task_map = {f"{folder}/": task for folder, task in TASK_FOLDERS.items()}
        task_map[TEXT_ONLY_KEY] = TEXT_TASK
        held_out = tiny.pretrain_samples(args.eval_samples, seed=90_000)
    return info, load_ground_truth(info.ground_truth_path), task_map, held_out


def _pool_samples(info, truth) -> dict[int, dict]:
    from PIL import Image

    from datasel_ray.synthetic import read_pool

    out = {}
    for index, (record, gt) in enumerate(zip(read_pool(info.pool_path), truth)):
        if gt["bad_kind"]:
            continue
        image = None
        if record.get("image"):
            with Image.open(info.image_root / record["image"]) as im:
                image = im.convert("RGB")
        out[index] = {"conversations": record["conversations"], "image": image, "task": gt["task"]}
    return out


def run(args, workdir: Path, timings: dict) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from datasel_ray.config import ModelConfig, RunConfig, SelectConfig
    from datasel_ray.evaluation import selection_quality
    from datasel_ray.models.vlm import VLMProcessor
    from datasel_ray.pipeline.runner import run_phases
    from datasel_ray.training.finetune import FinetuneConfig, evaluate_answers, finetune, prepare_samples
    from datasel_ray.training.recipes import smol_llava

    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    t0 = time.perf_counter()
    info, truth, task_map, held_out = _pool(args, workdir)
    pool_tasks = {r["task"] for r in truth if not r["bad_kind"]}
    dedup_modes = {"off": [False], "on": [True], "both": [False, True]}[args.dedup]
    phases = ["ingest", *(["warmup"] if "tive" in methods else []), "extract",
              *(["dedup"] if any(dedup_modes) else []), "aggregate", "select"]
    cfg = RunConfig.model_validate({
        "run_dir": str(workdir / "run"), "seed": args.pool_seed, "phases": phases,
        "pool": {"path": str(info.pool_path), "task_map": task_map, "records_per_block": 200},
        "model": {"name_or_path": "smol-llava"},
        "extract": {"batch_size": 8, "shard_rows": 64},
        "tive": {"enabled": "tive" in methods, "warmup_preset": args.warmup_preset},
        "select": {"methods": methods, "budget": budgets[0], "dedup": dedup_modes[0]},
        "ray": {"num_cpus": 2},
    })
    run_phases(cfg, quiet=True)
    selections = {}
    for k, dedup in enumerate(dedup_modes):
        if k:  # the same features; dedup again to write dedup/kept/, the methods fitted again on the kept rows
            cfg.select.dedup, cfg.select.budget = dedup, budgets[0]
            run_phases(cfg, ["dedup", "aggregate", "select"], force="dedup", quiet=True)
        suffix = "+dedup" if dedup else ""
        at_budgets = selections_at_budgets(cfg, methods, budgets)
        selections.update({(m + suffix, b): rows for (m, b), rows in at_budgets.items()})
    timings["pipeline_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    init_dir = workdir / "target_init"
    if not (init_dir / "model.safetensors").exists():
        smol_llava.build(init_dir, seed=0, align=False)
    processor = VLMProcessor.load(ModelConfig(name_or_path=str(init_dir)))
    samples = _pool_samples(info, truth)
    keys = sorted(samples)
    prepared = dict(zip(keys, prepare_samples(processor, [samples[k] for k in keys])))
    timings["prepare_s"] = round(time.perf_counter() - t0, 1)

    def train_eval(indices, seed: int) -> dict:
        rows = [prepared[int(i)] for i in indices if int(i) in prepared]
        steps = max(1, math.ceil(args.epochs * len(rows) / args.batch_size))
        ft = FinetuneConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=max(1, steps // 10),
                            schedule="cosine", min_lr_ratio=0.0, seed=seed, train="projector")
        model = AutoModelForImageTextToText.from_pretrained(init_dir, local_files_only=True)
        torch.manual_seed(seed)
        finetune(model, processor, rows, ft)
        return evaluate_answers(model, processor, held_out, accuracy=args.metric == "acc")

    per_seed = []
    t0 = time.perf_counter()
    for seed in seeds:
        full = train_eval(keys, seed)
        out = {"full": {"acc": full["accuracy_mean"], "loss": full["loss_mean"], "rows": len(keys),
                        "acc_by_task": full["accuracy"], "loss_by_task": full["loss"]}}
        rng = np.random.default_rng([seed, 7])
        chosen = dict(selections)
        for budget in budgets:
            n = SelectConfig(budget=budget).budget_rows(len(keys))
            chosen[("random", budget)] = np.sort(rng.choice(np.asarray(keys, dtype=np.int64), size=n, replace=False))
        for (m, budget), rows in chosen.items():
            q = selection_quality(rows, truth, pool_tasks)
            ev = train_eval(rows, seed)
            out[f"{m}@{budget:g}"] = {
                "rows": q["selected"], "dup": q["duplicate_rate"], "noise": q["noise_rate"],
                "coverage": q["task_coverage"], "acc": ev["accuracy_mean"], "loss": ev["loss_mean"],
                "rel_acc": rel_score(ev["accuracy"], full["accuracy"], invert=False),
                "rel_loss": rel_score(ev["loss"], full["loss"], invert=True),
                "acc_by_task": ev["accuracy"], "loss_by_task": ev["loss"]}
        per_seed.append(out)
        print(f"quality_real: seed {seed} done after {time.perf_counter() - t0:.0f}s", flush=True)
        (workdir / "partial.json").write_text(json.dumps(
            {**_aggregate(per_seed, budgets, args.metric), "seeds_completed": seeds[:len(per_seed)],
             "timings_s": timings}, default=str))
    timings["train_eval_s"] = round(time.perf_counter() - t0, 1)
    return _aggregate(per_seed, budgets, args.metric)


def resolve_metric(pool: str, metric: str) -> str:
    """The metric ``--metric auto`` stands for on ``pool``: exact match where answers are short labels."""
    return metric if metric != "auto" else ("acc" if pool == "easyvqa" else "loss")


def _aggregate(per_seed: list[dict], budgets: list[float], metric: str) -> dict:
    metrics: dict = {}
    for key in per_seed[0]:
        entry = {}
        for field in ("rows", "dup", "noise", "coverage", "acc", "loss", "rel_acc", "rel_loss"):
            vals = [s[key][field] for s in per_seed
                    if s[key].get(field) is not None and not math.isnan(s[key][field])]
            if vals:
                entry[field] = {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4)}
        for field in ("acc_by_task", "loss_by_task"):
            by_task = {t: [s[key][field].get(t, math.nan) for s in per_seed] for t in per_seed[0][key][field]}
            entry[field] = {t: round(float(np.nanmean(v)), 4) for t, v in by_task.items()
                            if not all(math.isnan(x) for x in v)}
        metrics[key] = entry
    random_first = metrics.get(f"random@{budgets[0]:g}", {}).get(f"rel_{metric}", {}).get("mean")
    gap = None if random_first is None else round(100.0 - random_first, 2)
    metrics["protocol"] = {"metric": metric, "full_minus_random_rel": gap,
                           "discriminates": gap is not None and gap >= 3.0}
    return metrics


def main(argv=None) -> dict:
    args = _parse(argv)
    args.metric = resolve_metric(args.pool, args.metric)
    start = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="datasel-quality-real-"))
    os.environ.setdefault("DATASEL_HOME", str(workdir / "home"))
    params = {k: v for k, v in vars(args).items() if k not in ("workdir", "no_save", "emit_partial", "note")}
    params.update({"reference_model": "smol-llava", "target": "smol-llava unaligned (seed 0), projector trained",
                   "image_size": 128, "visual_tokens": 4, "max_length": 2048})
    timings: dict = {}
    if args.emit_partial:
        partial = json.loads((workdir / "partial.json").read_text())
        seeds_done = partial.pop("seeds_completed", None) or [int(x) for x in args.seeds.split(",")]
        emit_record("quality_real", params, {
            **partial, "error": f"stopped before every seed finished: seeds completed {seeds_done}. {args.note}"},
            save=not args.no_save)
        sys.exit(1)  # a stopped run is a failed run
    try:
        metrics = run(args, workdir, timings)
    except Exception as exc:  # noqa: BLE001 - any failure fails the benchmark, recorded with its error
        traceback.print_exc()
        emit_record("quality_real", params, {"error": f"{type(exc).__name__}: {exc}"[:2000], "timings_s": timings,
                                             "total_s": round(time.perf_counter() - start, 1)},
                    save=not args.no_save)
        sys.exit(1)
    metrics["timings_s"] = timings
    metrics["total_s"] = round(time.perf_counter() - start, 1)
    return emit_record("quality_real", params, metrics, save=not args.no_save)


if __name__ == "__main__":
    main()
