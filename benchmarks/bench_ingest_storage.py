"""Ingest of a pool on object storage: image checks one after another against ``pool.io_threads`` at a time.

The ingest phase decode-checks every image (``pool.check_images``); on object storage each check is a round trip.
This benchmark generates a pool (default 2,000 rows), uploads pool and images to moto's S3 server on 127.0.0.1
(``tests/cluster/cluster_helpers.start_s3_server``), and runs the ingest phase in this process (``pool.executor:
local``, the whole pool one block of ``records_per_block``) with the run directory on the same server, once per
``io_threads`` value, side by side in one run; a local-disk ingest of the same pool is the reference. Every run
must give the same samples and quarantine (row ids and reasons). Prints one JSON record and appends it to
``benchmarks/results/bench_ingest_storage.jsonl``.

    python benchmarks/bench_ingest_storage.py [--rows 2000] [--threads 1 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "cluster"))
sys.path.insert(0, str(HERE))

from cluster_helpers import start_s3_server  # noqa: E402
from record import emit_record  # noqa: E402


def _ingest(pool_path: str, image_root: str, run_dir: str, threads: int) -> tuple[float, dict, tuple]:
    """Seconds, counts and (sample row ids, quarantine (row id, reason) pairs) of one in-process ingest."""
    from datasel_ray import schema
    from datasel_ray.config import RunConfig
    from datasel_ray.demo import demo_config
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline.feature_store import load_table
    from datasel_ray.pipeline.ingest import run_ingest

    base = demo_config(Path("/unused"), Path(pool_path), tive=False).model_dump()
    base["run_dir"] = run_dir
    base["pool"].update(path=pool_path, image_root=image_root, executor="local", io_threads=threads,
                        records_per_block=1_000_000)
    cfg = RunConfig.model_validate(base)
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    started = time.perf_counter()
    counts = run_ingest(cfg, rd, quiet=True)
    seconds = time.perf_counter() - started
    samples = load_table(rd, "samples").column(schema.ROW_ID).to_pylist()
    quarantine = load_table(rd, "quarantine/ingest").select([schema.ROW_ID, schema.REASON]).to_pylist()
    return seconds, counts, (sorted(samples), sorted((q[schema.ROW_ID], q[schema.REASON]) for q in quarantine))


def run(args) -> dict:
    from datasel_ray.io.storage import clear_filesystem_cache
    from datasel_ray.synthetic import SynthConfig, generate_pool

    work = Path(tempfile.mkdtemp(prefix="dsi", dir="/tmp"))
    info = generate_pool(work / "pool", SynthConfig(num_samples=args.rows, seed=3, bad_rate=0.04))
    metrics: dict = {}
    local_s, counts, reference = _ingest(str(info.pool_path), str(info.image_root), str(work / "run-local"),
                                         max(args.threads))
    metrics["local_disk"] = {"io_threads": max(args.threads), "seconds": round(local_s, 2),
                             "samples": counts["samples"], "quarantined": counts["quarantined"]}
    s3 = start_s3_server(work / "moto.log")
    saved = {k: os.environ.get(k) for k in s3.env}
    try:
        os.environ.update(s3.env)
        clear_filesystem_cache()
        s3.upload_dir(info.image_root, "s3://pools/gen")
        s3.create_bucket("runs")
        runs = {}
        for threads in args.threads:
            seconds, counts, rows = _ingest("s3://pools/gen/pool.json", "s3://pools/gen", f"s3://runs/t{threads}",
                                            threads)
            runs[str(threads)] = {"seconds": round(seconds, 2), "same_rows_as_local": rows == reference}
        metrics["s3"] = runs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    lo, hi = str(min(args.threads)), str(max(args.threads))
    metrics["speedup_threads"] = round(runs[lo]["seconds"] / runs[hi]["seconds"], 2)
    metrics["s3_over_local"] = round(runs[hi]["seconds"] / local_s, 2)
    metrics["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    metrics = run(args)
    emit_record("bench_ingest_storage", {"rows": args.rows, "threads": args.threads}, metrics,
                save=not args.no_save)
    ok = all(r["same_rows_as_local"] for r in metrics["s3"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
