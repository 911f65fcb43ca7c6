"""Aggregate + select benchmark per method on generated feature stores (issue 4).

For every (method, size) a fresh subprocess loads a seeded generated feature store (the tiny model's dims:
coincide_vector 1024 fp16, last_token 128 fp16, grad_proj 512 f32, 20 tasks; see ``feature_store_gen.py``;
cached as .npy per size) and runs the real phase functions on it:

* ``coincide``: ``aggregate_coincide`` (k-means, transferability, density, stats files) + ``select_method``;
* ``datatailor``: ``aggregate_datatailor`` (per-task Ward, cluster means, association) + ``select_method``;
* ``tive``: ``aggregate_tive`` + ``select_method``;  ``random``: ``select_method``;
* ``tasks``: ``task_statistics`` (Ray Data groupby; Ray start-up timed separately).

The method-module functions are wrapped (in the worker process only) with timers, so each phase reports its
steps without running anything twice; a sampler thread attributes the process RSS to the running steps (peak
RSS per step and its increase over the RSS at the step's start). The parent samples the RSS of the worker's
whole process tree; the worker reports its own ``ru_maxrss``.

Post-clustering steps (growth exponent = least-squares slope of log seconds vs log rows over the sizes):
COINCIDE transferability + density + selection_probability + coincide.select (quotas + greedy MMD);
DataTailor association + datatailor.select (uniqueness, representativeness, ranks, budgets, top-k);
TIVE task_values + task_mean_gradients + tive.select (instance values, budgets, sampling).

The oracle formulations (``tests/methods/oracles.py``, dense N x N transcriptions of the reference code; TIVE's
N x N Gram mean transcribed here) are timed at small sizes next to the same steps of the implementation.

Prints one JSON record ``{"params": ..., "metrics": ...}`` (with ``benchmark``, ISO ``date`` and ``machine``, strict
JSON as ``benchmarks/record.py``) and appends it to ``benchmarks/results/bench_select.jsonl``.

    python benchmarks/bench_select.py [--sizes 10000,100000,1000000] [--methods coincide,datatailor,tive,random]
                                      [--oracle-sizes 1000,2000,4000] [--quick] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "bench_select.jsonl"
CACHE = Path(os.environ.get("BENCH_SELECT_CACHE", Path(tempfile.gettempdir()) / "bench_select_cache"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

METHOD_COLUMNS = {
    "coincide": ("coincide_vector", "last_token"),
    "datatailor": ("last_token", "informativeness", "tau", "n_turns"),
    "tive": ("grad_proj", "grad_norm", "last_token"),
    "random": ("last_token",),
    "tasks": ("tau", "informativeness", "n_turns", "n_image_tokens", "n_text_tokens", "n_answer_tokens",
              "answer_loss", "grad_norm"),
}
POST_STEPS = {
    "coincide": ("coincide.transferability", "coincide.density", "coincide.selection_probability",
                 "coincide.select"),
    "datatailor": ("datatailor.association", "datatailor.select"),
    "tive": ("tive.task_values", "tive.task_mean_gradients", "tive.select"),
    "random": ("baselines.random_global",),
}
# steps whose exponent is reported individually (nested ones included)
DETAIL_STEPS = {
    "coincide": ("clustering.spherical_kmeans", "clustering.cluster_means", "coincide.transferability",
                 "coincide.density", "coincide.selection_probability", "coincide.allocate_and_select",
                 "coincide.greedy_mmd", "coincide.select", "write_subset"),
    "datatailor": ("datatailor.cluster_tasks", "clustering.ward_clusters", "clustering.cluster_means",
                   "datatailor.association", "datatailor.uniqueness", "datatailor.representativeness",
                   "datatailor.percentile_rank", "datatailor.task_budgets", "datatailor.select", "write_subset"),
    "tive": ("tive.task_values", "tive.task_mean_gradients", "tive.instance_values", "tive.task_budgets",
             "tive.sample_within_task", "tive.select", "write_subset"),
    "random": ("baselines.random_global", "write_subset"),
    "tasks": ("task_statistics",),
}
TARGET_SECONDS = 900.0
TARGET_RSS_MB = 12 * 1024.0
TARGET_EXPONENT = 1.2


# ----------------------------------------------------------------------------------------------- data cache


def cached_features(n: int, columns, seed: int = 0) -> dict[str, np.ndarray]:
    """Generated features (only ``columns`` + row_id/task), cached as .npy per (size, seed, column)."""
    from feature_store_gen import generate_features

    d = CACHE / f"n{n}_s{seed}"
    cols = ["row_id", "task", *columns]
    missing = [c for c in cols if not (d / f"{c}.npy").exists()]
    if missing:
        d.mkdir(parents=True, exist_ok=True)
        feats = generate_features(n, seed=seed, columns=missing)
        for c in missing:
            tmp = d / f"{c}.tmp.npy"
            np.save(tmp, feats[c] if c != "task" else feats[c].astype(str))
            tmp.rename(d / f"{c}.npy")
        del feats
    out = {}
    for c in cols:
        a = np.load(d / f"{c}.npy")
        out[c] = a.astype(object) if c == "task" else a
    return out


# ---------------------------------------------------------------------------------------------- step timers


class StepRecorder:
    """Accumulated seconds/calls per step plus the RSS peak (and increase) seen while each step ran."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.proc = psutil.Process()
        self.stats: dict[str, dict] = {}
        self.stack: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.interval = interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _rss(self) -> int:
        return self.proc.memory_info().rss

    def _run(self):
        while not self._stop.wait(self.interval):
            rss = self._rss()
            with self.lock:
                for name, start in self.stack:
                    st = self.stats[name]
                    st["peak_rss"] = max(st["peak_rss"], rss)
                    st["peak_delta"] = max(st["peak_delta"], rss - start)

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            rss = self._rss()
            with self.lock:
                st = self.stats.setdefault(name, {"seconds": 0.0, "calls": 0, "peak_rss": rss, "peak_delta": 0})
                self.stack.append((name, rss))
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt_ = time.perf_counter() - t0
                rss2 = self._rss()
                with self.lock:
                    self.stack.pop()
                    st["seconds"] += dt_
                    st["calls"] += 1
                    st["peak_rss"] = max(st["peak_rss"], rss2)
                    st["peak_delta"] = max(st["peak_delta"], rss2 - rss)
        return timed

    def patch(self, module, attr: str, label: str):
        setattr(module, attr, self.wrap(label, getattr(module, attr)))

    def report(self) -> dict:
        with self.lock:
            return {k: {"seconds": round(v["seconds"], 4), "calls": v["calls"],
                        "peak_rss_mb": round(v["peak_rss"] / 2**20, 1),
                        "rss_increase_mb": round(v["peak_delta"] / 2**20, 1)} for k, v in self.stats.items()}

    def stop(self):
        self._stop.set()


