"""Fixtures of the multi-node and object-storage tests (all ``integration``).

``s3_endpoint`` (session): moto's S3 server on 127.0.0.1 in a subprocess. ``multinode_cluster`` (module): a
``ray.cluster_utils.Cluster`` (0-CPU head, worker nodes of their own DATASEL_HOME) that ``harness.py`` runs in a
process of its own, so the session's in-process Ray is never touched. A module sizes its cluster with
``CLUSTER_OPTIONS = {"workers": 3, "cpus": 1}`` (keyword arguments of :func:`harness.start_cluster`).
Helpers to run ``datasel run`` and to read a run directory live in ``cluster_helpers.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from cluster_helpers import S3Endpoint, start_s3_server
from harness import ClusterHandle, start_cluster


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


@pytest.fixture(scope="module")
def multinode_cluster(request, s3_endpoint) -> ClusterHandle:
    """A head with 0 CPUs and (by default) two worker nodes of 2 logical CPUs, each node with its own
    DATASEL_HOME, the S3 variables in every node's environment. ``.address``, ``.env`` (RAY_ADDRESS, the S3
    variables and a DATASEL_HOME of the driver's own), ``.remove_worker(i)``, ``.add_worker(cpus)``,
    ``.nodes``, ``.stop()``."""
    options = {"workers": 2, "cpus": 2, **getattr(request.module, "CLUSTER_OPTIONS", {})}
    workdir = tempfile.mkdtemp(prefix="dsc", dir="/tmp")  # short: Ray's Unix sockets live under it
    base = {**os.environ, **s3_endpoint.env}
    cluster = start_cluster(workdir, base, **options)
    driver_home = os.path.join(workdir, "home-driver")
    os.makedirs(driver_home)
    cluster.env = {**base, "RAY_ADDRESS": cluster.address, "DATASEL_HOME": driver_home}
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
