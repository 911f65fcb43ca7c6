"""Online scoring benchmark: throughput and p50/p99 latency of ``POST /score`` on a local Ray Serve.

Cells: ``@serve.batch`` (max batch size 16) and max batch size 1, each at client concurrency 1 and 16, one
sample per request, on the tiny reference model; plus the overhead of the HTTP path over a direct
``Scorer.score_records`` call (p50, concurrency 1, batch size 1). Prints one JSON record
``{"params": ..., "metrics": ...}`` and appends it, with an ISO ``date``, to ``benchmarks/results/bench_serve.jsonl``.

Targets: batching >= 3x the throughput of batch size 1 at concurrency 16; p50 HTTP overhead <= 15 ms.

    python benchmarks/bench_serve.py [--quick] [--run RUN_DIR]
"""

import argparse
import asyncio
import json
import os
import tempfile
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import emit_record  # noqa: E402

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

APP = "datasel-bench"


def build_run(workdir: Path, num_samples: int) -> tuple[str, Path]:
    """A fresh run (ingest → select) on a generated pool; returns (run dir, pool json)."""
    from datasel_ray.demo import demo_config
    from datasel_ray.pipeline.runner import run_phases
    from datasel_ray.synthetic import SynthConfig, generate_pool

    info = generate_pool(workdir / "pool", SynthConfig(num_samples=num_samples, seed=0))
    cfg = demo_config(workdir, info.pool_path, tive=False)
    run_phases(cfg, ["ingest", "extract", "aggregate", "select"], quiet=True)
    return cfg.run_dir, Path(info.pool_path)


def valid_samples(run_dir: str, pool_path: Path, limit: int = 64) -> tuple[list[dict], object]:
    """Pool records the scorer accepts (the generated pool holds deliberately bad rows)."""
    from datasel_ray.scoring import SampleError, Scorer

    scorer = Scorer(run_dir)
    out = []
    for record in json.loads(pool_path.read_text()):
        try:
            scorer.parse(record)
        except SampleError:
            continue
        out.append(record)
        if len(out) == limit:
            break
    return out, scorer


def direct_latency(scorer, samples: list[dict], n: int) -> list[float]:
    """Seconds per in-process ``Scorer.score_records([sample])`` call."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        scorer.score_records([samples[i % len(samples)]])
        times.append(time.perf_counter() - t0)
    return times


async def load(url: str, samples: list[dict], concurrency: int, seconds: float) -> tuple[list[float], int]:
    """``concurrency`` clients each sending one sample per request back to back for ``seconds``.

    aiohttp, not httpx: the client shares the two cores with the proxy and the replica, and aiohttp spends about
    1.5 ms less CPU per request (measured against a no-op Serve app), which would otherwise be charged to Serve.
    """
    import aiohttp

    bodies = [json.dumps(s).encode() for s in samples]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with client.post("/score", data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += concurrency

        await asyncio.gather(*[worker(k) for k in range(concurrency)])
    return latencies, errors


def model_amortisation(scorer, samples: list[dict], batch: int = 16, repeats: int = 5) -> dict:
    """In-process ms per sample of one model pass (``Scorer.score_samples``) at batch 1 vs ``batch``: the most
    that batching can save in the model, whatever the HTTP path does."""
    parsed = [scorer.parse(s)[0] for s in samples[:batch]]

    def per_sample(group: list) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scorer.score_samples(group)
            times.append((time.perf_counter() - t0) / len(group))
        return float(np.median(times)) * 1000

    single = float(np.median([per_sample([p]) for p in parsed]))
    batched = per_sample(parsed)
    return {"ms_per_sample_batch_1": round(single, 2), f"ms_per_sample_batch_{batch}": round(batched, 2),
            "model_speedup": round(single / batched, 2)}


def noop_app():
    """A Serve app with the same ingress shape that reads the body and returns a constant: the floor of the
    HTTP path (proxy, router, FastAPI, client) on this machine."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Noop", max_ongoing_requests=64)
    @serve.ingress(api)
    class Noop:
        @api.post("/score")
        async def score(self, request: Request) -> dict:
            return {"bytes": len(await request.body())}

    return Noop.bind()