def install_timers(rec: StepRecorder) -> None:
    import datasel_ray.clustering as clustering
    from datasel_ray.methods import baselines, coincide, datatailor, tive
    from datasel_ray.pipeline import aggregate, select

    for name in ("spherical_kmeans", "cluster_means", "ward_clusters"):
        rec.patch(clustering, name, f"clustering.{name}")
    for name in ("transferability", "density", "selection_probability", "allocate_and_select", "greedy_mmd",
                 "select"):
        rec.patch(coincide, name, f"coincide.{name}")
    for name in ("cluster_tasks", "uniqueness", "association", "representativeness", "percentile_rank",
                 "task_budgets", "select"):
        rec.patch(datatailor, name, f"datatailor.{name}")
    for name in ("task_values", "task_mean_gradients", "instance_values", "task_budgets", "sample_within_task",
                 "select"):
        rec.patch(tive, name, f"tive.{name}")
    rec.patch(baselines, "random_global", "baselines.random_global")
    rec.patch(select, "write_subset", "write_subset")
    rec.patch(aggregate, "task_statistics", "task_statistics")


# -------------------------------------------------------------------------------------------------- worker


def coincide_settings(n: int, args) -> dict:
    """k-means settings: the defaults up to --kmeans-full-max rows, the large-pool options above."""
    from datasel_ray.methods import coincide

    s = {"num_clusters": coincide.default_num_clusters(n), "niter": args.niter}
    if n > args.kmeans_full_max:
        s.update(train_sample=args.train_sample, reduce_dim=args.reduce_dim)
    return s


