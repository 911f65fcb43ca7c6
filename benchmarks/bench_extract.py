"""Extraction throughput: the Ray pipeline (1 and 2 actors) vs a bare single-process loop, in one run.

All arms process the same ingested samples with the same model, the same micro-batches (``extract.batch_size``)
and the same shard layout, model loading included. The bare loop runs the two stages
(:class:`~datasel_ray.features.extractor.Preprocessor`, :class:`~datasel_ray.features.extractor.FeatureExtractor`)
in the driver with ``torch.set_num_threads(1)``, which is what one Ray actor with ``num_cpus=1`` gets
(Ray sets OMP_NUM_THREADS from num_cpus). Headline: ``ratio_1_actor`` = Ray samples/s ÷ bare samples/s
(target ≥ 0.9). With 2 actors on a 2-CPU machine each actor gets 0.5 CPU so that preprocessing tasks can run.

Usage: ``python benchmarks/bench_extract.py [--num-samples 2000] [--quick]``; prints one JSON record and appends
it to ``benchmarks/results/bench_extract.jsonl``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import emit_record  # noqa: E402


def bare_loop(cfg, run_dir) -> float:
    """Seconds for preprocess + model over every shard, in this process, one torch thread."""
    import pickle

    import torch

    from datasel_ray.pipeline.extract import ShardExtractStage, ShardPreprocessStage, plan_shards

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        pre = ShardPreprocessStage(cfg.model.model_dump())
        ext = ShardExtractStage(cfg.model.model_dump(), str(run_dir), cfg.extract.batch_size)
        for shard in plan_shards(run_dir, cfg.extract.shard_rows):
            batch = {k: [v] for k, v in shard.items()}
            packed = pre(batch)
            ext.process(shard["shard_id"], pickle.loads(packed["payload"][0]))
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def ray_pipeline(cfg, run_dir, actors: int) -> float:
    from datasel_ray.pipeline.extract import run_extract

    cfg = cfg.model_copy(update={"extract": cfg.extract.model_copy(update={
        "min_actors": actors, "max_actors": actors, "num_cpus_per_actor": 1.0 if actors == 1 else 0.5})})
    started = time.perf_counter()
    run_extract(cfg, run_dir, quiet=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-samples", type=int, default=2000,
                        help="enough rows that actor start-up (model load) is amortised as in real pools")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="120 samples")
    args = parser.parse_args()
    n = 120 if args.quick else args.num_samples

    from datasel_ray.demo import demo_config
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.models.tiny import resolve_model_path
    from datasel_ray.pipeline import ray_adapter
    from datasel_ray.pipeline.ingest import run_ingest
    from datasel_ray.synthetic import SynthConfig, generate_pool

    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    resolve_model_path("tiny")
    info = generate_pool(work / "pool", SynthConfig(num_samples=n, seed=0, bad_rate=0.0))
    cfg = demo_config(work, info.pool_path, tive=False)
    cfg.extract.batch_size = args.batch_size
    cfg.extract.shard_rows = args.shard_rows
    ray_adapter.ensure_ray(cfg.ray)
    base = RunDir(str(work / "base"))
    base.init(cfg)
    rows = run_ingest(cfg, base, quiet=True)["samples"]

    def fresh(name: str) -> RunDir:
        target = work / name
        shutil.copytree(work / "base", target)
        return RunDir(str(target))

    seconds = {"bare_loop": bare_loop(cfg, fresh("bare"))}
    seconds["ray_1_actor"] = ray_pipeline(cfg, fresh("ray1"), 1)
    seconds["ray_2_actors"] = ray_pipeline(cfg, fresh("ray2"), 2)
    rate = {k: rows / v for k, v in seconds.items()}
    metrics = {
        "rows": rows,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "samples_per_second": {k: round(v, 2) for k, v in rate.items()},
        "ratio_1_actor": round(rate["ray_1_actor"] / rate["bare_loop"], 3),
        "ratio_2_actors": round(rate["ray_2_actors"] / rate["bare_loop"], 3),
        "target_ratio_1_actor": 0.9,
    }
    params = {"num_samples": n, "batch_size": args.batch_size, "shard_rows": args.shard_rows, "model": "tiny",
              "bare_loop_torch_threads": 1, "cpus": 2}
    emit_record("bench_extract", params, metrics)
    ray_adapter.shutdown_ray()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
