"""The multi-node harness itself, and a whole ``datasel run`` with pool, images and run directory on a local S3
server, on a 0-CPU head plus two worker nodes: its rows, quarantine and selections equal those of the same
config run on local disk in one local node.

Both tests share one cluster (module scope); the harness test runs first, removes a worker and adds a fresh one,
so the run test still gets two alive worker nodes of 2 CPUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster_helpers import (ingested_row_ids, local_env, manifest, quarantine_counts, read_selections,
                             run_datasel, run_driver)
from datasel_ray.schema import Reason

pytestmark = pytest.mark.integration

CLUSTER_OPTIONS = {"workers": 2, "cpus": 2}
METHODS = ["coincide", "datatailor", "random"]

_NODES = """
import json, ray
ray.init(logging_level="ERROR")  # RAY_ADDRESS names the cluster
print(json.dumps([{"id": n["NodeID"], "alive": n["Alive"], "cpus": n.get("Resources", {}).get("CPU", 0)}
                  for n in ray.nodes()]))
"""

_WAIT_DEAD = """
import json, sys, time, ray
node_id, deadline = sys.argv[1], float(sys.argv[2])
ray.init(logging_level="ERROR")  # RAY_ADDRESS names the cluster
state = None
while time.time() < deadline:
    state = {n["NodeID"]: n["Alive"] for n in ray.nodes()}.get(node_id)
    if state is False:
        break
    time.sleep(0.5)
print(json.dumps({"alive": state, "at": time.time()}))
"""


def _driver_nodes(env) -> list[dict]:
    result = run_driver(_NODES, env, timeout=120)
    assert result.rc == 0, result.tail()
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)  # ~20 s of cluster start (module fixture) + ~20 s here
def test_harness_nodes_and_removal(multinode_cluster):
    cluster = multinode_cluster
    cpus = cluster.workers[0]["num_cpus"]
    nodes = _driver_nodes(cluster.env)
    alive = [n for n in nodes if n["alive"]]
    assert sorted(n["cpus"] for n in alive) == [0, cpus, cpus], nodes
    assert {n["id"] for n in alive} == {n["node_id"] for n in cluster.nodes}
    homes = [n["home"] for n in cluster.nodes] + [cluster.env["DATASEL_HOME"]]
    assert len(set(homes)) == len(homes), "every node and the driver have a DATASEL_HOME of their own"

    removed = cluster.remove_worker(1)
    removed_at = time.time()
    result = run_driver(_WAIT_DEAD, cluster.env, timeout=90, args=(removed, str(removed_at + 30)))
    assert result.rc == 0, result.tail()
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["alive"] is False, f"node {removed} still shows as {seen['alive']} 30 s after its removal"
    print(f"removed node shown dead {seen['at'] - removed_at:.1f} s after the removal")

    # give the module's later tests their two alive workers back
    cluster.add_worker(cpus)
    assert len(cluster.alive_workers()) == 2


def _config(pool_dir: str, run_dir: str, ray: dict) -> dict:
    from datasel_ray.demo import demo_config

    data = demo_config(Path("/unused"), Path("/unused/pool.json"), tive=False, seed=5).model_dump(mode="json")
    data["run_dir"] = run_dir
    data["pool"]["path"] = f"{pool_dir}/pool.json"
    data["pool"]["image_root"] = pool_dir
    data["extract"]["max_actors"] = 2
    data["model"]["name_or_path"] = "tiny"
    data["tive"]["enabled"] = False
    data["select"]["methods"] = METHODS
    data["ray"] = ray
    return data


@pytest.mark.timeout(780)  # the two runs' own timeouts (420 + 300 s) plus the cluster's start if it runs alone
def test_object_storage_run_matches_local_run(tmp_path, s3_endpoint, multinode_cluster):
    from datasel_ray.synthetic import SynthConfig, generate_pool

    cluster = multinode_cluster
    assert len(cluster.alive_workers()) >= 2
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=300, seed=11, bad_rate=0.04))
    assert info.pool_path.name == "pool.json"
    s3_endpoint.upload_dir(info.image_root, "s3://pools/gen")
    s3_endpoint.create_bucket("runs")

    s3_data = _config("s3://pools/gen", "s3://runs/run1", {"address": cluster.address, "num_cpus": None})
    s3_cfg = tmp_path / "s3.yaml"
    s3_cfg.write_text(yaml.safe_dump(s3_data))
    local_run = str(tmp_path / "local-run")
    local_cfg = tmp_path / "local.yaml"
    local_cfg.write_text(yaml.safe_dump(_config(str(info.image_root), local_run, {"address": None, "num_cpus": 2})))

    s3_result = run_datasel(s3_cfg, cluster.env, timeout=420)  # ~125 s here (a model build by the driver in it)
    print(f"multi-node S3 run: {s3_result.seconds:.0f} s")
    assert s3_result.rc == 0, s3_result.tail()
    local_result = run_datasel(local_cfg, local_env(), timeout=300)  # ~45 s here, its own local Ray of 2 CPUs
    print(f"one-node local run: {local_result.seconds:.0f} s")
    assert local_result.rc == 0, local_result.tail()

    s3_manifest, local_manifest = manifest("s3://runs/run1", s3_endpoint), manifest(local_run)
    print("phase seconds, S3 multi-node / local one-node:",
          {p: (s3_manifest["phases"].get(p, {}).get("seconds"), local_manifest["phases"].get(p, {}).get("seconds"))
           for p in s3_data["phases"]})
    for phase in s3_data["phases"]:
        assert s3_manifest["phases"][phase]["status"] == "done", (phase, s3_manifest["phases"].get(phase))

    s3_rows, local_rows = ingested_row_ids("s3://runs/run1", s3_endpoint), ingested_row_ids(local_run)
    assert local_rows.size > 0
    np.testing.assert_array_equal(s3_rows, local_rows, err_msg="ingest kept other rows on S3")

    s3_q, local_q = quarantine_counts("s3://runs/run1", s3_endpoint), quarantine_counts(local_run)
    assert s3_q["ingest"] == local_q["ingest"], (s3_q, local_q)
    for reason in (Reason.IMAGE_CORRUPT, Reason.IMAGE_MISSING):
        assert s3_q["extract"][reason] <= local_q["extract"][reason], (
            f"extract quarantined {s3_q['extract'][reason]} rows as {reason} on S3, {local_q['extract'][reason]} "
            f"locally: {dict(s3_q['extract'])}")
    assert s3_q["extract"] == local_q["extract"], (s3_q, local_q)
    print("quarantine:", {phase: dict(counts) for phase, counts in s3_q.items()})

    s3_sel, local_sel = read_selections("s3://runs/run1", s3_endpoint), read_selections(local_run)
    assert sorted(local_sel) == sorted(METHODS) and sorted(s3_sel) == sorted(METHODS), (s3_sel.keys(), local_sel.keys())
    for method in METHODS:
        assert local_sel[method].size > 0, method
        np.testing.assert_array_equal(s3_sel[method], local_sel[method], err_msg=f"{method}: other ids on S3")
