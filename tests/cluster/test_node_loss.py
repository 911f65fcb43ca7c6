"""Node loss, lost capacity and the failure budget (#23, items 2, 3 and 5).

The cluster has the shape of the issue's deadlock: a 0-CPU head and two worker nodes of 1 CPU, two extraction
actors, so every CPU of the cluster is an actor's. Before ``extract.preprocess: auto`` put preprocessing inside
CPU actors, losing one of the nodes left the survivor's CPU held by an actor while a preprocessing task waited for
it, and the job hung with no word.

- ``test_nodes_lost_during_extract_and_aggregate``: ``datasel run`` of the standard config (19 feature shards,
  aggregate as partition tasks on the workers) with pool and run directory on S3; worker 1 is killed once the
  first feature shards exist, a fresh 1-CPU worker joins (it must load the run's model copy, never build), and
  worker 0 is killed once the manifest says aggregate is running. The run exits 0 with every phase done and the
  reference run's rows, quarantine and selections; the seconds lost against the uninterrupted S3 run of
  test_object_storage_run (same config, same cluster shape; recorded in ``s3_run_records``) are printed.
- ``test_lost_capacity_stops_with_the_stall_error``: extraction again (``--force-phase extract`` in the same run
  directory, so no second ingest), every worker killed after the first feature shard, with
  ``failures: {stall_warning_s: 5, stall_timeout_s: 30}``: the run warns, then exits 1 with the stall error
  naming the pending ``{CPU: 1}`` within the timeout plus a measured margin; the manifest on S3 records extract
  as failed (``stalled``) and ``datasel status s3://...`` prints it. The cluster is left without workers (no
  later test of this module uses it; the fixture stops it).
- ``test_failure_budget_stops_extract``: no node loss, so it runs where it costs least: ``datasel run`` in this
  process on the session's local Ray, on a local copy of the pool where one image in eight is garbage bytes
  (``pool.check_images: false`` lets them past ingest).

Health checks (``cluster_helpers.FAST_NODE_DEATH``, as in test_object_storage_run, whose run is this module's
uninterrupted baseline): ``health_check_period_ms: 1000`` (Ray's default 3000; 5 failed checks mark a node dead),
so a killed node is known dead after ~5 s instead of ~15 s. Nothing under test depends on Ray's detection time; it
only sets how long the run waits before the lost node's shards and tasks are retried elsewhere (twice in the first
test) and how soon the stall diagnosis sees the actors' requests pending. A killed raylet refuses connections at
once, so the shorter period cannot mark a live but busy node dead (each check still has Ray's default 10 s).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_helpers import (FAST_NODE_DEATH, METHODS, datasel_command, feature_shards, ingested_row_ids, manifest,
                             model_dirs_of_home, phase_status, quarantine_counts, quarantined_rows, read_selections,
                             run_process, running_step, standard_config, start_datasel, wait_until, write_config)

pytestmark = pytest.mark.integration

CLUSTER_OPTIONS = {"workers": 2, "cpus": 1, "system_config": FAST_NODE_DEATH}

STALL_WARNING_S, STALL_TIMEOUT_S = 5, 30
# How long after the last worker's removal the stalled run may take to exit, beyond stall_timeout_s: measured
# here between -16 s and +3 s (the stall clock starts at the last shard before the removal; one watch poll of
# 1.25 s; the driver's exit). Generous for a loaded CI machine, and far below the 14 minutes the job hung.
STALL_EXIT_MARGIN_S = 30


def _cluster_config(tmp_path: Path, name: str, s3_pool, cluster, overrides: dict | None = None) -> tuple[Path, str]:
    run_uri = f"s3://runs/{name}"
    data = standard_config(s3_pool.uri, run_uri, {"address": cluster.address, "num_cpus": None}, overrides)
    return write_config(tmp_path / f"{name}.yaml", data), run_uri


def _partition_step(run_uri: str, s3) -> str | None:
    """The aggregate step under way (``coincide:train-rows``, ...), else None."""
    step = running_step(run_uri, s3)
    return step if step and ":" in step else None


@pytest.mark.timeout(540)  # the run's own timeout (420 s) plus the cluster's start and the reference run
def test_nodes_lost_during_extract_and_aggregate(s3_endpoint, s3_pool, reference_run, multinode_cluster, tmp_path,
                                                 s3_run_records):
    cluster, s3 = multinode_cluster, s3_endpoint
    assert [w["index"] for w in cluster.alive_workers()] == [0, 1], cluster.nodes
    total_shards = reference_run.manifest["phases"]["extract"]["result"]["shards"]
    config, run_uri = _cluster_config(tmp_path, "nodeloss", s3_pool, cluster)

    run = start_datasel(config, cluster.env)
    try:
        # node 1 lost during extraction, once the first feature shards are written
        wait_until(lambda: feature_shards(run_uri, s3) >= 2, 240, "the first feature shards", process=run)
        cluster.remove_worker(1)
        shards_at_loss = feature_shards(run_uri, s3)
        extract_loss_at = time.monotonic() - run.started
        assert phase_status(run_uri, "extract", s3) == "running" and shards_at_loss < total_shards, (
            f"extraction was over before worker 1 was removed ({shards_at_loss}/{total_shards} shards)")
        replacement = cluster.add_worker(1)
        print(f"\nworker 1 removed {extract_loss_at:.0f} s into the run, with {shards_at_loss}/{total_shards} "
              f"feature shards written; worker {replacement['index']} added")

        # node 0 lost during aggregate, once its first partition step is under way (aggregate.executor ray: the
        # step's tasks run on the workers; ~10 partitions of 64 KiB per step, a step lasts several seconds)
        wait_until(lambda: phase_status(run_uri, "aggregate", s3) == "running", 300, "aggregate running",
                   interval=0.2, process=run)
        aggregate_seen = time.monotonic()
        step = wait_until(lambda: _partition_step(run_uri, s3), 120, "an aggregate partition step under way",
                          interval=0.2, process=run)
        cluster.remove_worker(0)
        aggregate_loss_after = time.monotonic() - aggregate_seen
        assert phase_status(run_uri, "aggregate", s3) == "running", "aggregate ended before worker 0 was removed"
        result = run.wait(timeout=420 - (time.monotonic() - run.started))
    finally:
        run.wait(0)  # kills it if an assertion above stopped the test
    print(f"worker 0 removed {aggregate_loss_after:.1f} s into aggregate, during its step {step}")
    assert result.rc == 0, result.tail()

    m = manifest(run_uri, s3)
    phases = {p: m["phases"].get(p, {}).get("seconds") for p in reference_run.config["phases"]}
    for phase in reference_run.config["phases"]:
        assert m["phases"][phase]["status"] == "done", (phase, m["phases"].get(phase))
    assert aggregate_loss_after < phases["aggregate"], "worker 0 was removed after aggregate's end"
    uninterrupted = s3_run_records.get("uninterrupted")
    if uninterrupted:
        lost = {p: round(phases[p] - uninterrupted["phases"][p], 1) for p in phases}
        print(f"node-loss run: {result.seconds:.0f} s, {result.seconds - uninterrupted['seconds']:+.0f} s against "
              f"the uninterrupted S3 run ({uninterrupted['seconds']:.0f} s, same config and cluster shape); "
              f"per phase: {lost}")
    else:
        print(f"node-loss run: {result.seconds:.0f} s, phases {phases} (no uninterrupted S3 run in this session: "
              f"run tests/cluster as a whole for the seconds lost)")

    np.testing.assert_array_equal(ingested_row_ids(run_uri, s3), reference_run.rows)
    assert quarantined_rows(run_uri, s3) == reference_run.quarantined, (
        quarantine_counts(run_uri, s3), reference_run.quarantine)
    selections = read_selections(run_uri, s3)
    assert sorted(selections) == sorted(METHODS), selections.keys()
    for method in METHODS:
        np.testing.assert_array_equal(selections[method], reference_run.selections[method],
                                      err_msg=f"{method}: other ids after losing two nodes")

    # the node that joined mid-run loaded the run's model copy; no node built one
    sha = m["model_copy"]["sha256"]
    homes = {n["index"]: model_dirs_of_home(n["home"]) for n in cluster.refresh() if n["index"] is not None}
    print("model folders of the workers' DATASEL_HOMEs:", homes)
    for index, held in homes.items():
        assert held["builds"] == [] and set(held["copies"]) <= {sha}, (index, held)
    joined = homes[replacement["index"]]
    # its actor loads the run's copy; whether the download finished before extraction ended is a race the run
    # may win or lose (the pool ends the actor with the phase), so a partial download of that copy counts too
    assert joined["copies"] == [sha] or joined["partial"] == [sha[:12]], (
        f"the worker that joined mid-run ran no extraction actor (no model copy in its home): {homes}")


@pytest.mark.timeout(300)
def test_lost_capacity_stops_with_the_stall_error(s3_endpoint, s3_pool, multinode_cluster, tmp_path):
    cluster, s3 = multinode_cluster, s3_endpoint
    while len(cluster.alive_workers()) < 2:  # the shape again: two 1-CPU workers, two actors
        cluster.add_worker(1)
    # extraction again in the node-loss run's directory: its ingest is done (skipped), so extraction starts at
    # once (alone, this test makes the run directory from scratch, ingest included)
    config, run_uri = _cluster_config(
        tmp_path, "nodeloss", s3_pool, cluster,
        {"failures": {"stall_warning_s": STALL_WARNING_S, "stall_timeout_s": STALL_TIMEOUT_S}})

    before = manifest(run_uri, s3).get("phases", {}).get("extract", {}).get("started")

    def restarted_shards() -> int:  # feature shards of this run's extraction (the old ones are deleted first)
        entry = manifest(run_uri, s3).get("phases", {}).get("extract", {})
        fresh = entry.get("status") == "running" and entry.get("started") != before
        return feature_shards(run_uri, s3) if fresh else 0

    # not --quiet: the stall warnings go to stderr
    run = start_datasel(config, cluster.env, args=("--force-phase", "extract"))
    try:
        wait_until(lambda: restarted_shards() >= 1, 240, "the first feature shard", process=run)
        for worker in cluster.alive_workers():
            cluster.remove_worker(worker["index"])
        removed_at = time.monotonic()
        shards_at_loss = feature_shards(run_uri, s3)
        result = run.wait(timeout=STALL_TIMEOUT_S + 2 * STALL_EXIT_MARGIN_S)
    finally:
        run.wait(0)
    exit_after = run.started + result.seconds - removed_at
    print(f"\nevery worker removed with {shards_at_loss} feature shards written; the run exited rc={result.rc} "
          f"{exit_after:.1f} s later (stall_timeout_s={STALL_TIMEOUT_S}: "
          f"{exit_after - STALL_TIMEOUT_S:+.1f} s beyond it; allowed {STALL_EXIT_MARGIN_S} s)")
    assert result.rc == 1, result.tail()
    assert exit_after <= STALL_TIMEOUT_S + STALL_EXIT_MARGIN_S, result.tail()

    err = result.stderr
    warning = re.search(r"\[extract\] no progress for (\d+)s: pending resource requests: (.*?); free: .*; "
                        r"nodes alive: (\d+), lost: (\d+); no autoscaler can add capacity", err)
    assert warning, result.tail()
    assert int(warning.group(1)) < STALL_TIMEOUT_S, "no warning before the timeout"
    error = re.search(r"error: \[extract\] no progress for (\d+)s: pending resource requests: (.*?); .*"
                      rf"Stopped after failures.stall_timeout_s={STALL_TIMEOUT_S}s", err)
    assert error, result.tail()
    assert int(error.group(1)) >= STALL_TIMEOUT_S, error.group(0)
    assert "{CPU: 1}" in error.group(2), error.group(0)
    print("stall error:", error.group(0)[:400])

    extract = manifest(run_uri, s3)["phases"]["extract"]
    assert extract["status"] == "failed", extract
    assert extract["error"]["kind"] == "stalled", extract
    assert f"Stopped after failures.stall_timeout_s={STALL_TIMEOUT_S}s" in extract["error"]["message"], extract

    status = run_process(datasel_command("status", run_uri), cluster.env, timeout=120)
    assert status.rc == 0, status.tail()
    assert re.search(r"extract\s+failed", status.stdout), status.stdout
    assert "stalled: [extract] no progress for" in status.stdout, status.stdout
    assert "{CPU: 1}" in status.stdout, status.stdout


@pytest.mark.timeout(300)
def test_failure_budget_stops_extract(generated_pool, ray_local, tmp_path, capsys):
    """More than failures.max_quarantine_fraction (5%) of the rows fail in extraction, for a reason that is each
    row's own (undecodable bytes): extract stops with the top reasons; run exits 1; manifest and status say so."""
    from datasel_ray.cli import main
    from datasel_ray.status import render_status

    pool = tmp_path / "pool"
    shutil.copytree(generated_pool.image_root, pool)
    images = sorted(pool.rglob("*.png"))
    corrupt = images[::8]
    for path in corrupt:
        path.write_bytes(b"not a png " * 40)
    min_rows = 100
    data = standard_config(pool, tmp_path / "run", {"address": None, "num_cpus": 2},
                           {"pool": {"check_images": False}, "failures": {"min_rows": min_rows}})
    config = write_config(tmp_path / "budget.yaml", data)

    started = time.monotonic()
    rc = main(["run", "--config", str(config), "--quiet"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    print(f"\nfailure-budget run: rc={rc} after {seconds:.0f} s; {len(corrupt)} of {len(images)} images garbage")
    assert rc == 1, err[-3000:]
    head = re.search(r"error: extract: (\d+) of (\d+) rows quarantined \(([\d.]+)%\), more than "
                     r"failures.max_quarantine_fraction=0.05", err)
    assert head, err[-3000:]
    failed, seen = int(head.group(1)), int(head.group(2))
    assert seen >= min_rows and failed > 0.05 * seen, head.group(0)
    top = re.search(r"  image_corrupt: (\d+) rows, e\.g\. (.*)", err)
    assert top, err[-3000:]
    # the reasons are counted over quarantine/extract/ when the error is made, which may hold a shard or two more
    # than the header's count (shards written by actors and not yet reported to the driver)
    assert int(top.group(1)) > 0.05 * seen, top.group(0)
    named = [p for p in corrupt if str(p.relative_to(pool)) in top.group(2)]
    assert named, f"the example message names none of the garbage images: {top.group(0)}"
    print("budget error:", err[err.index("error:"):][:600])

    run_dir = data["run_dir"]
    extract = manifest(run_dir)["phases"]["extract"]
    assert extract["status"] == "failed" and extract["error"]["kind"] == "failure_budget", extract
    assert "image_corrupt:" in extract["error"]["message"], extract
    assert quarantine_counts(run_dir)["extract"]["image_corrupt"] >= int(top.group(1)) > 0
    assert manifest(run_dir)["phases"].get("aggregate") is None, "aggregate ran after extract failed"
    status = render_status(run_dir)
    assert re.search(r"extract\s+failed", status) and "failure_budget: extract:" in status, status
