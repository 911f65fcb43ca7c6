"""Aggregate + select benchmark per method on generated feature stores, run as the partitioned pipeline.

For every (size, method) a fresh subprocess runs the real phases (``run_aggregate`` + ``run_select`` with
``select.methods = [method]``) on a generated store written to disk (``feature_store_gen.write_store``, chunk
by chunk, cached per spec). The parent samples the RSS of every process of the subprocess's tree (the driver
and each Ray worker) and reports each one's peak.

Store dims come from the spec: ``--dims tiny`` (the tiny reference model: hidden 128, 4 layers, proj_dim 512)
or ``--dims real`` (a 2B reference model: hidden 2,048, 5 layers -> COINCIDE 20,480-d fp16, last-token 2,048-d,
proj_dim 8,192); ``--hidden/--n-layers/--proj-dim`` override either. Method settings come from the config
objects (``--set coincide.reduce_dim=256`` etc.; real dims default to ``reduce_dim`` 256 with the random
projection and ``train_sample`` 20,000, the settings wide vectors need).

Targets (issue 13): peak RSS of every process <= 4 GiB and growing <= 10% between the smallest and largest size;
time growth exponent (least-squares slope of log seconds of aggregate + select, without Ray's start-up, vs log
rows) <= 1.15; the largest size (whole cell: subprocess, Ray start-up, both phases) within
``--target-minutes`` per method. Prints one JSON record and appends it to ``benchmarks/results/bench_select.jsonl``
(``benchmarks/record.py``). A method that fails makes the run fail: the error is in the record and the exit code
is non-zero.

    python benchmarks/bench_select.py --dims real --sizes 100000,300000 [--methods coincide,datatailor,tive]
    python benchmarks/bench_select.py --dims tiny --sizes 1000000 --target-minutes 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

DIMS = {"tiny": {"hidden": 128, "n_layers": 4, "proj_dim": 512},
        "real": {"hidden": 2048, "n_layers": 5, "proj_dim": 8192}}
REAL_DIMS_SETTINGS = {"coincide.reduce_dim": 256, "coincide.reduce_method": "random",
                      "coincide.train_sample": 20000}
BASE_COLUMNS = ("tau", "informativeness", "n_turns", "n_image_tokens", "n_text_tokens", "n_answer_tokens",
                "answer_loss", "last_token")
RSS_TARGET_MB = 4096.0
RSS_GROWTH_TARGET = 0.10
EXPONENT_TARGET = 1.15


def store_spec(n: int, args) -> "StoreSpec":  # noqa: F821
    from feature_store_gen import StoreSpec

    dims = {**DIMS[args.dims], **{k: getattr(args, k) for k in ("hidden", "n_layers", "proj_dim")
                                  if getattr(args, k) is not None}}
    chunk = max(1024, min(65536, (256 << 20) // (dims["n_layers"] * 2 * dims["hidden"] * 4)))
    return StoreSpec(n_rows=n, seed=args.seed, n_tasks=args.n_tasks, chunk_rows=chunk, **dims)


def ensure_store(spec, methods: list[str], cache: Path) -> Path:
    from feature_store_gen import STORE_LAYOUT, write_store

    import hashlib

    from datasel_ray.methods.registry import get_method

    columns = sorted(set(BASE_COLUMNS).union(*(get_method(m).columns for m in methods)))
    described = {"spec": spec.as_dict(), "columns": columns, "layout": STORE_LAYOUT}
    key = json.dumps(described, sort_keys=True)
    d = cache / f"store-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    marker = d / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == described:
        return d
    shutil.rmtree(d, ignore_errors=True)
    write_store(d, spec, columns, shard_rows=args_shard_rows(spec))
    marker.write_text(json.dumps(described))
    return d


def args_shard_rows(spec) -> int:
    """Rows per feature shard: the extract phase's default (256) scaled so a shard stays near 8 MiB."""
    row_bytes = spec.coincide_dim * 2 + spec.proj_dim * 4
    return max(256, min(8192, (8 << 20) // row_bytes))


# --------------------------------------------------------------------------------------------- the worker
def worker(store: Path, method: str, overrides: dict, out: Path) -> None:
    from datasel_ray.config import load_config
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline import ray_adapter
    from datasel_ray.pipeline.aggregate import run_aggregate
    from datasel_ray.pipeline.select import run_select

    run = Path(tempfile.mkdtemp(prefix="bench-select-run-"))
    for sub in ("features", "samples"):
        (run / sub).symlink_to(store / sub)
    nested: dict = {}
    for key, value in {"run_dir": str(run), "select.methods": [method], "tive.enabled": method == "tive",
                       **overrides}.items():
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    cfg = load_config(None, nested)
    ray_adapter.ensure_ray(cfg.ray)
    RunDir(str(run)).init(cfg)
    t0 = time.monotonic()
    agg = run_aggregate(cfg, RunDir(str(run)), quiet=True)
    t1 = time.monotonic()
    sel = run_select(cfg, RunDir(str(run)), quiet=True)
    t2 = time.monotonic()
    state = serve_state_memory(run, method)
    out.write_text(json.dumps({"aggregate_seconds": t1 - t0, "select_seconds": t2 - t1, "aggregate": agg,
                               "select": sel, "serve_state": state, "config": cfg.model_dump(mode="json", include={
                                   "coincide", "datatailor", "tive", "aggregate", "select"})}, default=str))
    ray_adapter.shutdown_ray()
    shutil.rmtree(run, ignore_errors=True)


def serve_state_memory(run: Path, method: str, samples: int = 256) -> dict | None:
    """RSS a serve replica adds for the run's frozen state of ``method``: load it and score ``samples`` pool rows
    through ``score_new`` (filling the member cache), in a fresh subprocess (so the phases' memory is not
    counted). The replica's model is the same for every run and is not loaded."""
    from datasel_ray.methods.registry import get_method

    if not type(get_method(method)).scored:
        return None
    code = f"""
import json, resource, sys, psutil, numpy as np
from types import SimpleNamespace
sys.path.insert(0, {str(ROOT)!r})
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.store import FeatureStore, read_shard
rss0 = psutil.Process().memory_info().rss
from datasel_ray.scoring.state import RunStats
stats = RunStats.load(RunDir({str(run)!r}))
rss_loaded = psutil.Process().memory_info().rss
state = stats.states[{method!r}]
store = FeatureStore(RunDir({str(run)!r}) / "features")
columns = sorted(set({list(get_method(method).columns)!r}) | {{"task", "n_turns"}})
done = 0
for path in store.files[::max(1, len(store.files) // 16)]:
    cols = read_shard(path, columns)
    for i in range(min(16, len(cols["row_id"]))):
        sample = SimpleNamespace(task=str(cols["task"][i]), n_turns=int(cols["n_turns"][i]))
        state.score_new({{name: values[i] for name, values in cols.items()}}, sample)
        done += 1
    if done >= {samples}:
        break
rss1 = psutil.Process().memory_info().rss
print(json.dumps({{"state_rss_mb": (rss_loaded - rss0) / 2**20, "state_and_cache_rss_mb": (rss1 - rss0) / 2**20,
                  "scored": done, "cache_rows": stats.cache.rows}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class TreeSampler(threading.Thread):
    """Peak RSS of every process in a process tree (psutil), sampled every ``interval`` seconds. Each peak keeps
    the process's command line and the seconds since the sampler started, both read when the peak was reached:
    Ray retitles a worker to the task it runs (``ray::fn``), so the title at the peak names the step."""

    def __init__(self, pid: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, tuple[str, float, float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        started = time.monotonic()
        root = psutil.Process(self.pid)
        procs: dict[int, psutil.Process] = {}
        while not self.stop.is_set():
            try:
                for child in [root, *root.children(recursive=True)]:
                    procs.setdefault(child.pid, child)
            except psutil.Error:
                break
            for pid, p in list(procs.items()):
                try:
                    rss = p.memory_info().rss / 2**20
                    previous = self.peaks.get(pid)
                    # the sampler's own cost: a command line is read only when a peak grows by more than 2%
                    if previous is None or rss > previous[1] * 1.02:
                        name = " ".join(p.cmdline()[:3])[-80:] or p.name()
                        self.peaks[pid] = (name, rss, round(time.monotonic() - started, 1))
                    elif rss > previous[1]:
                        self.peaks[pid] = (previous[0], rss, round(time.monotonic() - started, 1))
                except psutil.Error:
                    procs.pop(pid, None)
            time.sleep(self.interval)


def run_cell(store: Path, method: str, overrides: dict, timeout: float) -> dict:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(store), "--method", method,
           "--overrides", json.dumps(overrides), "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    sampler.stop.set()
    sampler.join()
    seconds = time.monotonic() - started
    peaks = sorted(sampler.peaks.values(), key=lambda t: -t[1])
    driver = sampler.peaks.get(proc.pid, ("", 0.0, 0.0))[1]
    cell = {"method": method, "seconds": round(seconds, 2), "exit": proc.returncode,
            "driver_peak_rss_mb": round(driver, 1),
            "max_process_peak_rss_mb": round(max((p[1] for p in peaks), default=0.0), 1),
            "max_other_process_peak_rss_mb": round(max((r for pid, (_, r, _) in sampler.peaks.items()
                                                        if pid != proc.pid), default=0.0), 1),
            "top_processes": [{"process": n, "peak_rss_mb": round(r, 1), "peak_at_s": at}
                              for n, r, at in peaks[:6]]}
    if proc.returncode != 0 or not out.exists() or not out.read_text():
        cell["error"] = log[-4000:]
    else:
        cell.update(json.loads(out.read_text()))
    out.unlink(missing_ok=True)
    return cell


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else None


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=Path)
    ap.add_argument("--method")
    ap.add_argument("--overrides", default="{}")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--n-layers", dest="n_layers", type=int)
    ap.add_argument("--proj-dim", dest="proj_dim", type=int)
    ap.add_argument("--n-tasks", dest="n_tasks", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="100000,300000")
    ap.add_argument("--methods", default="coincide,datatailor,tive")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--target-minutes", type=float, default=20.0)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BENCH_SELECT_CACHE",
                                                                       Path(tempfile.gettempdir()) / "bench_select")))
    ap.add_argument("--keep-stores", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.method, json.loads(args.overrides), args.out)
        return 0

    from record import emit_record

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    overrides = dict(REAL_DIMS_SETTINGS) if args.dims == "real" else {}
    overrides.update({k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    args.cache.mkdir(parents=True, exist_ok=True)
    cells, stores = [], {}
    for n in sizes:
        spec = store_spec(n, args)
        t0 = time.monotonic()
        store = ensure_store(spec, methods, args.cache)
        stores[n] = {"spec": spec.as_dict(), "shard_rows": args_shard_rows(spec),
                     "write_seconds": round(time.monotonic() - t0, 1)}
        for method in methods:
            cell = run_cell(store, method, overrides, timeout=args.target_minutes * 60 * 3)
            cell["rows"] = n
            cells.append(cell)
            print(json.dumps({k: cell.get(k) for k in ("rows", "method", "seconds", "driver_peak_rss_mb",
                                                        "max_process_peak_rss_mb", "exit")}), file=sys.stderr)
        if not args.keep_stores and n != sizes[-1]:
            shutil.rmtree(store, ignore_errors=True)
    per_method = {}
    for method in methods:
        mine = [c for c in cells if c["method"] == method and "error" not in c]
        rss = [c["max_process_peak_rss_mb"] for c in mine]
        largest = max(mine, key=lambda c: c["rows"]) if mine else None
        phase = [c["aggregate_seconds"] + c["select_seconds"] for c in mine]
        per_method[method] = {
            "time_exponent": slope([c["rows"] for c in mine], phase),
            "phase_seconds": phase,
            "rss_growth": (rss[-1] / rss[0] - 1.0) if len(rss) > 1 and rss[0] else None,
            "largest_rows_seconds": largest["seconds"] if largest else None,
            "max_process_peak_rss_mb": max(rss) if rss else None,
        }
        pm = per_method[method]
        pm["targets"] = {
            "rss_le_4gib": pm["max_process_peak_rss_mb"] is not None and pm["max_process_peak_rss_mb"] <= RSS_TARGET_MB,
            "largest_within_target_minutes": pm["largest_rows_seconds"] is not None
            and pm["largest_rows_seconds"] <= args.target_minutes * 60}
        if pm["rss_growth"] is not None:  # growth and exponent need two sizes: with one they are not measured
            pm["targets"]["rss_growth_le_10pct"] = pm["rss_growth"] <= RSS_GROWTH_TARGET
        if pm["time_exponent"] is not None:
            pm["targets"]["exponent_le_1_15"] = pm["time_exponent"] <= EXPONENT_TARGET
    failed = [c for c in cells if "error" in c]
    params = {"dims": args.dims, "stores": stores, "methods": methods, "overrides": overrides,
              "target_minutes": args.target_minutes, "cpus": os.cpu_count()}
    metrics = {"cells": cells, "per_method": per_method, "failed": [f"{c['method']}@{c['rows']}" for c in failed]}
    emit_record("bench_select", params, metrics, save=not args.no_record)
    if not args.keep_stores:
        shutil.rmtree(store, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