def worker(args) -> None:
    out_path = Path(args.out)
    result: dict = {"method": args.method, "rows": args.size, "status": "running"}

    def flush():
        result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out_path.write_text(json.dumps(result))

    t0 = time.perf_counter()
    feats = cached_features(args.size, METHOD_COLUMNS[args.method], seed=args.seed)
    result["load_seconds"] = round(time.perf_counter() - t0, 3)
    result["rss_after_load_mb"] = round(__import__("psutil").Process().memory_info().rss / 2**20, 1)
    flush()

    from feature_store_gen import write_samples

    from datasel_ray.config import RunConfig
    from datasel_ray.io.rundir import RunDir
    from datasel_ray.pipeline import aggregate, select

    rec = StepRecorder()
    install_timers(rec)
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_select_{args.method}_{args.size}_"))
    try:
        if args.method != "tasks":
            write_samples(run_dir, feats["row_id"], feats["task"])
        cfg = RunConfig(run_dir=str(run_dir), seed=args.seed)
        cfg.select.budget = args.budget
        if args.method == "coincide":
            for k, v in coincide_settings(args.size, args).items():
                setattr(cfg.coincide, k, v)
            result["coincide_config"] = cfg.coincide.model_dump()
        rd = RunDir(str(run_dir))
        stats = rd / "stats"
        stats.mkdir()
        budget = cfg.select.budget_rows(args.size)
        phases: dict[str, float] = {}
        t_all = time.perf_counter()
        if args.method == "tasks":
            from datasel_ray.config import RayConfig
            from datasel_ray.pipeline import ray_adapter

            t = time.perf_counter()
            ray_adapter.ensure_ray(RayConfig(num_cpus=2))
            phases["ray_init"] = time.perf_counter() - t
            t = time.perf_counter()
            table = aggregate.task_statistics(feats)
            phases["aggregate"] = time.perf_counter() - t
            result["task_rows"] = table.num_rows
        else:
            agg = {"coincide": aggregate.aggregate_coincide, "datatailor": aggregate.aggregate_datatailor,
                   "tive": aggregate.aggregate_tive}.get(args.method)
            if agg is not None:
                t = time.perf_counter()
                try:
                    result["aggregate_result"] = agg(cfg, feats, stats)
                except Exception as exc:
                    if args.method != "tive":
                        raise
                    # the phase function failed: record it, then time the same steps with integer task codes
                    # (what aggregate_tive should pass) so that the select phase is still measured
                    result["aggregate_error"] = f"{type(exc).__name__}: {exc}"
                    from datasel_ray.methods import tive

                    t = time.perf_counter()
                    _, codes = np.unique(feats["task"].astype(str), return_inverse=True)
                    tive.task_values(feats["grad_norm"], codes, mode=cfg.tive.task_value)
                    tive.task_mean_gradients(feats["grad_proj"], codes)
                    result["aggregate_fallback"] = "tive.task_values/task_mean_gradients on np.unique codes"
                phases["aggregate"] = time.perf_counter() - t
                result["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
                result["steps"] = rec.report()
                flush()
            t = time.perf_counter()
            summary = select.select_method(cfg, rd, args.method, feats, budget)
            phases["select"] = time.perf_counter() - t
            result["selected"] = summary["selected"]
            result["unique_selected"] = summary["unique_selected"]
            result["budget_rows"] = budget
        result["seconds"] = round(time.perf_counter() - t_all, 3)
        result["phase_seconds"] = {k: round(v, 3) for k, v in phases.items()}
        result["steps"] = rec.report()
        result["status"] = "ok"
    except Exception as exc:  # reported, not hidden
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["steps"] = rec.report()
    finally:
        rec.stop()
        flush()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        if args.method == "tasks":
            from datasel_ray.pipeline import ray_adapter

            ray_adapter.shutdown_ray()


# -------------------------------------------------------------------------------------------------- oracle


def oracle_worker(args) -> None:
    """Dense reference transcriptions vs the implementation's steps at a small size (one method)."""
    sys.path.insert(0, str(ROOT / "tests" / "methods"))
    import oracles

    from datasel_ray.clustering import spherical_kmeans
    from datasel_ray.methods import coincide, datatailor, tive

    n, m = args.size, args.method
    res: dict = {"method": m, "rows": n}
    B = round(args.budget * n)

    def timed(fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        return r, round(time.perf_counter() - t, 4)

    if m == "coincide":
        f = cached_features(n, METHOD_COLUMNS[m], seed=args.seed)
        x = f["coincide_vector"]
        k = coincide.default_num_clusters(n)
        cent, lab = spherical_kmeans(x, k, niter=args.niter, seed=1)
        keep = np.flatnonzero(np.bincount(lab, minlength=k))  # oracle assumes non-empty ids 0..K-1
        remap = np.full(k, -1)
        remap[keep] = np.arange(len(keep))
        lab = remap[lab]
        from datasel_ray.clustering import cluster_means

        cent = cluster_means(x, lab, len(keep)).astype(np.float32)
        S_o, t_so = timed(oracles.transferability_reference, cent, 4)
        D_o, t_do = timed(oracles.density_dense, x, lab, len(keep))
        sel_o, t_po = timed(oracles.coincide_prune, x, lab, S_o, B, 0.1, 1.0)
        S, t_s = timed(coincide.transferability, cent, 4)
        D, t_d = timed(coincide.density, x, lab, len(keep))
        alloc, t_a = timed(coincide.allocate_and_select, x, lab, S, D, B, 0.1, 1.0)
        res["oracle"] = {"transferability": t_so, "density": t_do, "prune_incl_density": t_po,
                         "post_total": t_so + t_po}
        res["impl"] = {"transferability": t_s, "density": t_d, "allocate_and_select": t_a,
                       "post_total": t_s + t_d + t_a}
        res["agree"] = bool(np.array_equal(np.sort(sel_o), np.sort(alloc.selected)))
    elif m == "datatailor":
        f = cached_features(n, METHOD_COLUMNS[m], seed=args.seed)
        h = f["last_token"].astype(np.float64)
        v = f["informativeness"].astype(np.float64)
        tasks = f["task"].astype(str)
        ref, t_o = timed(oracles.datatailor_reference, h, v, f["tau"].astype(np.float64), f["n_turns"], tasks, B)
        labels = ref[1]
        (U_o, t_uo) = timed(oracles.uniqueness_dense, h, v, labels)
        res_i, t_i = timed(datatailor.select, f["last_token"], f["informativeness"], f["tau"], f["n_turns"], tasks,
                           B, labels=labels)
        _, t_ui = timed(datatailor.uniqueness, f["last_token"], f["informativeness"], labels)
        res["oracle"] = {"reference_incl_ward": t_o, "uniqueness": t_uo}
        res["impl"] = {"select_post_clustering": t_i, "uniqueness": t_ui}
        res["agree"] = bool(np.array_equal(ref[0], res_i.selected))
    elif m == "tive":
        f = cached_features(n, METHOD_COLUMNS[m], seed=args.seed)
        g = f["grad_proj"].astype(np.float64)
        _, codes = np.unique(f["task"].astype(str), return_inverse=True)

        def tive_dense(g, codes):  # reference: N x N Gram of normalised gradients, mean over the task's rows
            gn = g / np.linalg.norm(g, axis=1, keepdims=True)
            G = gn @ gn.T
            same = codes[:, None] == codes[None, :]
            return (G * same).sum(1) / same.sum(1)

        I_o, t_o = timed(tive_dense, g, codes)
        I_i, t_i = timed(tive.instance_values, f["grad_proj"], codes)
        res["oracle"] = {"instance_values": t_o}
        res["impl"] = {"instance_values": t_i}
        res["agree"] = bool(np.allclose(I_o, I_i, atol=1e-5))
    res["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    Path(args.out).write_text(json.dumps(res))


# -------------------------------------------------------------------------------------------------- parent


def run_child(argv: list[str], timeout: float) -> dict:
    """Run a worker subprocess; sample its process tree RSS; return its JSON plus wall time and peaks."""
    import psutil

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--out", out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_tree = 0
    timed_out = False
    try:
        p = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        p = None
    while proc.poll() is None:
        if p is not None:
            try:
                tree = [p, *p.children(recursive=True)]
                rss = 0
                for q in tree:
                    try:
                        rss += q.memory_info().rss
                    except psutil.Error:
                        pass
                peak_tree = max(peak_tree, rss)
            except psutil.Error:
                pass
        if time.perf_counter() - t0 > timeout:
            timed_out = True
            for q in (p.children(recursive=True) if p else []):
                try:
                    q.kill()
                except psutil.Error:
                    pass
            proc.kill()
            break
        time.sleep(0.2)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    try:
        res = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        res = {"status": "no_output"}
    os.unlink(out)
    if timed_out:
        res["status"] = "timeout"
    elif proc.returncode != 0 and res.get("status") == "ok":
        res["status"] = f"exit_{proc.returncode}"
    if res.get("status") not in ("ok", None) and err:
        res["stderr_tail"] = err[-1500:]
    res["wall_seconds"] = round(wall, 2)
    res["peak_tree_rss_mb"] = round(peak_tree / 2**20, 1)
    return res


def slope(sizes, secs) -> float | None:
    pts = [(math.log(n), math.log(s)) for n, s in zip(sizes, secs) if s is not None and s > 0]
    if len(pts) < 2:
        return None
    xs, ys = np.array(pts).T
    return round(float(np.polyfit(xs, ys, 1)[0]), 3)


def summarise(method: str, runs: dict[int, dict]) -> dict:
    ok = {n: r for n, r in sorted(runs.items()) if r.get("status") == "ok"}
    out: dict = {}
    if not ok:
        return out
    sizes = list(ok)

    def post(r):
        steps = r.get("steps", {})
        return sum(steps.get(s, {}).get("seconds", 0.0) for s in POST_STEPS.get(method, ()))

    if method in POST_STEPS:
        secs = [post(ok[n]) for n in sizes]
        out["post_clustering_seconds"] = {str(n): round(s, 3) for n, s in zip(sizes, secs)}
        out["post_clustering_exponent"] = slope(sizes, secs)
        if len(sizes) >= 2:
            out["post_clustering_exponent_last_pair"] = slope(sizes[-2:], secs[-2:])
    out["total_exponent"] = slope(sizes, [ok[n]["seconds"] for n in sizes])
    per_step = {}
    for s in DETAIL_STEPS.get(method, ()):
        secs = [ok[n].get("steps", {}).get(s, {}).get("seconds") for n in sizes]
        mem = [ok[n].get("steps", {}).get(s, {}).get("rss_increase_mb") for n in sizes]
        if any(v is not None for v in secs):
            per_step[s] = {"seconds": {str(n): v for n, v in zip(sizes, secs)}, "time_exponent": slope(sizes, secs),
                           "rss_increase_mb": {str(n): v for n, v in zip(sizes, mem)},
                           "rss_increase_exponent": slope(sizes, [max(m or 0, 1.0) for m in mem])}
    out["steps"] = per_step
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--methods", default="coincide,datatailor,tive,random,tasks")
    ap.add_argument("--oracle-sizes", default="1000,2000,4000")
    ap.add_argument("--oracle-methods", default="coincide,datatailor,tive")
    ap.add_argument("--quick", action="store_true", help="sizes 2000,10000, oracle sizes 500,1000")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--niter", type=int, default=50, help="COINCIDE k-means iterations (reference 50)")
    ap.add_argument("--kmeans-full-max", type=int, default=50000,
                    help="above this many rows COINCIDE k-means uses --train-sample and --reduce-dim")
    ap.add_argument("--train-sample", type=int, default=100000)
    ap.add_argument("--reduce-dim", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per (method, size) subprocess")
    ap.add_argument("--oracle-timeout", type=float, default=300.0)
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to the results file")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--partial", help="write the runs so far to this JSON file after each subprocess")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--oracle-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.oracle_worker:
        oracle_worker(args)
        return {}
    if args.quick:
        args.sizes = "2000,10000" if args.sizes == ap.get_default("sizes") else args.sizes
        args.oracle_sizes = "500,1000" if args.oracle_sizes == ap.get_default("oracle_sizes") else args.oracle_sizes
    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    oracle_sizes = [int(s) for s in args.oracle_sizes.split(",") if s]
    oracle_methods = [m for m in args.oracle_methods.split(",") if m and m in methods]
    for m in methods:
        if m not in METHOD_COLUMNS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHOD_COLUMNS)}")
    common = ["--seed", str(args.seed), "--budget", str(args.budget), "--niter", str(args.niter),
              "--kmeans-full-max", str(args.kmeans_full_max), "--train-sample", str(args.train_sample),
              "--reduce-dim", str(args.reduce_dim)]
    started = time.perf_counter()
    oracle: dict = {}
    for m in oracle_methods:
        for n in oracle_sizes:
            r = run_child(["--oracle-worker", "--method", m, "--size", str(n), *common], args.oracle_timeout)
            oracle.setdefault(m, {})[str(n)] = r
            print(f"[oracle] {m} n={n}: {r.get('status', 'ok')} oracle={r.get('oracle')} impl={r.get('impl')}",
                  file=sys.stderr, flush=True)
    runs: dict[str, dict[int, dict]] = {m: {} for m in methods}
    for n in sizes:
        for m in methods:
            r = run_child(["--worker", "--method", m, "--size", str(n), *common], args.timeout)
            runs[m][n] = r
            if args.partial:
                Path(args.partial).write_text(json.dumps({"oracle": oracle, "runs": runs}))
            print(f"[bench] {m} n={n}: {r.get('status')} {r.get('seconds')} s, tree peak {r.get('peak_tree_rss_mb')} MB,"
                  f" ru_maxrss {r.get('ru_maxrss_mb')} MB, phases {r.get('phase_seconds')}", file=sys.stderr, flush=True)
    metrics: dict = {"runs": {m: {str(n): r for n, r in rs.items()} for m, rs in runs.items()},
                     "summary": {m: summarise(m, rs) for m, rs in runs.items()}}
    table = {}
    for m, rs in runs.items():
        for n, r in rs.items():
            table.setdefault(m, {})[str(n)] = {"status": r.get("status"), "seconds": r.get("seconds"),
                                               "wall_seconds": r.get("wall_seconds"),
                                               "peak_rss_mb": r.get("ru_maxrss_mb"),
                                               "peak_tree_rss_mb": r.get("peak_tree_rss_mb")}
    metrics["table"] = table
    for m in oracle:
        for n, r in oracle[m].items():
            o, i = r.get("oracle") or {}, r.get("impl") or {}
            if "post_total" in o and i.get("post_total"):
                r["oracle_over_impl_post"] = round(o["post_total"] / i["post_total"], 2)
    metrics["oracle"] = oracle
    largest = max(sizes) if sizes else None
    targets = {}
    for m in methods:
        r = runs[m].get(largest, {})
        t = {"largest_rows": largest,
             "seconds_le_900": r.get("status") == "ok" and r.get("seconds", 1e9) <= TARGET_SECONDS,
             "peak_rss_le_12gb": r.get("status") == "ok" and max(r.get("ru_maxrss_mb") or 0,
                                                                  r.get("peak_tree_rss_mb") or 0) <= TARGET_RSS_MB}
        e = metrics["summary"][m].get("post_clustering_exponent")
        if m in POST_STEPS:
            t["post_exponent_le_1.2"] = None if e is None else e <= TARGET_EXPONENT
        targets[m] = t
    metrics["targets"] = targets
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    import platform

    params = {"sizes": sizes, "methods": methods, "oracle_sizes": oracle_sizes, "oracle_methods": oracle_methods,
              "quick": args.quick, "budget": args.budget, "seed": args.seed,
              "store": {"n_tasks": 20, "coincide_dim": 1024, "n_layers": 4, "hidden": 128, "proj_dim": 512,
                        "concepts_per_task": 300, "dup_fraction": 0.03, "dtypes": "coincide_vector/last_token fp16"},
              "coincide_kmeans": {"niter": args.niter, "num_clusters": "round(N/66)",
                                  "large_pool_above_rows": args.kmeans_full_max, "train_sample": args.train_sample,
                                  "reduce_dim": args.reduce_dim, "reduce_method": "pca"},
              "datatailor": "defaults (dense Ward <= 4000 rows/task, else 2000 k-means pre-clusters)",
              "cpus": os.cpu_count(), "machine": platform.machine(), "timeout_s": args.timeout,
              "columns_loaded": {m: ["row_id", "task", *METHOD_COLUMNS[m]] for m in methods}}
    return write_record(params, metrics, None if args.no_record else Path(args.results))


def write_record(params: dict, metrics: dict, path: Path | None) -> dict:
    """Print one strict-JSON record (``benchmarks/record.py`` layout: NaN/inf as null) and append it to ``path``."""
    from record import _cpus, _finite

    import platform

    record = {"benchmark": "bench_select", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"python": platform.python_version(), "cpus": _cpus()}, "params": params, "metrics": metrics}
    line = json.dumps(_finite(record), sort_keys=True, allow_nan=False)
    print(line, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(line + "\n")
    return json.loads(line)


if __name__ == "__main__":
    main()
