"""Extraction on Ray: one feature row per good sample, failures quarantined, resumable bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import yaml

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.synthetic import SynthConfig, generate_pool


def test_every_good_row_has_one_feature_row(demo_run):
    cfg, results = demo_run
    rd = RunDir(cfg.run_dir)
    sample_ids = column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID))
    feature_ids = column_to_numpy(load_table(rd, "features").column(schema.ROW_ID))
    failed = results["extract"]["failed"]
    assert failed == 0
    np.testing.assert_array_equal(np.sort(feature_ids), np.sort(sample_ids))
    assert results["ingest"]["rows_in"] == 500
    features = load_table(rd, "features")
    vec = column_to_numpy(features.column(schema.COINCIDE_VECTOR)).astype(np.float32)
    norms = np.linalg.norm(vec, axis=1)
    has_image = column_to_numpy(features.column(schema.N_IMAGE_TOKENS)) > 0
    assert has_image.any() and (~has_image).any()
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)  # unit norm (fp16 storage), text-only rows included
    dim = vec.shape[1]
    visual = np.concatenate([vec[:, i:i + 128] for i in range(0, dim, 256)], axis=1)
    assert not visual[~has_image].any()  # text-only: zero visual halves
    tau = column_to_numpy(features.column(schema.TAU))
    assert np.all((tau > 0) & (tau <= 1))
    assert np.all(column_to_numpy(features.column(schema.N_ANSWER_TOKENS)) > 0)


def _config(tmp_path, name, pool_path) -> RunConfig:
    from datasel_ray.demo import demo_config

    cfg = demo_config(tmp_path, pool_path, tive=False)
    data = cfg.model_dump(mode="json")
    data["run_dir"] = str(tmp_path / name)
    data["extract"].update({"shard_rows": 4, "batch_size": 2})
    return RunConfig.model_validate(data)


def _features(run_dir: str) -> pa.Table:
    return load_table(RunDir(run_dir), "features")


@pytest.mark.integration  # a second driver process, killed mid-run
def test_killed_driver_resumes_to_identical_features(tmp_path, ray_local):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=160, seed=4, bad_rate=0.0))
    clean = _config(tmp_path, "clean", info.pool_path)
    killed = _config(tmp_path, "killed", info.pool_path)
    run_phases(clean, ["ingest", "extract"], quiet=True)
    run_phases(killed, ["ingest"], quiet=True)
    cfg_path = tmp_path / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(killed.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "datasel_ray.cli", "extract", "--config", str(cfg_path), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = RunDir(killed.run_dir) / "features"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(shards.list(".parquet")) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(shards.list(".parquet"))
    total = len(_features(clean.run_dir)) // 4
    assert 2 <= written < total, f"kill landed after {written} of {total} shards"
    run_phases(killed, ["extract"], quiet=True)
    a, b = _features(clean.run_dir), _features(killed.run_dir)
    assert a.column_names == b.column_names
    assert a.equals(b), "resumed features differ from an uninterrupted run"
    for cfg in (clean, killed):
        run_phases(cfg, ["aggregate", "select"], quiet=True)
    for method in clean.select.methods:
        ids = [(RunDir(c.run_dir) / "selections" / method / "selected_ids.npy").read_bytes() for c in (clean, killed)]
        assert ids[0] == ids[1], f"{method}: selection after the resumed run differs"


def _write_shard(rd: RunDir, name: str, fingerprint: dict | None) -> None:
    import json

    from datasel_ray.pipeline.extract import PROJECTOR_METADATA_KEY

    table = pa.table({schema.ROW_ID: pa.array([1, 2], type=pa.int64())})
    if fingerprint is not None:
        table = table.replace_schema_metadata({PROJECTOR_METADATA_KEY: json.dumps(fingerprint, sort_keys=True)})
    (rd / "features" / f"{name}.parquet").write_parquet(table)


def test_projector_fingerprint_is_shared_by_every_shard_or_refused(tmp_path):
    import pytest

    from datasel_ray.pipeline.extract import feature_shards_summary

    rd = RunDir(str(tmp_path / "run"))
    _write_shard(rd, "a-00000", None)
    assert feature_shards_summary(rd) == (2, None)  # no TIVE
    cpu = {"kind": "rademacher", "proj_dim": 512, "generator": "torch-cpu", "seed": 7}
    _write_shard(rd, "a-00001", cpu)
    _write_shard(rd, "a-00002", cpu)
    assert feature_shards_summary(rd) == (6, cpu)
    _write_shard(rd, "a-00003", {**cpu, "proj_dim": 8192, "generator": "torch-cuda"})
    with pytest.raises(RuntimeError, match="mixes TIVE projections.*--force"):
        feature_shards_summary(rd)


def test_samples_row_groups_follow_the_shard_size(demo_run):
    import pyarrow.parquet as pq

    cfg, _ = demo_run
    files = (RunDir(cfg.run_dir) / "samples").list(".parquet")
    assert files
    for f in files:
        with f.open_input() as handle:
            meta = pq.ParquetFile(handle).metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert max(sizes) <= cfg.extract.shard_rows and sum(sizes) == meta.num_rows


@pytest.mark.gpu
def test_gpu_actors_extract_the_features_of_cpu_actors(tmp_path, ray_local):
    """num_gpus_per_actor=1: the actor holds a GPU and runs the model on CUDA; features match CPU actors'."""
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=24, seed=5, bad_rate=0.0))
    cpu, gpu = _config(tmp_path, "cpu", info.pool_path), _config(tmp_path, "gpu", info.pool_path)
    cpu.extract.num_gpus_per_actor = 0
    gpu.extract.num_gpus_per_actor = None  # default: 1 when the cluster has a GPU
    results = {name: run_phases(c, ["ingest", "extract"], quiet=True)["extract"]
               for name, c in (("cpu", cpu), ("gpu", gpu))}
    assert results["gpu"]["num_gpus_per_actor"] == 1.0 and results["cpu"]["num_gpus_per_actor"] == 0.0
    a, b = _features(cpu.run_dir), _features(gpu.run_dir)
    np.testing.assert_array_equal(column_to_numpy(a.column(schema.ROW_ID)), column_to_numpy(b.column(schema.ROW_ID)))
    # cuDNN runs the vision tower's patch convolution in TF32 by default (~1e-3 relative), and vectors are
    # stored in fp16: relative bounds of that order; a wrong device transfer or image differs by far more
    for name in (schema.COINCIDE_VECTOR, schema.LAST_TOKEN):
        x, y = (column_to_numpy(t.column(name)).astype(np.float32) for t in (a, b))
        np.testing.assert_allclose(y, x, rtol=1e-2, atol=1e-2 * float(np.abs(x).max()), err_msg=name)
    for name in (schema.INFORMATIVENESS, schema.TAU, schema.ANSWER_LOSS):
        x, y = (column_to_numpy(t.column(name)) for t in (a, b))
        np.testing.assert_allclose(y, x, rtol=5e-3, err_msg=name)
