"""``datasel demo``: generated pool → every phase on a local Ray → a summary with ground-truth quality.

``--model`` picks the reference model: ``tiny`` (default, a few minutes) or a real checkpoint such as
``smol-llava``, for which :func:`estimate_run_seconds` first times the model on a few samples and prints an
estimate of the whole run. The demo's TIVE warm-up uses the ``cpu`` preset for every model (the ``reference``
preset's r128 adapter makes CPU gradients slow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from datasel_ray import schema
from datasel_ray.config import PHASES, TINY_MODEL, RunConfig
from datasel_ray.evaluation import pool_quality, random_expectation, selection_quality
from datasel_ray.io.rundir import ManifestMismatch, RunDir
from datasel_ray.io.tasks import TEXT_ONLY_KEY
from datasel_ray.models.identity import model_identity
from datasel_ray.pipeline.feature_store import load_features
from datasel_ray.seeds import derive_seed
from datasel_ray.synthetic import TASK_FOLDERS, TEXT_TASK, SynthConfig, generate_pool, load_ground_truth

DEMO_METHODS = ["coincide", "datatailor", "random"]


def demo_config(workdir: Path, pool_path: Path, tive: bool, seed: int = 0, model: str = TINY_MODEL) -> RunConfig:
    task_map = {f"{folder}/": task for folder, task in TASK_FOLDERS.items()}
    task_map[TEXT_ONLY_KEY] = TEXT_TASK
    phases = [phase for phase in PHASES if tive or phase != "warmup"]
    return RunConfig.model_validate({
        "run_dir": str(workdir / "run"),
        "seed": seed,
        "phases": phases,
        "pool": {"path": str(pool_path), "task_map": task_map, "records_per_block": 200},
        "extract": {"batch_size": 8, "shard_rows": 64, "min_actors": 1, "max_actors": 1},
        "model": {"name_or_path": model},
        "tive": {"enabled": tive, "warmup_preset": "cpu"},
        "select": {"methods": DEMO_METHODS + (["tive"] if tive else []), "budget": 0.2},
        # the tiny model's features do not tell near-duplicates apart (README, "Near-duplicate removal": its
        # semantic pass would drop ~85% of the generated pool); the demo runs the exact pass alone with it
        "dedup": {"semantic": model != TINY_MODEL},
        "ray": {"num_cpus": 2},
    })


def reset_stale_run(cfg: RunConfig) -> str | None:
    """Delete ``cfg.run_dir`` when any recorded phase was made with another config or model (e.g. after an
    upgrade); return the mismatch message, or None when the run can be resumed as is.

    The demo owns its run directory, so it starts again instead of asking for ``--force`` like ``datasel run``.
    """
    run_dir = RunDir(cfg.run_dir)
    for phase in PHASES:
        try:
            run_dir.check_phase(cfg, phase)
        except ManifestMismatch as err:
            run_dir.root.delete()
            return f"'{err.phase}' was made with {err.key}={err.recorded!r}, the config now says {err.current!r}"
    return None


def estimate_run_seconds(cfg: RunConfig, num_samples: int, probe_samples: int = 8) -> dict:
    """Time the reference model on ``probe_samples`` clean generated samples and extrapolate to the run.

    Timed: one no-grad feature pass over the probe batch (after one untimed pass) and one forward + backward
    of the answer loss with every parameter trainable (an upper bound of the LoRA warm-up step and of one TIVE
    per-sample gradient). Estimate: extract ``N * t_features / B``; with TIVE, warm-up ``warmup_fraction * N *
    epochs * t_backward / B`` and gradients ``N * t_backward / B`` (the projection of the gradients is not
    timed); plus ``overhead_s`` for Ray start-up and the other phases. Returns the seconds per part and
    ``total_s``. Building a model that is not cached yet is not included.
    """
    from datasel_ray.models.vlm import ReferenceVLM
    from datasel_ray.synthetic import plan_rows

    vlm = ReferenceVLM.load(cfg.model, device="cpu")
    synth = SynthConfig(num_samples=probe_samples, seed=derive_seed(cfg.seed, "demo", "probe"), duplicate_rate=0.0,
                        noise_rate=0.0, bad_rate=0.0)
    prepared = []
    for row in plan_rows(synth):
        image = row.sample.render(synth.image_size) if row.sample.picture is not None else None
        prepared.append(vlm.processor.prepare(row.sample.conversations(), image))
    vlm.forward_features(prepared)
    started = time.perf_counter()
    vlm.forward_features(prepared)
    t_features = time.perf_counter() - started
    batch = vlm.collate(prepared)
    dtype = next(vlm.model.parameters()).dtype
    started = time.perf_counter()
    out = vlm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    **batch.image_kwargs("cpu", dtype), labels=batch.labels, use_cache=False)
    out.loss.backward()
    t_backward = time.perf_counter() - started
    vlm.model.zero_grad(set_to_none=True)
    per = len(prepared)
    parts = {"extract_s": num_samples * t_features / per, "overhead_s": 60.0}
    if cfg.tive.enabled:
        parts["warmup_s"] = cfg.tive.warmup_fraction * num_samples * cfg.tive.epochs * t_backward / per
        parts["tive_gradients_s"] = num_samples * t_backward / per
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total_s"] = round(sum(parts.values()), 1)
    parts["probe"] = {"samples": per, "features_s": round(t_features, 3), "forward_backward_s": round(t_backward, 3)}
    return parts


def run_demo(workdir: Path, num_samples: int = 600, seed: int = 0, tive: bool = True,
             model: str = TINY_MODEL) -> dict:
    from datasel_ray.pipeline.runner import run_phases

    workdir = Path(workdir)
    pool_dir = workdir / "pool"
    info = generate_pool(pool_dir, SynthConfig(num_samples=num_samples, seed=seed))
    cfg = demo_config(workdir, info.pool_path, tive, seed, model=model)
    if model != TINY_MODEL:
        estimate = estimate_run_seconds(cfg, num_samples)
        parts = ", ".join(f"{k.removesuffix('_s')} {v / 60:.1f}" for k, v in estimate.items()
                          if k.endswith("_s") and k != "total_s")
        print(f"demo: reference model {model}, {num_samples} samples: estimated run time "
              f"{estimate['total_s'] / 60:.0f} min ({parts} min; from a timed probe of "
              f"{estimate['probe']['samples']} samples)", flush=True)
    stale = reset_stale_run(cfg)
    if stale:
        print(f"demo: starting the run afresh; the previous one no longer matches ({stale})")
    results = run_phases(cfg)
    summary = summarize(cfg, results, info.ground_truth_path)
    (workdir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render_summary(summary))
    return summary


def summarize(cfg: RunConfig, results: dict, ground_truth_path: Path) -> dict:
    run_dir = RunDir(cfg.run_dir)
    manifest = run_dir.load_manifest()
    ingest = manifest["phases"]["ingest"]["result"]
    extract = manifest["phases"].get("extract", {}).get("result", {})
    summary = {
        "run_dir": cfg.run_dir,
        "model": cfg.model.name_or_path,
        "model_identity": model_identity(cfg.model.name_or_path, cfg.model.revision),
        "rows_in": ingest["rows_in"],
        "samples": ingest["samples"],
        "quarantined_by_reason": ingest["by_reason"],
        "features_written": extract.get("features"),
        "extract_failed": extract.get("failed"),
        "seconds_per_phase": {p: e.get("seconds") for p, e in manifest["phases"].items()},
        "dedup": {k: v for k, v in manifest["phases"].get("dedup", {}).get("result", {}).items()
                  if k in ("rows", "kept", "dropped_exact", "dropped_semantic", "groups", "feature")},
        "selections": {},
    }
    ground_truth = load_ground_truth(ground_truth_path)
    summary["pool_quality"] = pool_quality(ground_truth)
    pool_tasks = set(summary["pool_quality"]["task_counts"])
    for method in cfg.select.methods:
        ids_path = run_dir / "selections" / method / "selected_ids.npy"
        if ids_path.exists():
            summary["selections"][method] = selection_quality(ids_path.read_npy(), ground_truth, pool_tasks)
    row_ids = load_features(run_dir, [])[schema.ROW_ID]
    budget = cfg.select.budget_rows(len(row_ids))
    seed = derive_seed(cfg.seed, "demo")
    summary["random_expectation"] = random_expectation(row_ids, budget, ground_truth, pool_tasks, seed=seed)
    for method, quality in summary["selections"].items():
        quality["random_same_task_mix"] = random_expectation(
            row_ids, budget, ground_truth, pool_tasks, seed=seed, task_counts=quality["task_counts"])
    return summary


def render_summary(summary: dict) -> str:
    lines = [f"run directory: {summary['run_dir']}",
             f"model: {summary['model']} ({summary['model_identity']}; selections repeat bit for bit only on the "
             f"same machine with the same model build)",
             f"rows in: {summary['rows_in']}  samples: {summary['samples']}  "
             f"quarantined: {sum(summary['quarantined_by_reason'].values())}"]
    for reason, count in summary["quarantined_by_reason"].items():
        lines.append(f"  quarantined {reason:<18} {count}")
    lines.append(f"features written: {summary['features_written']}  (extract failures: {summary['extract_failed']})")
    lines.append("seconds per phase: " + ", ".join(f"{p} {s:.1f}" for p, s in summary["seconds_per_phase"].items()
                                                 if s is not None))
    dedup = summary.get("dedup")
    if dedup:
        lines.append(f"dedup ({dedup.get('feature', 'exact only')}): kept {dedup['kept']} of {dedup['rows']} rows, "
                     f"dropped {dedup['dropped_exact']} exact and {dedup['dropped_semantic']} near duplicates in "
                     f"{dedup['groups']} groups")
    pool = summary["pool_quality"]
    header = (f"{'selection':<14}{'rows':>6}{'dup rate':>10}{'noise':>8}{'coverage':>10}"
              f"   random with the same task mix: dup rate")
    lines += [header, f"{'(pool)':<14}{pool['selected']:>6}{pool['duplicate_rate']:>10.3f}{pool['noise_rate']:>8.3f}"
                      f"{pool['task_coverage']:>10.2f}"]
    for method, q in summary["selections"].items():
        matched = q.get("random_same_task_mix")
        tail = (f"   {matched['duplicate_rate']['mean']:.3f} +- {matched['duplicate_rate']['std']:.3f}"
                if matched else "")
        lines.append(f"{method:<14}{q['selected']:>6}{q['duplicate_rate']:>10.3f}{q['noise_rate']:>8.3f}"
                     f"{q['task_coverage']:>10.2f}{tail}")
    expected = summary.get("random_expectation")
    if expected:
        lines.append(f"random, mean +- std of {expected['draws']} draws: dup rate "
                     f"{expected['duplicate_rate']['mean']:.3f} +- {expected['duplicate_rate']['std']:.3f}, noise "
                     f"{expected['noise_rate']['mean']:.3f} +- {expected['noise_rate']['std']:.3f}")
    return "\n".join(lines)
