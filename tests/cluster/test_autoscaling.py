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
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from cluster_helpers import local_env, manifest, read_selections, run_datasel, run_driver

pytestmark = pytest.mark.integration

WORKER_CPUS = 2
MAX_WORKERS = 3
IDLE_TIMEOUT_S = 15
METHODS = ["coincide", "datatailor", "random"]

_WORKERS = """
import json, sys, time, ray
ray.init(logging_level="ERROR")  # RAY_ADDRESS names the cluster
end = time.time() + float(sys.argv[1])
while True:
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    print(json.dumps({"t": time.time(), "workers": alive}), flush=True)
    if time.time() > end or (sys.argv[2] == "until-zero" and not alive):
        break
    time.sleep(1.0)
"""


def _autoscaler_config(gcs_address: str) -> dict:
    """Ray's fake multi-node example config with a 0-CPU head and one 2-CPU worker type starting at zero. The
    provider's ``gcs_address`` names the head's port (its default is 6379, which another Ray may hold)."""
    return {
        "cluster_name": "datasel-fake-multinode",
        "max_workers": MAX_WORKERS,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": WORKER_CPUS, "object_store_memory": 200_000_000},
                               "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_TIMEOUT_S / 60, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _kill_cluster(head: subprocess.Popen, workdir: str) -> None:
    """SIGKILL the head's process group and any process still naming the cluster's temp dir."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if workdir in " ".join(proc.info["cmdline"] or []):
                proc.kill()
        except psutil.Error:
            continue


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray._private.services

    from datasel_ray.ports import pick_unbound_ports

    workdir = tempfile.mkdtemp(prefix="dsa", dir="/tmp")  # short: Ray's Unix sockets live under it
    gcs_port, *ports = pick_unbound_ports(8)
    ip = ray._private.services.get_node_ip_address()
    config = Path(workdir) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(_autoscaler_config(f"{ip}:{gcs_port}")))
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--ray-client-server-port")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled",
                "DATASEL_HOME": os.path.join(workdir, "home-nodes")})
    env.pop("DATASEL_ASSUME_AUTOSCALER", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", f"--autoscaling-config={config}", "--num-cpus=0",
           f"--port={gcs_port}", f"--temp-dir={workdir}", "--include-dashboard=false",
           "--object-store-memory=200000000", *(f"{flag}={port}" for flag, port in zip(flags, ports))]
    log = open(Path(workdir) / "head.log", "wb")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver_env = {**local_env(), "RAY_ADDRESS": f"{ip}:{gcs_port}", "RAY_AUTH_MODE": "disabled"}
    driver_env.pop("DATASEL_ASSUME_AUTOSCALER", None)
    try:
        deadline = time.monotonic() + 90
        while True:
            probe = run_driver("import ray; ray.init(logging_level='ERROR'); print(len(ray.nodes()))", driver_env,
                               timeout=60)
            if probe.rc == 0:
                break
            assert head.poll() is None and time.monotonic() < deadline, \
                (Path(workdir) / "head.log").read_text()[-3000:]
            time.sleep(2)
        yield {"address": f"{ip}:{gcs_port}", "env": driver_env, "workdir": workdir}
    finally:
        _kill_cluster(head, workdir)
        log.close()
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
def test_scale_from_zero_runs_on_launched_nodes_and_scales_back(tmp_path, autoscaling_cluster):
    from datasel_ray.synthetic import SynthConfig, generate_pool

    cluster = autoscaling_cluster
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=600, seed=21, bad_rate=0.04))
    pool = info.pool_path.parent

    # what the driver sees before any worker exists: 0 CPUs, yet an autoscaler
    probe = run_driver("import json, ray; ray.init(logging_level='ERROR'); from datasel_ray.pipeline import "
                       "ray_adapter as r; print(json.dumps([r.has_autoscaler(), r.can_launch({'CPU': 1.0}), "
                       "ray.cluster_resources().get('CPU', 0)]))", cluster["env"], timeout=60)
    assert probe.rc == 0, probe.tail()
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == [True, True, 0]

    watch = subprocess.Popen([sys.executable, "-c", _WORKERS, "900", "forever"], env=cluster["env"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    timeline: list[tuple[float, int]] = []

    def read() -> None:
        for line in watch.stdout:
            if line.startswith("{"):  # Ray may log to stdout too
                sample = json.loads(line)
                timeline.append((sample["t"], len(sample["workers"])))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        cfg = tmp_path / "autoscale.yaml"
        cfg.write_text(yaml.safe_dump(_config(pool, str(tmp_path / "run"), {"address": cluster["address"],
                                                                              "num_cpus": None})))
        submitted = time.time()
        result = run_datasel(cfg, cluster["env"], timeout=600)
        assert result.rc == 0, result.tail()
    finally:
        watch.kill()
        reader.join(timeout=10)
    phases = manifest(tmp_path / "run")["phases"]
    assert all(phases[p]["status"] == "done" for p in phases), phases

    first = next(t for t, n in timeline if n >= 1) - submitted
    second = next((t for t, n in timeline if n >= 2), None)
    print(f"autoscaling run {result.seconds:.0f} s; first worker node {first:.0f} s after submit; second "
          f"{'never' if second is None else f'{second - submitted:.0f} s'}; peak {max(n for _, n in timeline)} nodes")
    assert second is not None, f"the actor pool never spread onto a second node: {timeline[-5:]}"

    # the same config on one local node: the same selections
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump(_config(pool, str(tmp_path / "local-run"), {"address": None, "num_cpus": 2})))
    reference = run_datasel(local, local_env(), timeout=300)
    assert reference.rc == 0, reference.tail()
    got, want = read_selections(tmp_path / "run"), read_selections(tmp_path / "local-run")
    assert sorted(got) == sorted(want) == sorted(METHODS)
    for method in METHODS:
        np.testing.assert_array_equal(got[method], want[method], err_msg=method)

    # the autoscaler removes the idle nodes
    idle = run_driver(_WORKERS, cluster["env"], timeout=IDLE_TIMEOUT_S + 120,
                      args=(str(IDLE_TIMEOUT_S + 90), "until-zero"))
    assert idle.rc == 0, idle.tail()
    last = json.loads([line for line in idle.stdout.splitlines() if line.startswith("{")][-1])
    assert last["workers"] == [], f"worker nodes still up {IDLE_TIMEOUT_S + 90} s after the job: {last}"
