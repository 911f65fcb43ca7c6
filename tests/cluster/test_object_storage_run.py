"""The multi-node harness itself, and a whole ``datasel run`` with pool, images and run directory on a local S3
server, on a 0-CPU head plus two worker nodes of 1 CPU: its rows, quarantine and selections equal those of the
session's one-node local reference run of the same config (``reference_run``), and the run builds its model once.

The cluster has the shape of the issue's deadlock (two 1-CPU workers, two extraction actors: every CPU is an
actor's), so this run is also the uninterrupted counterpart of test_node_loss's run: its seconds are left in
``s3_run_records`` for that module. Both tests share one cluster (module scope); the harness test runs first,
removes a worker and adds a fresh one, so the run test still gets two alive worker nodes, one of which joined
after the cluster started. Node health checks every second (``cluster_helpers.FAST_NODE_DEATH``, as in
test_node_loss): a removed node is known dead after ~5 s instead of ~15 s.

One model build per run: the driver uses the session's DATASEL_HOME (its ``tiny`` build cached across test
sessions), publishes the content-addressed copy to ``<run_dir>/model/<sha256>/``; the test checks the manifest's
``model_copy`` and that no node's DATASEL_HOME holds a build, only (at most) that copy under ``models/<sha256>``.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from cluster_helpers import (FAST_NODE_DEATH, METHODS, RUNS_BUCKET, ingested_row_ids, manifest, model_dirs_of_home,
                             quarantine_counts, quarantined_rows, read_selections, run_datasel, run_driver,
                             standard_config, write_config)
from datasel_ray.schema import Reason

pytestmark = pytest.mark.integration

CLUSTER_OPTIONS = {"workers": 2, "cpus": 1, "system_config": FAST_NODE_DEATH}

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
    # ~5 s with FAST_NODE_DEATH's checks every second (Ray's default of every 3 s: 14.7-15 s measured here)
    print(f"removed node shown dead {seen['at'] - removed_at:.1f} s after the removal")

    # give the module's later tests their two alive workers back
    cluster.add_worker(cpus)
    assert len(cluster.alive_workers()) == 2


@pytest.mark.timeout(480)  # the run's own timeout (300 s) plus the cluster's start and the reference run (~50-70 s)
def test_object_storage_run_matches_local_run(s3_endpoint, s3_pool, reference_run, multinode_cluster, tmp_path,
                                              s3_run_records):
    cluster = multinode_cluster
    assert len(cluster.alive_workers()) >= 2
    run_uri = f"s3://{RUNS_BUCKET}/run1"
    data = standard_config(s3_pool.uri, run_uri, {"address": cluster.address, "num_cpus": None})
    result = run_datasel(write_config(tmp_path / "s3.yaml", data), cluster.env, timeout=300)  # 107-155 s here
    print(f"multi-node S3 run: {result.seconds:.0f} s (one-node local reference: {reference_run.seconds:.0f} s)")
    assert result.rc == 0, result.tail()

    s3_manifest = manifest(run_uri, s3_endpoint)
    phases = {p: s3_manifest["phases"].get(p, {}).get("seconds") for p in data["phases"]}
    print("phase seconds, S3 multi-node / local one-node:",
          {p: (phases[p], reference_run.manifest["phases"].get(p, {}).get("seconds")) for p in data["phases"]})
    for phase in data["phases"]:
        assert s3_manifest["phases"][phase]["status"] == "done", (phase, s3_manifest["phases"].get(phase))

    s3_rows = ingested_row_ids(run_uri, s3_endpoint)
    np.testing.assert_array_equal(s3_rows, reference_run.rows, err_msg="ingest kept other rows on S3")

    s3_q = quarantine_counts(run_uri, s3_endpoint)
    for reason in (Reason.IMAGE_CORRUPT, Reason.IMAGE_MISSING):
        assert s3_q["extract"][reason] <= reference_run.quarantine["extract"][reason], (
            f"extract quarantined {s3_q['extract'][reason]} rows as {reason} on S3, "
            f"{reference_run.quarantine['extract'][reason]} locally: {dict(s3_q['extract'])}")
    assert quarantined_rows(run_uri, s3_endpoint) == reference_run.quarantined, (s3_q, reference_run.quarantine)
    print("quarantine:", {phase: dict(counts) for phase, counts in s3_q.items()})

    s3_sel = read_selections(run_uri, s3_endpoint)
    assert sorted(s3_sel) == sorted(METHODS), s3_sel.keys()
    for method in METHODS:
        np.testing.assert_array_equal(s3_sel[method], reference_run.selections[method],
                                      err_msg=f"{method}: other ids on S3")

    # One model build per run: the driver resolved the model (from the session's cache) and published one
    # content-addressed copy under the run directory; every node downloaded that copy and none built one.
    copy = s3_manifest.get("model_copy") or {}
    assert copy.get("sha256") and copy.get("uri") == f"{run_uri}/model/{copy['sha256']}", copy
    assert s3_endpoint.location(copy["uri"]).list(recursive=True), f"no files at {copy['uri']}"
    homes = {f"worker {n['index']}" if n["index"] is not None else "head": model_dirs_of_home(n["home"])
             for n in cluster.refresh()}
    print("model folders of the nodes' DATASEL_HOMEs:", homes)
    for node, held in homes.items():
        assert held["builds"] == [], f"{node} built the model itself: {held}"
        assert set(held["copies"]) <= {copy["sha256"]}, f"{node} holds another model copy than the run's: {held}"
    loaded = [node for node, held in homes.items() if held["copies"]]
    assert loaded, f"no node downloaded the run's model copy {copy['sha256']}: {homes}"

    s3_run_records["uninterrupted"] = {"seconds": result.seconds, "phases": phases, "cluster": CLUSTER_OPTIONS,
                                       "run_dir": run_uri}
