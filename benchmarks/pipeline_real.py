"""Check: smol-llava through every phase on a small easy-VQA pool, then the batch scorer and a Ray Serve replica.

``python benchmarks/pipeline_real.py WORKDIR NUM_SAMPLES PRESET`` (PRESET: ``cpu`` or ``reference``, the TIVE
warm-up preset): ingest -> warm-up (Ray Train) -> extract (TIVE gradients included) -> aggregate -> select
(coincide, datatailor, tive, random at 20%) -> ``Scorer.score_records`` on 4 pool rows -> the same rows through
``POST /score`` of a local Ray Serve app; asserts that served and batch tasks and COINCIDE clusters agree.
Prints per-phase seconds and each selection's ground-truth quality.
"""
import json, os, sys, time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
work = Path(sys.argv[1]); work.mkdir(parents=True, exist_ok=True)
n = int(sys.argv[2]); preset = sys.argv[3]
from datasel_ray.config import RunConfig
from datasel_ray.pools import easy_vqa
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.evaluation import selection_quality
from datasel_ray.synthetic import load_ground_truth

t0 = time.time()
info = easy_vqa.generate_pool(work / "pool", easy_vqa.EasyVQAPoolConfig(num_samples=n, seed=1, heldout_samples=10))
cfg = RunConfig.model_validate({
    "run_dir": str(work / f"run-{preset}"), "seed": 0,
    "pool": {"path": str(info.pool_path), "task_map": {f"{f}/": t for t, f in easy_vqa.TASK_FOLDERS.items()}},
    "model": {"name_or_path": "smol-llava"},
    "extract": {"batch_size": 8, "shard_rows": 64},
    "tive": {"enabled": True, "warmup_preset": preset, "warmup_fraction": 0.2},
    "select": {"methods": ["coincide", "datatailor", "tive", "random"], "budget": 0.2},
    "ray": {"num_cpus": 2},
})
results = run_phases(cfg, quiet=True)
timing = {p: round(r.get("seconds", 0) or 0, 1) if isinstance(r, dict) else None for p, r in results.items()}
print("phases", json.dumps(timing))
print("warmup", json.dumps({k: results["warmup"].get(k) for k in ("samples", "steps", "first_loss", "final_loss", "seconds")}))
print("extract", json.dumps({k: results["extract"].get(k) for k in ("features", "failed", "seconds")}))
truth = load_ground_truth(info.ground_truth_path)
import numpy as np
for m in cfg.select.methods:
    ids = np.load(Path(cfg.run_dir) / "selections" / m / "selected_ids.npy")
    q = selection_quality(ids, truth, set(easy_vqa.TASK_FOLDERS))
    print("select", m, json.dumps({k: q[k] for k in ("selected", "duplicate_rate", "noise_rate", "task_coverage")}))

from datasel_ray.scoring import Scorer
records = json.loads(info.pool_path.read_text())[:4]
t1 = time.time()
scored = Scorer(cfg.run_dir).score_records(records)
print("scorer", round(time.time() - t1, 1), json.dumps(scored[0])[:600])

import httpx
from ray import serve
from serve.app import build_app, start_http
port = start_http("127.0.0.1")
serve.run(build_app({"run_dir": cfg.run_dir, "max_batch_size": 4, "num_cpus": 1}), name="smol-check", route_prefix="/", blocking=False)
client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
r = client.post("/score", json={"samples": records})
print("serve", r.status_code, json.dumps(r.json())[:400])
served = r.json()["results"]
for a, b in zip(served, scored):
    assert a["task"] == b["task"] and a["coincide"]["cluster"] == b["coincide"]["cluster"], (a, b)
print("serve==batch ok; total", round(time.time() - t0, 1))
serve.shutdown()
