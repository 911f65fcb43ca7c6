"""Fixtures of the multi-node and object-storage tests (all ``integration``).

Session scope, shared by every module:

- ``s3_endpoint``: moto's S3 server on 127.0.0.1 in a subprocess.
- ``generated_pool``: the 300-row generated pool on local disk (``cluster_helpers.POOL_*``); ``s3_pool``: the same
  folder uploaded once to ``s3://pools/gen`` (bucket ``runs`` created for run directories).
- ``reference_run``: the one-node local run of :func:`cluster_helpers.standard_config` on that pool, in this
  process on the session's Ray (``ray_local``, 2 CPUs), aggregate in-process; every module compares its
  selections, ingested rows and quarantine with it.
- ``s3_run_records``: a dict where a module leaves what later modules compare with (``"uninterrupted"``: the
  uninterrupted multi-node S3 run of test_object_storage_run, for the node-loss test's seconds lost).

Module scope: ``multinode_cluster``, a ``ray.cluster_utils.Cluster`` (0-CPU head, worker nodes of their own
DATASEL_HOME) that ``harness.py`` runs in a process of its own, so the session's in-process Ray is never touched.
A module sizes its cluster with ``CLUSTER_OPTIONS = {"workers": 3, "cpus": 1}`` (keyword arguments of
:func:`harness.start_cluster`). The driver of a cluster run uses the session's DATASEL_HOME (tests/conftest.py:
built models cached across test sessions), so no module spends a model build; the worker nodes never build.

test_node_loss.py runs after the other modules of this folder (:func:`pytest_collection_modifyitems`): it kills
nodes, and it reports the seconds its interrupted run lost against the uninterrupted run recorded before it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cluster_helpers import (POOL_BAD_RATE, POOL_SAMPLES, POOL_SEED, POOL_URI, RUNS_BUCKET, S3Endpoint,
                             ingested_row_ids, manifest, quarantine_counts, quarantined_rows, read_selections,
                             standard_config, start_s3_server, write_config)
from harness import ClusterHandle, start_cluster

LAST_MODULES = ("test_node_loss.py",)


def pytest_collection_modifyitems(config, items):
    """The modules of LAST_MODULES run after every other test (their order otherwise kept)."""
    last = [item for item in items if item.path.name in LAST_MODULES]
    if last:
        items[:] = [item for item in items if item.path.name not in LAST_MODULES] + last


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> S3Endpoint:
    """moto's S3 server (``python -m moto.server``) on a free port of 127.0.0.1; ``.env`` holds AWS_ENDPOINT_URL,
    AWS_ACCESS_KEY_ID/SECRET (``testing``) and AWS_REGION for subprocesses. This process's environment is not
    changed: read ``s3://`` here through ``s3_endpoint.location(uri)`` / ``.filesystem()``."""
    endpoint = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield endpoint
    finally:
        endpoint.stop()


@pytest.fixture(scope="session")
def generated_pool(tmp_path_factory):
    """The generated pool (POOL_SAMPLES rows, 4% bad rows of every kind) on local disk: a ``PoolInfo``."""
    from datasel_ray.synthetic import SynthConfig, generate_pool

    info = generate_pool(tmp_path_factory.mktemp("pool") / "gen",
                         SynthConfig(num_samples=POOL_SAMPLES, seed=POOL_SEED, bad_rate=POOL_BAD_RATE))
    assert info.pool_path.name == "pool.json" and info.pool_path.parent == info.image_root
    return info


@dataclass
class S3Pool:
    uri: str  # s3://pools/gen: pool.json and the images under it
    local: Path  # the local folder it was uploaded from
    files: int


@pytest.fixture(scope="session")
def s3_pool(s3_endpoint, generated_pool) -> S3Pool:
    """``generated_pool`` uploaded once to ``s3://pools/gen``; the ``runs`` bucket exists for run directories."""
    files = s3_endpoint.upload_dir(generated_pool.image_root, POOL_URI)
    s3_endpoint.create_bucket(RUNS_BUCKET)
    return S3Pool(POOL_URI, Path(generated_pool.image_root), files)


@dataclass
class ReferenceRun:
    """What the one-node local run of the standard config gave."""

    run_dir: str
    config: dict
    seconds: float
    rows: np.ndarray  # row ids ingest kept
    quarantined: dict  # {phase: sorted [(row_id, reason)]}
    quarantine: dict  # {phase: Counter(reason -> rows)}
    selections: dict  # {method: selected ids}
    manifest: dict = field(repr=False, default_factory=dict)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, generated_pool, ray_local) -> ReferenceRun:
    """:func:`standard_config` on ``generated_pool`` on local disk, run by ``run_phases`` in this process on the
    session's local Ray (one node of 2 CPUs): 47-77 s here, no Ray start when the session has one already."""
    from datasel_ray.config import RunConfig
    from datasel_ray.pipeline.runner import run_phases

    workdir = tmp_path_factory.mktemp("reference")
    # aggregate in this process (the same statistics and selections as partition tasks, by contract; the cluster
    # runs use Ray tasks, so every comparison checks that contract too): ~15 s less than Ray Data's groupby here
    data = standard_config(generated_pool.image_root, workdir / "run", ray={"address": None, "num_cpus": 2},
                           overrides={"aggregate": {"executor": "local"}})
    write_config(workdir / "reference.yaml", data)
    started = time.monotonic()
    run_phases(RunConfig.model_validate(data), quiet=True)
    seconds = time.monotonic() - started
    run_dir = data["run_dir"]
    ref = ReferenceRun(run_dir, data, seconds, ingested_row_ids(run_dir), quarantined_rows(run_dir),
                       quarantine_counts(run_dir), read_selections(run_dir), manifest(run_dir))
    print(f"\none-node local reference run: {seconds:.0f} s; quarantine "
          f"{ {phase: dict(counts) for phase, counts in ref.quarantine.items()} }")
    assert ref.rows.size > 0 and all(ref.selections.get(m) is not None and ref.selections[m].size > 0
                                     for m in data["select"]["methods"]), ref
    return ref


@pytest.fixture(scope="session")
def s3_run_records() -> dict:
    """What one module leaves for a later one: ``{"uninterrupted": {"seconds", "phases": {phase: seconds},
    "cluster": CLUSTER_OPTIONS}}`` once test_object_storage_run's S3 run passed."""
    return {}


@pytest.fixture(scope="module")
def multinode_cluster(request, s3_endpoint) -> ClusterHandle:
    """A head with 0 CPUs and (by default) two worker nodes of 2 logical CPUs, each node with its own
    DATASEL_HOME, the S3 variables in every node's environment. ``.address``, ``.env`` (RAY_ADDRESS, the S3
    variables and the session's DATASEL_HOME for the driver: its cached model build), ``.remove_worker(i)``,
    ``.add_worker(cpus)``, ``.nodes``, ``.stop()``."""
    options = {"workers": 2, "cpus": 2, **getattr(request.module, "CLUSTER_OPTIONS", {})}
    workdir = tempfile.mkdtemp(prefix="dsc", dir="/tmp")  # short: Ray's Unix sockets live under it
    # no S3 setting of this process (another test's server, a developer's profile) may reach the cluster
    base = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DATASEL_STORAGE_"))},
            **s3_endpoint.env}
    cluster = start_cluster(workdir, base, **options)
    # the driver's DATASEL_HOME: the session's (tests/conftest.py sets it before anything starts), whose built
    # models persist across sessions; the nodes have homes of their own (harness.py)
    cluster.env = {**base, "RAY_ADDRESS": cluster.address, "DATASEL_HOME": os.environ["DATASEL_HOME"]}
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
