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
from typing import Callable

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

# The generated pool every module uses (conftest's ``generated_pool`` / ``s3_pool``) and where it is uploaded.
POOL_SAMPLES, POOL_SEED, POOL_BAD_RATE = 300, 11, 0.04
POOL_URI = "s3://pools/gen"
RUNS_BUCKET = "runs"
METHODS = ["coincide", "datatailor", "random"]
# Ray ``_system_config`` of the head: node health checks every second instead of every 3 s (5 failed checks mark
# a node dead), so a killed node is known dead after ~5 s instead of ~15 s. What the tests check never depends on
# that delay; it only sets how long a run waits before the lost node's work is retried elsewhere. A killed raylet
# refuses connections at once; a live, busy one still has Ray's default 10 s to answer each check.
FAST_NODE_DEATH = {"health_check_period_ms": 1000}


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
            "AWS_ENDPOINT_URL_S3": self.url,  # wins over AWS_ENDPOINT_URL in every S3 client: never another server
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


class RunningProcess:
    """A command started in a new session whose stdout and stderr go to files; the test acts while it runs
    (``stderr_text()`` reads what it has written so far) and ends it with :meth:`wait`."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | Path = REPO):
        self._dir = tempfile.TemporaryDirectory(prefix="dsproc")
        self._out_path = Path(self._dir.name) / "stdout"
        self._err_path = Path(self._dir.name) / "stderr"
        with open(self._out_path, "wb") as out, open(self._err_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        self.result: RunResult | None = None

    def poll(self) -> int | None:
        return self.proc.poll()

    def stdout_text(self) -> str:
        return self._out_path.read_bytes().decode(errors="replace")

    def stderr_text(self) -> str:
        return self._err_path.read_bytes().decode(errors="replace")

    def wait(self, timeout: float) -> RunResult:
        """Wait up to ``timeout`` seconds (counted from now); then kill its whole process group (a local Ray it
        started included, or the whole command at the timeout: ``rc`` None). Idempotent."""
        if self.result is not None:
            return self.result
        try:
            rc = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            rc = None
        ended = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of its own group (or the whole run at the timeout)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.result = RunResult(rc, self.stdout_text(), self.stderr_text(), ended - self.started)
        self._dir.cleanup()
        return self.result

    def tail(self, chars: int = 3000) -> str:
        if self.result is not None:
            return self.result.tail(chars)
        return (f"running for {time.monotonic() - self.started:.0f} s (rc={self.poll()})\n--- stderr so far\n"
                f"{self.stderr_text()[-chars:]}")


def run_process(cmd: list[str], env: dict[str, str], timeout: float, cwd: str | Path = REPO) -> RunResult:
    """Run ``cmd`` in a new session; at ``timeout`` its whole process group (a local Ray it started included) is
    killed and ``rc`` is None."""
    return RunningProcess(cmd, env, cwd).wait(timeout)


def datasel_command(*args: str) -> list[str]:
    """``datasel ARGS...`` as ``python -m datasel_ray.cli`` of this interpreter."""
    return [sys.executable, "-m", "datasel_ray.cli", *args]


def start_datasel(config_path: str | Path, env: dict[str, str],
                  args: tuple[str, ...] = ("--quiet",)) -> RunningProcess:
    """``datasel run --config CONFIG`` started in the background (end it with ``.wait(timeout)``)."""
    return RunningProcess(datasel_command("run", "--config", str(config_path), *args), env)


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.25,
               process: RunningProcess | None = None) -> object:
    """Call ``condition`` every ``interval`` seconds until it returns something true (returned); raise
    AssertionError naming ``what`` at ``timeout``, or at once when ``process`` has exited meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {process.wait(0).tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}"
                                 + (f"\n{process.tail()}" if process is not None else ""))
        time.sleep(interval)


def run_datasel(config_path: str | Path, env: dict[str, str], timeout: float = 600,
                args: tuple[str, ...] = ("--quiet",)) -> RunResult:
    """``datasel run --config CONFIG`` (as ``python -m datasel_ray.cli``) with ``env``, killed at ``timeout``."""
    return run_process(datasel_command("run", "--config", str(config_path), *args), env, timeout)


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


# --- the standard config ------------------------------------------------------------------------------------

