"""Peak memory and time of the dedup phase at the real dimensions of ``bench_select`` (``--dims real``: hidden 2,048,
5 hooked layers, COINCIDE 20,480-d fp16) on generated stores of growing size.

For each size a generated store (``features/`` with ``coincide_vector`` and ``last_token`` only, chunk by chunk,
cached under ``--cache``) goes through :func:`datasel_ray.pipeline.dedup.run_dedup` in a fresh subprocess with the
in-process executor (every task runs in that one process, so its peak RSS, ``ru_maxrss``, is the peak of every
process of the phase; stores are generated in separate subprocesses, which ``ru_maxrss`` does not see), the semantic pass only (``dedup.exact: false``: generated stores have no images or turns).
Reported: peak RSS, its growth from the smallest to the largest size, seconds. Targets of issue #26: at most 4 GB
per process, at most 10% growth from 100k to 300k rows, 300k rows within 20 minutes.

    python benchmarks/bench_dedup_memory.py --sizes 100000,300000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

REAL = {"hidden": 2048, "n_layers": 5}
COLUMNS = ["coincide_vector", "last_token"]


def ensure_store(n: int, seed: int, cache: Path) -> Path:
    """The cached store of ``n`` rows, generated in a subprocess of its own: ``ru_maxrss`` carries over ``execve``,
    so a worker started by a parent that had generated a store in memory would report the parent's peak."""
    d = cache / f"dedup-store-{n}-{seed}"
    if not (d / "done").exists():
        subprocess.run([sys.executable, __file__, "--generate", str(d), "--rows", str(n), "--seed", str(seed)],
                       check=True)
    return d


def generate(d: Path, n: int, seed: int) -> None:
    from feature_store_gen import StoreSpec, write_store

    shutil.rmtree(d, ignore_errors=True)
    chunk = max(1024, (256 << 20) // (REAL["n_layers"] * 2 * REAL["hidden"] * 4))
    write_store(d, StoreSpec(n_rows=n, seed=seed, n_tasks=20, chunk_rows=chunk, **REAL), columns=COLUMNS,
                shard_rows=4096)
    (d / "done").write_text("ok")


def worker(run_dir: str, overrides: str) -> None:
    from datasel_ray.config import load_config
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline.dedup import run_dedup

    shutil.rmtree(Path(run_dir) / "dedup", ignore_errors=True)
    from datasel_ray.config import merge_dicts

    cfg = load_config(overrides=merge_dicts({"run_dir": run_dir, "aggregate": {"executor": "local"},
                                             "dedup": {"exact": False}}, json.loads(overrides)))
    t0 = time.monotonic()
    res = run_dedup(cfg, RunDir(run_dir), quiet=True)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "dropped": res["dropped"], "clusters": res["clusters"], "buckets": res["buckets"],
                      "largest_cluster": res["largest_cluster"]}))


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,300000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature", default="coincide_visual")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bench_dedup_memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.generate:
        generate(args.generate, args.rows, args.seed)
        return None
    if args.worker:
        worker(args.worker, args.overrides)
        return None
    from record import emit_record

    args.cache.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    per_size = {}
    for n in sizes:
        t0 = time.monotonic()
        store = ensure_store(n, args.seed, args.cache)
        gen_s = round(time.monotonic() - t0, 1)
        out = subprocess.run([sys.executable, __file__, "--worker", str(store), "--overrides",
                              json.dumps({"dedup": {"feature": args.feature}})],
                             capture_output=True, text=True, check=True)
        per_size[str(n)] = {**json.loads(out.stdout.strip().splitlines()[-1]), "store_seconds": gen_s}
    first, last = per_size[str(sizes[0])], per_size[str(sizes[-1])]
    growth = (last["peak_rss_mb"] - first["peak_rss_mb"]) / first["peak_rss_mb"]
    metrics = {"per_size": per_size, "peak_rss_growth": round(growth, 4),
               "max_peak_rss_mb": max(v["peak_rss_mb"] for v in per_size.values()),
               "targets": {"peak_rss_mb_max": 4096, "growth_max": 0.10, "seconds_at_300k_max": 1200}}
    return emit_record("bench_dedup_memory", {"sizes": sizes, "dims": REAL, "feature": args.feature,
                                              "executor": "local", "exact": False}, metrics,
                       save=not args.no_record)


if __name__ == "__main__":
    main()
