"""Node-level autoscaling for real: Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``) behind a 0-CPU head,
one worker node type of 2 CPUs with ``min_workers: 0``, the usual shape of a KubeRay or launcher cluster whose
workers start at zero.

``datasel run`` is accepted without ``DATASEL_ASSUME_AUTOSCALER`` (the autoscaler monitor's report in the GCS
names the configured node types), the autoscaler launches worker nodes for ingest and extraction, the job
completes with the selections of the same config run on one local node, and the nodes are removed after their
idle timeout.

``ray.cluster_utils.AutoscalingCluster.start()`` runs ``ray stop --force``, which would end every Ray process of
the machine (this test session's own Ray included), so the head is started here with ``ray start --head`` in a
process group of its own, with its own ports and temp dir, and stopped by that group and the processes under
its temp dir. The fake provider starts worker nodes inside the head's monitor process: they inherit its
environment and share its DATASEL_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster_helpers import local_env, manifest, read_selections, run_datasel, run_driver
from harness import start_autoscaling_head

pytestmark = pytest.mark.integration

WORKER_CPUS = 2
MAX_WORKERS = 3
IDLE_TIMEOUT_S = 15
METHODS = ["coincide", "datatailor", "random"]


@pytest.fixture(scope="module")
def autoscaling_head():
    workdir = tempfile.mkdtemp(prefix="dsa", dir="/tmp")  # short: Ray's Unix sockets live under it
    env = local_env(extra={"DATASEL_HOME": os.path.join(workdir, "home-nodes")})
    head = start_autoscaling_head(Path(workdir) / "head", env, worker_cpus=WORKER_CPUS, max_workers=MAX_WORKERS,
                                  idle_timeout_s=IDLE_TIMEOUT_S)
    head.driver_env["DATASEL_HOME"] = os.environ["DATASEL_HOME"]  # the driver's machine has the model cached
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _config(pool: Path, run_dir: str, ray: dict) -> dict:
    from datasel_ray.demo import demo_config

    data = demo_config(Path("/unused"), pool / "pool.json", tive=False, seed=5).model_dump(mode="json")
    data["run_dir"] = run_dir
    data["pool"]["image_root"] = str(pool)
    # three actors of 1 CPU from the start: more than one 2-CPU node holds, so the pool must span two nodes
    data["extract"].update({"min_actors": 3, "max_actors": 3, "shard_rows": 32})
    data["select"]["methods"] = METHODS
    data["ray"] = ray
    return data


@pytest.mark.timeout(900)
def test_scale_from_zero_runs_on_launched_nodes_and_scales_back(tmp_path, autoscaling_head):
    from datasel_ray.synthetic import SynthConfig, generate_pool

    head = autoscaling_head
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=600, seed=21, bad_rate=0.04))
    pool = info.pool_path.parent

    # what the driver sees before any worker exists: 0 CPUs, yet an autoscaler
    probe = run_driver("import json, ray; ray.init(logging_level='ERROR'); from datasel_ray.pipeline import "
                       "ray_adapter as r; print(json.dumps([r.has_autoscaler(), r.can_launch({'CPU': 1.0}), "
                       "ray.cluster_resources().get('CPU', 0)]))", head.driver_env, timeout=60)
    assert probe.rc == 0, probe.tail()
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [True, True, 0]

    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=head.watch_workers, args=(timeline, stop), daemon=True)
    watcher.start()
    try:
        cfg = tmp_path / "autoscale.yaml"
        cfg.write_text(yaml.safe_dump(_config(pool, str(tmp_path / "run"), {"address": head.address,
                                                                              "num_cpus": None})))
        submitted = time.time()
        result = run_datasel(cfg, head.driver_env, timeout=600)
        assert result.rc == 0, result.tail()
        phases = manifest(tmp_path / "run")["phases"]
        assert all(phases[p]["status"] == "done" for p in phases), phases
        assert timeline, "the worker-node watcher recorded nothing (it could not join the cluster)"
        first = next((t for t, n in timeline if n >= 1), None)
        assert first is not None, f"no worker node was ever launched: {timeline[-5:]}"
        first -= submitted
        second = next((t for t, n in timeline if n >= 2), None)
        print(f"autoscaling run {result.seconds:.0f} s; first worker node {first:.0f} s after submit; second "
              f"{'never' if second is None else f'{second - submitted:.0f} s'}; peak "
              f"{max(n for _, n in timeline)} nodes")
        assert second is not None, f"the actor pool never spread onto a second node: {timeline[-5:]}"

        # the same config on one local node: the same selections
        local = tmp_path / "local.yaml"
        local.write_text(yaml.safe_dump(_config(pool, str(tmp_path / "local-run"), {"address": None,
                                                                                     "num_cpus": 2})))
        reference = run_datasel(local, local_env(), timeout=300)
        assert reference.rc == 0, reference.tail()
        got, want = read_selections(tmp_path / "run"), read_selections(tmp_path / "local-run")
        assert sorted(got) == sorted(want) == sorted(METHODS)
        for method in METHODS:
            np.testing.assert_array_equal(got[method], want[method], err_msg=method)

        # the autoscaler removes the idle nodes
        deadline = time.time() + IDLE_TIMEOUT_S + 90
        while time.time() < deadline and (not timeline or timeline[-1][1] > 0):
            time.sleep(1)
        assert timeline[-1][1] == 0, f"worker nodes still up {IDLE_TIMEOUT_S + 90} s after the job: {timeline[-3:]}"
        print(f"worker nodes removed {timeline[-1][0] - submitted - result.seconds:.0f} s after the job ended")
    finally:
        stop.set()
