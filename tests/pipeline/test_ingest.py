"""Ingest on a generated pool: every bad row quarantined with its reason, nothing lost, stable ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.ingest import run_ingest
from datasel_ray.synthetic import SynthConfig, generate_pool, load_ground_truth


def _ingest(pool_info, run_dir, executor="local", **pool):
    """Ingest in this process (``pool.executor``), except where a test compares with Ray."""
    from datasel_ray.demo import demo_config

    cfg = demo_config(run_dir.parent, pool_info.pool_path, tive=False)
    cfg = RunConfig.model_validate({**cfg.model_dump(), "run_dir": str(run_dir),
                                    "pool": {**cfg.pool.model_dump(), "executor": executor, **pool}})
    rd = RunDir(cfg.run_dir)
    rd.init(cfg)
    return cfg, rd, run_ingest(cfg, rd, quiet=True)


def _check_against_ground_truth(rd: RunDir, truth: list[dict], counts: dict) -> None:
    mask = (1 << schema.ROW_ID_FILE_SHIFT) - 1
    quarantine = load_table(rd, "quarantine/ingest")
    reasons = dict(zip((column_to_numpy(quarantine.column(schema.ROW_ID)) & mask).tolist(),
                       quarantine.column(schema.REASON).to_pylist()))
    expected_bad = {r["index"]: r["bad_kind"] for r in truth if r["bad_kind"]}
    assert reasons == expected_bad
    samples = load_table(rd, "samples")
    good_ids = (column_to_numpy(samples.column(schema.ROW_ID)) & mask).tolist()
    assert sorted(good_ids) == [r["index"] for r in truth if not r["bad_kind"]]
    assert counts["samples"] + counts["quarantined"] == counts["rows_in"] == len(truth)
    tasks = dict(zip(good_ids, samples.column(schema.TASK).to_pylist()))
    assert all(tasks[r["index"]] == r["task"] for r in truth if not r["bad_kind"])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_every_bad_row_is_quarantined_with_its_reason(tmp_path, fmt):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=500, seed=11, format=fmt, bad_rate=0.05))
    truth = load_ground_truth(info.ground_truth_path)
    kinds = {r["bad_kind"] for r in truth if r["bad_kind"]}
    assert len(kinds) >= 8
    _, rd, counts = _ingest(info, tmp_path / "run", records_per_block=64)
    _check_against_ground_truth(rd, truth, counts)
    quarantine = load_table(rd, "quarantine/ingest")
    raw = quarantine.column(schema.RAW).to_pylist()
    messages = quarantine.column(schema.MESSAGE).to_pylist()
    assert all(r for r in raw) and all(":" in m for m in messages)  # "field: what was expected"


def test_ray_tasks_and_the_local_executor_write_the_same_shards(tmp_path, ray_local):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=200, seed=4, format="jsonl", bad_rate=0.05))
    outputs = {}
    for executor in ("ray", "local"):
        _, rd, counts = _ingest(info, tmp_path / executor, executor=executor, records_per_block=64)
        outputs[executor] = (counts["samples"], counts["by_reason"], {
            sub: {f.name: f.read_parquet().to_pylist() for f in (rd / sub).list(".parquet")}
            for sub in ("samples", "quarantine/ingest")})
    assert outputs["ray"] == outputs["local"]
    assert len(outputs["local"][2]["samples"]) == 4 and outputs["local"][1]


def test_auto_executor_is_local_for_one_block_only(tmp_path):
    from datasel_ray.pipeline.ingest import ingest_executor

    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=20, seed=1))
    cfg, _, _ = _ingest(info, tmp_path / "run", executor="auto")
    assert ingest_executor(cfg, ["one block"]) == "local" and ingest_executor(cfg, ["a", "b"]) == "ray"
    forced = RunConfig.model_validate({**cfg.model_dump(), "pool": {**cfg.pool.model_dump(), "executor": "ray"}})
    assert ingest_executor(forced, ["one block"]) == "ray"


def test_rerun_resumes_and_keeps_ids(tmp_path):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=150, seed=2))
    _, rd, first = _ingest(info, tmp_path / "run", records_per_block=40)
    ids_before = column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID))
    # lose one block's samples shard, as a killed ingest would
    victim = (rd / "samples").list(".parquet")[1]
    victim.delete()
    _, rd, second = _ingest(info, tmp_path / "run", records_per_block=40)
    assert second["samples"] == first["samples"] and second["quarantined"] == first["quarantined"]
    np.testing.assert_array_equal(column_to_numpy(load_table(rd, "samples").column(schema.ROW_ID)), ids_before)


def test_samples_keep_the_original_record(tmp_path):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=60, seed=5, bad_rate=0.0))
    _, rd, _ = _ingest(info, tmp_path / "run")
    pool = json.loads(info.pool_path.read_text())
    samples = load_table(rd, "samples")
    for raw, idx in zip(samples.column(schema.RAW).to_pylist(), samples.column(schema.SOURCE_INDEX).to_pylist()):
        assert json.loads(raw) == pool[idx]


def test_manifest_refuses_a_changed_pool_config(tmp_path):
    from datasel_ray.io.rundir import ManifestMismatch

    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=30, seed=1))
    cfg, rd, _ = _ingest(info, tmp_path / "run")
    rd.start_phase(cfg, "ingest")
    changed = RunConfig.model_validate({**cfg.model_dump(), "pool": {**cfg.pool.model_dump(), "max_turns": 3}})
    with pytest.raises(ManifestMismatch, match="pool.max_turns=64.*pool.max_turns=3"):
        rd.check_phase(changed, "ingest")


def test_threaded_block_validation_keeps_record_order_and_rows(tmp_path):
    """``pool.io_threads`` validates a block's records concurrently: the shards equal those of one thread, row
    by row, in record order (no Ray: the block stage is called directly)."""
    from datasel_ray.demo import demo_config
    from datasel_ray.io.pool import list_pool_files, plan_blocks
    from datasel_ray.pipeline.ingest import IngestBlockStage, resolve_image_root

    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=300, seed=4, bad_rate=0.1))
    cfg = demo_config(tmp_path, info.pool_path, tive=False)
    tables = {}
    for threads in (1, 8):
        pool = {**cfg.pool.model_dump(), "io_threads": threads}
        rd = RunDir(str(tmp_path / f"run-{threads}"))
        stage = IngestBlockStage(pool, resolve_image_root(cfg.pool), str(rd))
        blocks = plan_blocks(list_pool_files(cfg.pool.path, cfg.pool.format), 300)
        assert len(blocks) == 1
        assert stage.process(blocks[0]) == (len(load_table(rd, "samples")), len(load_table(rd, "quarantine/ingest")))
        tables[threads] = (load_table(rd, "samples").to_pylist(), load_table(rd, "quarantine/ingest").to_pylist())
    assert tables[8] == tables[1]
    samples, quarantined = tables[8]
    assert len(quarantined) > 10 and len(samples) + len(quarantined) == 300
    ids = [r[schema.ROW_ID] for r in samples]
    assert ids == sorted(ids)
def test_an_ingest_run_with_the_local_executor_never_starts_ray(tmp_path, monkeypatch):
    from datasel_ray.demo import demo_config
    from datasel_ray.pipeline import ray_adapter
    from datasel_ray.pipeline.runner import run_phases

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_adapter, "ensure_ray", refuse)
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=80, seed=3))
    cfg = demo_config(tmp_path, info.pool_path, tive=False)
    cfg.pool.executor = "local"
    result = run_phases(cfg, ["ingest"], quiet=True)["ingest"]
    assert result["rows_in"] == 80 and result["samples"] + result["quarantined"] == 80
    assert RunDir(cfg.run_dir).phase_status("ingest") == "done"
