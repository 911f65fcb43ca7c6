"""``datasel run`` submitted through the Ray Jobs API to a head started with ``ray start --head`` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from datasel_ray.io.rundir import RunDir
from datasel_ray.ports import pick_unbound_ports

pytestmark = pytest.mark.integration  # a second Ray head and a submitted job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head():
    """A separate single-node Ray cluster with a dashboard (Jobs API); stopped (its process group) afterwards."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port")
    # every port explicit: another Ray on this machine (the session's) holds the defaults
    gcs_port, dash_port, *others = pick_unbound_ports(2 + len(flags))
    ports = {flag: str(port) for flag, port in zip(flags, others)}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Unix socket paths under it must stay short
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
         "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir,
         *[item for pair in ports.items() for item in pair]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 180
    client = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address)
            client.list_jobs()
            break
        except Exception:
            client = None
            time.sleep(1)
    try:
        assert client is not None, "the Ray head's Jobs API did not come up"
        yield client
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_when_ready(client, **kwargs) -> str:
    """Submit once the head's job agent is up (a fresh head answers 500 'No available agent' for a while)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def test_run_submitted_as_a_ray_job(tmp_path, ray_head):
    from ray.job_submission import JobStatus

    from datasel_ray.demo import demo_config
    from datasel_ray.synthetic import SynthConfig, generate_pool

    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=120, seed=6))
    cfg = demo_config(tmp_path, info.pool_path, tive=False).model_dump(mode="json")
    cfg["phases"] = ["ingest", "extract", "aggregate", "select"]
    cfg["ray"] = {"address": None, "num_cpus": None}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    job_id = _submit_when_ready(
        ray_head, entrypoint=f"{sys.executable} -m datasel_ray.cli run --config {cfg_path} --quiet",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "benchmarks/results"],
                     "env_vars": {"DATASEL_HOME": os.environ["DATASEL_HOME"]}})
    deadline = time.monotonic() + 600
    status = ray_head.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(2)
        status = ray_head.get_job_status(job_id)
    logs = ray_head.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    run_dir = RunDir(cfg["run_dir"])
    manifest = run_dir.load_manifest()
    assert all(manifest["phases"][p]["status"] == "done" for p in cfg["phases"])
    samples = manifest["phases"]["ingest"]["result"]["samples"]
    budget = round(cfg["select"]["budget"] * samples)
    for method in cfg["select"]["methods"]:
        ids = (run_dir / "selections" / method / "selected_ids.npy").read_npy()
        assert 0 < ids.size <= budget and np.all(np.diff(ids) > 0)
        assert (run_dir / "selections" / method / "summary.json").read_json()["budget_rows"] == budget
    assert (run_dir / "selections" / "random" / "selected_ids.npy").read_npy().size == budget
