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


def test_the_summary_names_the_model_it_came_from():
    from datasel_ray.demo import render_summary
    from datasel_ray.models.identity import model_identity

    summary = {"run_dir": "runs/demo/run", "model": "tiny", "model_identity": model_identity("tiny"),
               "rows_in": 10, "samples": 9, "quarantined_by_reason": {"invalid_json": 1}, "features_written": 9,
               "extract_failed": 0, "seconds_per_phase": {"ingest": 1.0}, "selections": {},
               "pool_quality": {"selected": 9, "duplicate_rate": 0.0, "noise_rate": 0.0, "task_coverage": 1.0}}
    lines = render_summary(summary).splitlines()
    assert summary["model_identity"].startswith("tiny:") and len(summary["model_identity"]) == len("tiny:") + 16
    assert lines[1] == (f"model: tiny ({summary['model_identity']}; selections repeat bit for bit only on the same "
                        f"machine with the same model build)")