def summarize(latencies: list[float], seconds: float, errors: int) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": int(len(lat)), "errors": errors, "throughput_rps": round(len(lat) / seconds, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter cells and a smaller pool")
    parser.add_argument("--run", help="an existing run directory (default: build one on a generated pool)")
    parser.add_argument("--pool", help="the pool JSON of --run (samples to send)")
    args = parser.parse_args()
    import ray
    from ray import serve

    from serve.app import build_app, start_http

    seconds = 5.0 if args.quick else 12.0
    started = time.monotonic()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if args.run:
        run_dir, pool_path = args.run, Path(args.pool)
    else:
        run_dir, pool_path = build_run(Path(tempfile.mkdtemp(prefix="bench-serve-")), 120 if args.quick else 240)
    import torch

    torch.set_num_threads(1)  # as in the replica: Ray sets OMP_NUM_THREADS=1 for a num_cpus=1 actor
    samples, scorer = valid_samples(run_dir, pool_path)
    scorer.score_records(samples[:16])  # warm-up
    direct = direct_latency(scorer, samples, 30 if args.quick else 100)
    amortisation = model_amortisation(scorer, samples)

    port = start_http("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    cells: dict[str, dict] = {}
    try:
        serve.run(noop_app(), name=APP, route_prefix="/", blocking=False)
        asyncio.run(load(url, samples, 4, 2.0))
        for concurrency in (1, 16):
            latencies, errors = asyncio.run(load(url, samples, concurrency, seconds))
            cells[f"noop_floor_c{concurrency}"] = summarize(latencies, seconds, errors)
        serve.delete(APP)
        for label, batch_size in (("batched", 16), ("batch_size_1", 1)):
            serve.run(build_app({"run_dir": run_dir, "max_batch_size": batch_size, "batch_wait_timeout_s": 0.01,
                                 "max_ongoing_requests": 64, "auth_token_env": None}),
                      name=APP, route_prefix="/", blocking=False)
            asyncio.run(load(url, samples, 4, 2.0))  # warm-up: model, tokenizer and connection pools
            for concurrency in (1, 16):
                latencies, errors = asyncio.run(load(url, samples, concurrency, seconds))
                cells[f"{label}_c{concurrency}"] = summarize(latencies, seconds, errors)
    finally:
        serve.shutdown()
        ray.shutdown()

    direct_p50 = float(np.percentile(np.asarray(direct) * 1000, 50))
    speedup = cells["batched_c16"]["throughput_rps"] / max(cells["batch_size_1_c16"]["throughput_rps"], 1e-9)
    overhead = cells["batch_size_1_c1"]["p50_ms"] - direct_p50
    record = {
        "params": {"model": "tiny", "pool_rows_requested": 120 if args.quick else 240, "seconds_per_cell": seconds,
                   "max_batch_sizes": [16, 1], "batch_wait_timeout_s": 0.01, "concurrency": [1, 16],
                   "samples_per_request": 1, "cpus": os.cpu_count(), "quick": args.quick, "client": "aiohttp"},
        "metrics": {**cells, "direct_scorer_p50_ms": round(direct_p50, 2), "model_amortisation": amortisation,
                    "noop_floor_p50_ms_c1": cells["noop_floor_c1"]["p50_ms"],
                    "http_overhead_p50_ms": round(overhead, 2),
                    "batched_over_batch1_throughput_c16": round(speedup, 2),
                    "targets": {"batching_3x_at_c16": speedup >= 3.0, "overhead_p50_le_15ms": overhead <= 15.0},
                    "wall_seconds": round(time.monotonic() - started, 1)},
    }
    emit_record("bench_serve", record["params"], record["metrics"])


if __name__ == "__main__":
    main()
