"""Extraction throughput: the Ray pipeline with the default extraction settings vs a bare loop using every CPU.

All arms process the same ingested samples with the same model, the same micro-batches and the same shard
layout (``ExtractConfig()`` defaults unless overridden on the command line), model loading included. The bare
loop runs the two stages (:class:`~datasel_ray.pipeline.extract.ShardPreprocessStage`,
:class:`~datasel_ray.pipeline.extract.ShardExtractStage`) one after the other in this process, with torch using
every CPU this process may run on (``os.sched_getaffinity``) and, beside it, with one torch thread. The Ray arm is
``run_extract`` on a local Ray holding the same CPUs.

Two rates per arm: ``end_to_end`` (rows / wall time of the whole call, start-up included) and ``steady`` (rows
after the first shard / time from the first shard's feature file to the last one's, from the files' mtimes: the
rate a pool of 665k rows sees, where start-up is amortised). Headline: ``ratio_steady`` = Ray steady ÷ bare loop
(every CPU) steady, target >= 0.95; ``ratio_end_to_end`` beside it.

The machine's load average is recorded before and after: the arms are only comparable on an otherwise idle machine.

Usage: ``python benchmarks/bench_extract.py [--num-samples 3000] [--quick] [--set extract.batch_size=16]``; prints
one JSON record and appends it to ``benchmarks/results/bench_extract.jsonl`` (``--no-save``: print only).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import emit_record, machine_cpus  # noqa: E402


def _steady(run_dir, shards: list[dict]) -> float:
    """Rows per second between the first and the last written feature shard (mtimes)."""
    from datasel_ray.pipeline.extract import feature_shard_path

    done = sorted((Path(str(feature_shard_path(run_dir, s["shard_id"]))).stat().st_mtime_ns, s["count"])
                  for s in shards)
    if len(done) < 2:
        return float("nan")
    seconds = (done[-1][0] - done[0][0]) / 1e9
    return sum(count for _, count in done[1:]) / seconds if seconds > 0 else float("nan")


def bare_loop(cfg, run_dir, threads: int) -> tuple[float, float]:
    """(end-to-end s, steady rows/s) of preprocess + model over every shard in this process, ``threads`` torch
    threads."""
    import torch

    from datasel_ray.pipeline.extract import ShardExtractStage, ShardPreprocessStage, plan_shards

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        pre = ShardPreprocessStage(cfg.model.model_dump())
        ext = ShardExtractStage(cfg.model.model_dump(), str(run_dir), cfg.extract.batch_size)
        shards = plan_shards(run_dir, cfg.extract.shard_rows)
        for shard in shards:
            packed = pre({k: [v] for k, v in shard.items()})
            ext.process(shard["shard_id"], pickle.loads(packed["payload"][0]))
        return time.perf_counter() - started, _steady(run_dir, shards)
    finally:
        torch.set_num_threads(previous)


def ray_pipeline(cfg, run_dir) -> tuple[float, float, dict]:
    from datasel_ray.pipeline.extract import plan_shards, run_extract

    shards = plan_shards(run_dir, cfg.extract.shard_rows)
    started = time.perf_counter()
    result = run_extract(cfg, run_dir, quiet=True)
    return time.perf_counter() - started, _steady(run_dir, shards), result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=3000,
                        help="rows; enough shards of the default size for a steady-state rate")
    parser.add_argument("--set", action="append", default=[], metavar="extract.KEY=VALUE",
                        help="override an extract or model setting, e.g. extract.batch_size=16")
    parser.add_argument("--quick", action="store_true", help="600 samples")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    n = 600 if args.quick else args.num_samples

    import torch

    from datasel_ray.cli import _parse_set
    from datasel_ray.config import ExtractConfig, ModelConfig, RayConfig, merge_dicts
    from datasel_ray.demo import demo_config
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.models.tiny import resolve_model_path
    from datasel_ray.pipeline import ray_adapter
    from datasel_ray.pipeline.ingest import run_ingest
    from datasel_ray.synthetic import SynthConfig, generate_pool

    cpus = machine_cpus()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    resolve_model_path("tiny")
    info = generate_pool(work / "pool", SynthConfig(num_samples=n, seed=0, bad_rate=0.0))
    demo = demo_config(work, info.pool_path, tive=False)
    overrides = merge_dicts({"extract": ExtractConfig().model_dump(), "model": demo.model.model_dump(),
                             "ray": RayConfig(num_cpus=cpus).model_dump()}, _parse_set(args.set))
    cfg = demo.model_copy(update={"extract": ExtractConfig.model_validate(overrides["extract"]),
                                  "model": ModelConfig.model_validate(overrides["model"]),
                                  "ray": RayConfig.model_validate(overrides["ray"])})
    ray_adapter.ensure_ray(cfg.ray)
    base = RunDir(str(work / "base"))
    base.init(cfg)
    rows = run_ingest(cfg, base, quiet=True)["samples"]

    def fresh(name: str) -> RunDir:
        target = work / name
        shutil.copytree(work / "base", target)
        return RunDir(str(target))

    seconds, steady = {}, {}
    seconds["bare_loop_all_cpus"], steady["bare_loop_all_cpus"] = bare_loop(cfg, fresh("bare_all"), cpus)
    seconds["bare_loop_1_thread"], steady["bare_loop_1_thread"] = bare_loop(cfg, fresh("bare_1"), 1)
    seconds["ray_default"], steady["ray_default"], result = ray_pipeline(cfg, fresh("ray"))
    ray_adapter.shutdown_ray()
    load_after = os.getloadavg()
    end_to_end = {k: rows / v for k, v in seconds.items()}
    metrics = {
        "rows": rows,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "samples_per_second_end_to_end": {k: round(v, 2) for k, v in end_to_end.items()},
        "samples_per_second_steady": {k: round(v, 2) for k, v in steady.items()},
        "ratio_steady": round(steady["ray_default"] / steady["bare_loop_all_cpus"], 3),
        "ratio_end_to_end": round(end_to_end["ray_default"] / end_to_end["bare_loop_all_cpus"], 3),
        "ratio_steady_vs_1_thread": round(steady["ray_default"] / steady["bare_loop_1_thread"], 3),
        "target_ratio_steady": 0.95,
        "ray_num_gpus_per_actor": result["num_gpus_per_actor"],
        "load_average_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
    }
    params = {"num_samples": n, "model": cfg.model.name_or_path, "extract": cfg.extract.model_dump(),
              "max_padding": cfg.model.max_padding, "ray_num_cpus": cfg.ray.num_cpus,
              "bare_loop_torch_threads": {"bare_loop_all_cpus": cpus, "bare_loop_1_thread": 1},
              "torch_version": torch.__version__}
    record = emit_record("bench_extract", params, metrics, save=not args.no_save)
    shutil.rmtree(work, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
