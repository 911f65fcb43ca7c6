"""Helpers of the multi-node / object-storage tests: the local S3 server, ``datasel run`` in a subprocess, and
readers of a run directory's ingest rows, quarantine counts and selections (through ``io.storage.Location``).

Imported by ``tests/cluster/conftest.py`` (fixtures) and by the test modules (``from cluster_helpers import ...``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from datasel_ray import schema
from datasel_ray.io import layout
from datasel_ray.io.rundir import PHASE_DIRS
from datasel_ray.io.storage import Location, read_parquet_dir
from datasel_ray.ports import pick_unbound_ports

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY = SECRET_KEY = "testing"
REGION = "us-east-1"


# --- S3 ----------------------------------------------------------------------------------------------------------

@dataclass
class S3Endpoint:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint every process reaches). ``env``: the variables that
    make pyarrow's ``s3://`` paths of another process point at it."""

    host: str
    port: int
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # no metadata-service probes for credentials
        }

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def filesystem(self) -> pafs.S3FileSystem:
        """A pyarrow filesystem on this server, configured explicitly (this process's environment is left alone)."""
        return pafs.S3FileSystem(endpoint_override=f"{self.host}:{self.port}", scheme="http", access_key=ACCESS_KEY,
                                 secret_key=SECRET_KEY, region=REGION, allow_bucket_creation=True,
                                 allow_bucket_deletion=True)

    def location(self, uri: str) -> Location:
        """``s3://bucket/key`` as a :class:`Location` on this server."""
        if not uri.startswith("s3://"):
            raise ValueError(f"expected an s3:// URI, got {uri!r}")
        return Location(self.filesystem(), uri[len("s3://"):].rstrip("/"), "s3://")

    def create_bucket(self, name: str) -> None:
        fs = self.filesystem()
        if fs.get_file_info(name).type == pafs.FileType.NotFound:
            fs.create_dir(name)

    def upload_dir(self, local: str | Path, uri: str) -> int:
        """Copy the folder ``local`` to ``s3://bucket/prefix`` (the bucket is created if needed); returns the
        number of files uploaded."""
        dest = self.location(uri)
        self.create_bucket(dest.path.split("/", 1)[0])
        pafs.copy_files(str(Path(local).resolve()), dest.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest.fs, use_threads=True)
        return sum(1 for p in Path(local).rglob("*") if p.is_file())

    def reset(self) -> None:
        """Forget every bucket (moto's reset API)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=30)

    def stop(self) -> None:
        """End the server process: close its stdin, then SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        for end in (None, self.proc.terminate, self.proc.kill):
            if end is not None and self.proc.poll() is None:
                end()
            try:
                self.proc.wait(timeout=10)
                return
            except subprocess.TimeoutExpired:
                continue


# moto's server in a thread of a child process that ends when its stdin closes: when the test process goes away,
# however it ends, the server goes too (``python -m moto.server`` would outlive a killed pytest).
_MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address=sys.argv[1], port=int(sys.argv[2]), verbose=False)
server.start()
sys.stdin.read()
server.stop()
"""


def start_s3_server(log_path: Path | None = None, timeout: float = 60) -> S3Endpoint:
    """moto's S3 server on a free port of 127.0.0.1 in a subprocess; returns once it answers HTTP."""
    port = pick_unbound_ports(1)[0]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-c", _MOTO, "127.0.0.1", str(port)], stdin=subprocess.PIPE,
                                stdout=log, stderr=log, start_new_session=True)
    finally:
        if log_path:
            log.close()
    endpoint = S3Endpoint("127.0.0.1", port, proc)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint.url}/", timeout=5).read()
            return endpoint
        except urllib.error.HTTPError:
            return endpoint  # it answered
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                endpoint.stop()
                raise RuntimeError(f"moto's S3 server did not come up on {endpoint.url} (rc={proc.poll()})")
            time.sleep(0.3)


# --- processes ---------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    rc: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    def tail(self, chars: int = 4000) -> str:
        return f"rc={self.rc} after {self.seconds:.0f} s\n--- stdout\n{self.stdout[-chars:]}\n--- stderr\n" \
               f"{self.stderr[-chars:]}"


def run_process(cmd: list[str], env: dict[str, str], timeout: float, cwd: str | Path = REPO) -> RunResult:
    """Run ``cmd`` in a new session; at ``timeout`` its whole process group (a local Ray it started included) is
    killed and ``rc`` is None."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of its own group (or the whole run at the timeout)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return RunResult(rc, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                         time.monotonic() - started)


def run_datasel(config_path: str | Path, env: dict[str, str], timeout: float = 600,
                args: tuple[str, ...] = ("--quiet",)) -> RunResult:
    """``datasel run --config CONFIG`` (as ``python -m datasel_ray.cli``) with ``env``, killed at ``timeout``."""
    return run_process([sys.executable, "-m", "datasel_ray.cli", "run", "--config", str(config_path), *args],
                       env, timeout)


def run_driver(code: str, env: dict[str, str], timeout: float = 120, args: tuple[str, ...] = ()) -> RunResult:
    """``python -c CODE ARGS...`` with ``env`` (a Ray driver of the cluster when env has RAY_ADDRESS)."""
    return run_process([sys.executable, "-c", code, *args], env, timeout)


def local_env(home: str | Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a ``datasel run`` that starts its own local Ray: no RAY_ADDRESS (never the session's Ray);
    DATASEL_HOME ``home``, default the session's (tests/conftest.py: its built models are cached there)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra or {})
    if home is not None:
        env["DATASEL_HOME"] = str(home)
    return env


# --- run directory readers ---------------------------------------------------------------------------------------

def run_location(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> Location:
    """A run directory as a Location: ``s3://`` URIs on ``s3`` (this process has no AWS_* variables), local
    paths and other URIs as ``Location.parse`` reads them."""
    if isinstance(run_dir, Location):
        return run_dir
    text = str(run_dir)
    if text.startswith("s3://") and s3 is not None:
        return s3.location(text)
    return Location.parse(text)


def read_selections(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> dict[str, np.ndarray]:
    """``{method: selected row ids}`` of every method with ``selections/<method>/selected_ids.npy``."""
    root = run_location(run_dir, s3) / layout.SELECTIONS
    return {f.parent.name: f.read_npy() for f in root.list(layout.SELECTED_IDS, recursive=True)
            if f.name == layout.SELECTED_IDS}


def ingested_row_ids(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> np.ndarray:
    """Sorted row ids of ``samples/`` (the rows ingest kept)."""
    samples_dir = PHASE_DIRS["ingest"][0]
    table = read_parquet_dir(run_location(run_dir, s3) / samples_dir, [schema.ROW_ID])
    return np.sort(table.column(schema.ROW_ID).to_numpy()) if table is not None else np.array([], np.int64)


def quarantine_counts(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> dict[str, Counter]:
    """``{phase: Counter(reason -> rows)}`` of ``quarantine/<phase>/`` for ingest and extract."""
    root = run_location(run_dir, s3)
    out: dict[str, Counter] = {}
    for phase, dirs in PHASE_DIRS.items():
        for sub in dirs:
            if sub.startswith("quarantine/"):
                table = read_parquet_dir(root / sub, ["reason"])
                out[phase] = Counter(table.column("reason").to_pylist()) if table is not None else Counter()
    return out


def manifest(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> dict:
    loc = run_location(run_dir, s3) / "manifest.json"
    return loc.read_json() if loc.exists() else {}