def standard_config(pool_dir: str | Path, run_dir: str | Path, ray: dict | None = None,
                    overrides: dict | None = None) -> dict:
    """The run config every cluster module uses (as a dict, for YAML), with the pool at ``pool_dir`` (its
    ``pool.json`` and images: a local folder or ``s3://...``) and the run directory ``run_dir``.

    The demo config (seed 5, tiny model, no TIVE, budget 20%) with COINCIDE, DataTailor and random selection,
    ``extract.min_actors`` = ``max_actors`` = 2 (a fixed pool: with ``min_actors: 1`` Ray Data may run the whole
    phase on one actor, and a worker node that joins mid-run then never gets one), ``extract.shard_rows: 16``
    (about 19 feature shards of the 300-row pool, so a node removed during extraction finds shards still to do),
    and ``aggregate.executor: ray`` with the smallest
    ``aggregate.partition_bytes`` (partition tasks on the worker nodes, so a node removed during aggregate
    loses running tasks; ``datatailor.dense_max_rows: 200`` so that a dense task fits such a partition). None
    of these changes a result (extract's micro-batches are the same 8 rows whatever the shard size; aggregate
    is the same partitioned or not; every task of this pool is below 200 rows), so the one-node local
    reference run of this config (conftest's ``reference_run``, aggregating in-process) is the one every module
    compares with. ``ray``: the config's ``ray`` section (default: the cluster named by RAY_ADDRESS).
    ``overrides``: nested sections merged on top.
    """
    from datasel_ray.config import merge_dicts
    from datasel_ray.demo import demo_config

    data = demo_config(Path("/unused"), Path("/unused/pool.json"), tive=False, seed=5).model_dump(mode="json")
    pool_dir = str(pool_dir).rstrip("/")
    data["run_dir"] = str(run_dir)
    data["pool"]["path"] = f"{pool_dir}/pool.json"
    data["pool"]["image_root"] = pool_dir
    data["extract"]["min_actors"] = data["extract"]["max_actors"] = 2
    data["extract"]["shard_rows"] = 16
    data["aggregate"]["executor"] = "ray"
    data["aggregate"]["partition_bytes"] = 1 << 16  # AggregateConfig's minimum
    # a dense DataTailor task must fit one partition: 200 rows x 264 bytes does (the pool's largest task has
    # fewer rows, so every task is clustered densely as with the default of 4000)
    data["datatailor"]["dense_max_rows"] = 200
    data["model"]["name_or_path"] = "tiny"
    data["tive"]["enabled"] = False
    data["select"]["methods"] = list(METHODS)
    data["ray"] = ray if ray is not None else {"address": None, "num_cpus": None}
    return merge_dicts(data, overrides or {})


def write_config(path: str | Path, data: dict) -> Path:
    import yaml

    Path(path).write_text(yaml.safe_dump(data))
    return Path(path)


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


def quarantined_rows(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> dict[str, list[tuple]]:
    """``{phase: sorted [(row_id, reason)]}`` of ``quarantine/<phase>/`` for ingest and extract."""
    root = run_location(run_dir, s3)
    out: dict[str, list[tuple]] = {}
    for phase, dirs in PHASE_DIRS.items():
        for sub in dirs:
            if sub.startswith("quarantine/"):
                table = read_parquet_dir(root / sub, [schema.ROW_ID, schema.REASON])
                out[phase] = sorted(zip(table.column(schema.ROW_ID).to_pylist(),
                                        table.column(schema.REASON).to_pylist())) if table is not None else []
    return out


def manifest(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> dict:
    loc = run_location(run_dir, s3) / "manifest.json"
    return loc.read_json() if loc.exists() else {}


def phase_status(run_dir: str | Path | Location, phase: str, s3: S3Endpoint | None = None) -> str | None:
    """The manifest's status of ``phase`` (None before the manifest or the phase entry exists); a manifest
    caught mid-write reads as None too."""
    try:
        return manifest(run_dir, s3).get("phases", {}).get(phase, {}).get("status")
    except (OSError, ValueError):
        return None


def running_step(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> str | None:
    """The step ``progress.json`` says is under way and unfinished (a phase, or an aggregate step such as
    ``coincide:train-rows``, whose partition tasks run on the cluster), else None."""
    loc = run_location(run_dir, s3) / "progress.json"
    try:
        state = loc.read_json() if loc.exists() else {}
    except (OSError, ValueError):
        return None
    current = state.get("current")
    entry = state.get(current) if current else None
    return current if isinstance(entry, dict) and not entry.get("finished") else None


def feature_shards(run_dir: str | Path | Location, s3: S3Endpoint | None = None) -> int:
    """How many ``features/*.parquet`` shards the run has written so far."""
    return len((run_location(run_dir, s3) / "features").list(".parquet"))


# --- model builds on the nodes -----------------------------------------------------------------------------------

def model_dirs_of_home(home: str | Path) -> dict[str, list[str]]:
    """What a node's DATASEL_HOME holds of models: ``builds`` (every ``tiny-llava-v1`` folder below it: a build),
    ``copies`` (the names under ``models/``: downloaded copies, by sha256), ``partial`` (downloads a worker began
    and did not finish: an extraction actor the pool ended, or one on a node that was stopped, mid-download)."""
    home = Path(home)
    builds = sorted(str(p.relative_to(home)) for p in home.rglob("tiny-llava-v1"))
    models = home / "models"
    names = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
    return {"builds": builds, "copies": [n for n in names if not n.startswith(".")],
            "partial": [n.split("-")[2] for n in names if n.startswith(".partial-")]}
