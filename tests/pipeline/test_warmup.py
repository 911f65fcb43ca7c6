"""Warm-up phase through Ray Train on a generated pool, then extraction with TIVE gradients."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from datasel_ray import schema
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.pipeline.warmup import adapter_sha256, run_warmup
from datasel_ray.seeds import derive_seed
from datasel_ray.synthetic import SynthConfig, generate_pool
from datasel_ray.training.lora import load_optimizer_state, select_warmup_rows

PROJ_DIM = 32


def _load_adapter(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from datasel_ray.models.tiny import resolve_model_path

    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path("tiny"), local_files_only=True)
    return PeftModel.from_pretrained(base, str(adapter_dir))


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, ray_local, tiny_model_dir):
    """ingest + warmup (Ray Train) on a 160-row generated pool; returns (config, warmup result)."""
    from datasel_ray.demo import demo_config

    tmp_path = tmp_path_factory.mktemp("warmup")
    pool = generate_pool(tmp_path / "pool", SynthConfig(num_samples=160, seed=4, bad_rate=0.0))
    cfg = demo_config(tmp_path, pool.pool_path, tive=True, seed=2)
    cfg.tive.warmup_fraction = 0.25
    cfg.tive.proj_dim = PROJ_DIM
    cfg.extract.shard_rows = 80
    handler = signal.getsignal(signal.SIGINT)
    warm = run_phases(cfg, ["ingest", "warmup"], quiet=True)["warmup"]
    # Ray Train's fit() installs its own SIGINT handler; the driver's is back for the later phases (StallWatch)
    assert signal.getsignal(signal.SIGINT) is handler
    return cfg, warm


@pytest.mark.integration  # a Ray Train worker group; the training loop itself: tests/training
def test_warmup_writes_a_complete_adapter(warm_run):
    cfg, warm = warm_run
    rd = RunDir(cfg.run_dir)
    lora = rd / "lora"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt",
                 "warmup_ids.npy", "training_log.json"):
        assert (lora / name).exists(), name
    assert not (lora / "_ray_train").exists()

    # the sample: equal per task, seeded from the run seed, recorded
    samples = load_table(rd, "samples")
    row_ids = column_to_numpy(samples.column(schema.ROW_ID))
    tasks = np.asarray(samples.column(schema.TASK).to_pylist(), dtype=object)
    ids = (lora / "warmup_ids.npy").read_npy()
    np.testing.assert_array_equal(ids, select_warmup_rows(row_ids, tasks, 0.25, derive_seed(2, "warmup")))
    names, sizes = np.unique(tasks.astype(str), return_counts=True)
    per_task = round(0.25 * len(row_ids) / len(names))
    for task, size in zip(names, sizes):
        assert np.isin(ids, row_ids[tasks == task]).sum() == min(per_task, size)

    # the log and the manifest record the run and the adapter
    log = (lora / "training_log.json").read_json()
    assert log["complete"] and log["samples"] == len(ids) and log["dropped"] == 0
    assert len(log["step_loss"]) == log["steps"] == -(-len(ids) // cfg.tive.warmup_batch_size)
    assert np.isfinite(log["final_loss"]) and log["seconds"] > 0
    assert warm["adapter_sha256"] == adapter_sha256(lora / "adapter") == log["adapter_sha256"]
    manifest = rd.load_manifest()["phases"]["warmup"]
    assert manifest["status"] == "done" and manifest["result"]["adapter_sha256"] == warm["adapter_sha256"]

    # the adapter loads and moved away from its init (B starts at zero); Adam state keyed by name
    model = _load_adapter(lora / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)
    state = load_optimizer_state(lora / "optimizer.pt")["state"]
    assert set(state) == {n for n, _ in model.named_parameters() if "lora" in n}
    assert all(torch.all(s["exp_avg_sq"] >= 0) for s in state.values())

    # resumable: a complete lora/ is not retrained (no file in it is rewritten)
    def stamps():
        return {str(f): f.stat().st_mtime_ns for f in Path(str(lora)).rglob("*") if f.is_file()}

    before = stamps()
    again = run_warmup(cfg, rd, quiet=True)
    assert again["adapter_sha256"] == warm["adapter_sha256"] and stamps() == before


@pytest.mark.slow
def test_extract_after_warmup_adds_gradients(warm_run):
    cfg, _ = warm_run
    rd = RunDir(cfg.run_dir)
    row_ids = column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID))
    extract = run_phases(cfg, ["extract"], quiet=True)["extract"]
    features = load_table(rd, "features")
    assert extract["failed"] == 0 and features.num_rows == len(row_ids)
    grad = column_to_numpy(features.column(schema.GRAD_PROJ))
    norm = column_to_numpy(features.column(schema.GRAD_NORM))
    assert grad.shape == (len(row_ids), PROJ_DIM) and grad.dtype == np.float32
    assert extract["projector"]["proj_dim"] == PROJ_DIM and extract["projector"]["generator"] == "torch-cpu"
    assert np.all(norm > 0) and np.all(np.isfinite(grad)) and np.all(np.abs(grad).sum(axis=1) > 0)
