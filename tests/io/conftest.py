"""An S3-compatible server for the storage tests: moto's (real S3 protocol over HTTP) on 127.0.0.1.

``s3_server`` (session): the endpoint URL. ``s3_env``: the standard AWS variables pointing at it, set with
monkeypatch for one test. ``s3_bucket``: a fresh bucket on it, as ``s3://<name>``.
"""

from __future__ import annotations

import uuid

import pytest

S3_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "DATASEL_STORAGE_ANONYMOUS")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server in a thread of this process, on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    from datasel_ray.ports import pick_unbound_ports

    port = pick_unbound_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_ENDPOINT_URL, AWS_REGION and test credentials for ``s3_server`` in ``os.environ`` (other S3 variables
    unset); the filesystem cache is cleared before and after."""
    from datasel_ray.io import storage

    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage.clear_filesystem_cache()
    yield s3_server
    storage.clear_filesystem_cache()


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A new, empty bucket on the server; returns ``s3://<bucket>``."""
    import pyarrow.fs as pafs

    name = f"test-{uuid.uuid4().hex[:12]}"
    host = s3_env.split("://", 1)[1]
    pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1", access_key="testing",
                      secret_key="testing", allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
