"""``datasel status``: a failed phase shows its cause; a running phase shows the stall diagnosis (no Ray)."""

from __future__ import annotations

from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.failures import FailureBudgetExceeded
from datasel_ray.status import render_status


def test_failed_phase_shows_kind_and_message(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    run_dir = RunDir(cfg.run_dir)
    run_dir.init(cfg)
    run_dir.start_phase(cfg, "ingest")
    run_dir.finish_phase("ingest", 3.0, result={})
    run_dir.start_phase(cfg, "extract")
    run_dir.fail_phase("extract", 12.5, FailureBudgetExceeded("extract: 40 of 500 rows quarantined (8.0%)\n"
                                                             "  image_corrupt: 40 rows, e.g. broken"))
    entry = run_dir.load_manifest()["phases"]["extract"]
    assert entry["status"] == "failed" and entry["error"]["kind"] == "failure_budget"
    text = render_status(cfg.run_dir)
    assert "  extract    failed       12.5s" in text
    assert "    failure_budget: extract: 40 of 500 rows quarantined (8.0%)" in text
    assert "      image_corrupt: 40 rows, e.g. broken" in text
    # a later success clears the error
    run_dir.start_phase(cfg, "extract")
    run_dir.finish_phase("extract", 20.0, result={})
    assert "error" not in run_dir.load_manifest()["phases"]["extract"]
    assert "failure_budget" not in render_status(cfg.run_dir)


def test_running_phase_shows_the_stall(tmp_path):
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    run_dir = RunDir(cfg.run_dir)
    run_dir.init(cfg)
    run_dir.start_phase(cfg, "extract")
    (run_dir / "progress.json").write_json({"extract": {
        "phase": "extract", "done": 64, "total": 300, "resumed": 0, "unit": "rows", "rows_per_second": 1.0,
        "eta_seconds": None, "elapsed_seconds": 90, "finished": False, "updated": 0,
        "stall": {"message": "[extract] no progress for 61s: pending resource requests: 1 x {CPU: 1}", "updated": 0}}})
    text = render_status(cfg.run_dir)
    assert "64/300 rows" in text
    assert "    [extract] no progress for 61s: pending resource requests: 1 x {CPU: 1}" in text
