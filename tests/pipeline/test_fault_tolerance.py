"""A killed extraction worker is restarted and its shard retried: the result equals an uninterrupted run."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import psutil
import pytest

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.synthetic import SynthConfig, generate_pool

pytestmark = pytest.mark.integration  # kills extraction worker processes of the session's Ray


def _config(tmp_path, name, pool_path) -> RunConfig:
    from datasel_ray.demo import demo_config

    data = demo_config(tmp_path, pool_path, tive=False).model_dump(mode="json")
    data["run_dir"] = str(tmp_path / name)
    data["extract"].update({"shard_rows": 8, "batch_size": 4})
    data["select"]["methods"] = ["coincide", "datatailor", "random"]
    return RunConfig.model_validate(data)


def _extract_workers() -> list[psutil.Process]:
    """Extraction actor processes of this test session's Ray (descendants of this process), never another's."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ShardExtractStage" in cmd and "ray::" in cmd:
            found.append(proc)
    return found


def _kill_worker_after_first_shard(run_dir: RunDir, killed: list[int]) -> None:
    features = run_dir / "features"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if features.list(".parquet"):
            for proc in _extract_workers():
                proc.kill()
                killed.append(proc.pid)
            if killed:
                return
        time.sleep(0.1)


def test_killed_extraction_worker_gives_identical_selections(tmp_path, ray_local):
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=200, seed=9))
    clean = _config(tmp_path, "clean", info.pool_path)
    faulty = _config(tmp_path, "faulty", info.pool_path)
    phases = ["ingest", "extract", "aggregate", "select"]
    run_phases(clean, phases, quiet=True)

    killed: list[int] = []
    killer = threading.Thread(target=_kill_worker_after_first_shard, args=(RunDir(faulty.run_dir), killed))
    killer.start()
    run_phases(faulty, phases, quiet=True)
    killer.join()
    assert killed, "no extraction worker was found to kill"

    assert load_table(RunDir(clean.run_dir), "features").equals(load_table(RunDir(faulty.run_dir), "features"))
    for method in clean.select.methods:
        a = (RunDir(clean.run_dir) / "selections" / method / "selected_ids.npy").read_bytes()
        b = (RunDir(faulty.run_dir) / "selections" / method / "selected_ids.npy").read_bytes()
        assert a == b, f"{method}: selections differ after a worker was killed"
        sa = (RunDir(clean.run_dir) / "selections" / method / "scores.parquet").read_parquet()
        sb = (RunDir(faulty.run_dir) / "selections" / method / "scores.parquet").read_parquet()
        assert sa.column_names == sb.column_names
        for name in sa.column_names:  # NaN-aware: degenerate DataTailor clusters have NaN uniqueness
            np.testing.assert_array_equal(column_to_numpy(sa.column(name)), column_to_numpy(sb.column(name)),
                                          err_msg=f"{method}.{name}")
    assert np.load((RunDir(clean.run_dir) / "selections" / "coincide" / "selected_ids.npy").path).size > 0
    assert schema.ROW_ID in load_table(RunDir(faulty.run_dir), "features").column_names
