"""The demo starts its own run directory afresh when it no longer matches (e.g. after an upgrade)."""

from __future__ import annotations

from pathlib import Path

from datasel_ray.config import RunConfig
from datasel_ray.demo import demo_config, reset_stale_run
from datasel_ray.io.rundir import RunDir


def test_a_stale_demo_run_is_reset_and_a_matching_one_kept(tmp_path):
    cfg = demo_config(tmp_path, tmp_path / "pool" / "pool.json", tive=False, seed=0)
    run_dir = RunDir(cfg.run_dir)
    run_dir.init(cfg)
    run_dir.start_phase(cfg, "ingest")
    run_dir.finish_phase("ingest", 1.0)
    assert reset_stale_run(cfg) is None
    assert Path(cfg.run_dir, "manifest.json").exists()

    changed = RunConfig.model_validate({**cfg.model_dump(), "pool": {**cfg.pool.model_dump(), "max_turns": 3}})
    message = reset_stale_run(changed)
    assert message is not None and "pool.max_turns" in message and "'ingest'" in message
    assert not Path(cfg.run_dir).exists()
