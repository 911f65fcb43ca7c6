"""Paths on any pyarrow filesystem: local paths and URIs such as ``s3://bucket/run`` or ``gs://...``.

Every phase reads and writes through :class:`Location`, so a run directory or a pool can live on object
storage. Writes are atomic: local files are written to a temporary name and renamed; object stores
publish an object only when its upload completes.

Object-store options come from the environment of the process that parses a URI, so the driver and every Ray
worker (on any node) build the same filesystem: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (an S3-compatible
endpoint such as ``http://minio:9000``; its scheme picks http or https), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (else the AWS SDK's default chain:
profile, instance role), ``DATASEL_STORAGE_ANONYMOUS=1`` (unsigned requests, S3 and GCS) and
``DATASEL_STORAGE_CONNECT_TIMEOUT_S`` / ``DATASEL_STORAGE_REQUEST_TIMEOUT_S`` / ``DATASEL_STORAGE_MAX_ATTEMPTS``.
:func:`storage_environment` turns the ``storage`` config section into these variables. One filesystem is built
per process and set of options (:func:`clear_filesystem_cache` forgets them).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import posixpath
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasel_ray.io import vectors  # noqa: F401  (registers the vector column type before any parquet read)

if TYPE_CHECKING:
    from datasel_ray.config import StorageConfig

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # first one set wins
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
ANONYMOUS_ENV = "DATASEL_STORAGE_ANONYMOUS"
CONNECT_TIMEOUT_ENV = "DATASEL_STORAGE_CONNECT_TIMEOUT_S"
REQUEST_TIMEOUT_ENV = "DATASEL_STORAGE_REQUEST_TIMEOUT_S"
MAX_ATTEMPTS_ENV = "DATASEL_STORAGE_MAX_ATTEMPTS"
# Defaults: an unreachable endpoint fails within seconds (a refused connection at once) instead of the SDK's
# long retry loops; a stalled response is given up after REQUEST_TIMEOUT_S. GCS retries for RETRY_TIME_LIMIT_S.
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
RETRY_TIME_LIMIT_S = 60.0
DEFAULT_S3_REGION = "us-east-1"  # with an endpoint and no region: S3-compatible servers accept any

_S3_SCHEMES = ("s3",)
_GCS_SCHEMES = ("gs", "gcs")


class StorageError(RuntimeError):
    """An I/O failure that is not a row's fault: the store is unreachable, refuses the credentials or the
    permissions, times out, a package is missing, memory ran out. It stops a phase (never a quarantined row)
    and makes the scorer answer 503. ``uri``: what was being accessed. Build one with :meth:`wrap`."""

    def __init__(self, message: str, uri: str = ""):
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):  # crosses Ray process boundaries intact
        return type(self), (str(self), self.uri)

    @classmethod
    def wrap(cls, uri: str, err: BaseException, doing: str = "read") -> "StorageError":
        """A StorageError for ``err`` raised while ``doing`` ``uri``; the message names the URI, the cause and
        what to check."""
        if isinstance(err, StorageError):
            return err
        return cls(f"cannot {doing} {uri}: {type(err).__name__}: {err}. {_advice(uri, err)}", uri)


def _advice(uri: str, err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "Out of memory: give the workers more memory or run fewer of them per node."
    if isinstance(err, ImportError):
        return f"A package is missing: install {err.name or 'it'} in every node's environment."
    scheme = uri.split("://", 1)[0].lower() if _is_uri(uri) else ""
    if scheme in _S3_SCHEMES:
        endpoint = _first_env(ENDPOINT_ENV)
        where = f"endpoint {endpoint}" if endpoint else "AWS's own endpoint (no AWS_ENDPOINT_URL set)"
        return (f"This is a storage problem, not the row's: check that {where} is reachable from this node "
                f"(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, storage.endpoint_url), the region (AWS_REGION, "
                f"storage.region), the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or "
                f"storage.anonymous for a public bucket) and the permissions on the object.")
    if scheme in _GCS_SCHEMES:
        return ("This is a storage problem, not the row's: check the network to GCS from this node, the "
                "credentials (GOOGLE_APPLICATION_CREDENTIALS, or storage.anonymous for a public bucket) and the "
                "permissions on the object.")
    return ("This is a storage problem, not the row's: check that the path is readable by this process on every "
            "node (permissions, mounts).")


def _is_uri(path: str) -> bool:
    return "://" in path


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a number of seconds") from None


def _anonymous() -> bool:
    return os.environ.get(ANONYMOUS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_BUCKET_REGIONS: dict[str, str] = {}
_LOCK = threading.Lock()


def clear_filesystem_cache() -> None:
    """Forget the filesystems (and resolved bucket regions) built so far; the next parse builds new ones."""
    with _LOCK:
        _FILESYSTEMS.clear()
        _BUCKET_REGIONS.clear()


def _cached(key: tuple, build: Callable[[], pafs.FileSystem]) -> pafs.FileSystem:
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = build()
        return fs


def _timeouts() -> tuple[float, float, int]:
    attempts = int(_env_float(MAX_ATTEMPTS_ENV, MAX_ATTEMPTS))
    if attempts < 1:
        raise ValueError(f"{MAX_ATTEMPTS_ENV}={attempts}: expected at least 1")
    return _env_float(CONNECT_TIMEOUT_ENV, CONNECT_TIMEOUT_S), _env_float(REQUEST_TIMEOUT_ENV, REQUEST_TIMEOUT_S), attempts


def _split_endpoint(url: str) -> tuple[str, str]:
    """``http://host:9000`` -> (``host:9000``, ``http``); a bare ``host:9000`` means https."""
    if "://" not in url:
        return url.rstrip("/"), "https"
    parts = urlsplit(url)
    return parts.netloc, parts.scheme or "https"


def _bucket_region(bucket: str) -> str:
    with _LOCK:
        region = _BUCKET_REGIONS.get(bucket)
    if region is None:
        try:
            region = pafs.resolve_s3_region(bucket)
        except Exception as err:
            raise StorageError(f"cannot find the region of bucket s3://{bucket}: {type(err).__name__}: {err}. Set "
                               f"AWS_REGION (storage.region), or AWS_ENDPOINT_URL (storage.endpoint_url) for an "
                               f"S3-compatible store.", f"s3://{bucket}") from err
        with _LOCK:
            _BUCKET_REGIONS[bucket] = region
    return region


def s3_filesystem(bucket: str = "") -> pafs.S3FileSystem:
    """The process's S3 filesystem for the options in the environment (see the module docstring). Without a
    region or an endpoint, the bucket's region is looked up once per process (one request)."""
    endpoint = _first_env(ENDPOINT_ENV)
    region = _first_env(REGION_ENV) or (DEFAULT_S3_REGION if endpoint or not bucket else _bucket_region(bucket))
    anonymous = _anonymous()
    access, secret, token = (os.environ.get(n) or None for n in
                             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    keys = None if anonymous or not (access and secret) else (access, secret, token)
    connect, request, attempts = _timeouts()
    fingerprint = hashlib.sha256(repr(keys).encode()).hexdigest() if keys else None

    def build() -> pafs.S3FileSystem:
        options: dict[str, Any] = dict(region=region, anonymous=anonymous, connect_timeout=connect,
                                       request_timeout=request,
                                       retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts))
        if endpoint:
            options["endpoint_override"], options["scheme"] = _split_endpoint(endpoint)
        if keys:
            options.update(access_key=keys[0], secret_key=keys[1], session_token=keys[2])
        return pafs.S3FileSystem(**options)

    return _cached(("s3", endpoint, region, anonymous, fingerprint, connect, request, attempts), build)


def gcs_filesystem() -> pafs.FileSystem:
    """The process's GCS filesystem (``DATASEL_STORAGE_ANONYMOUS`` honoured; credentials from the environment)."""
    anonymous = _anonymous()

    def build() -> pafs.FileSystem:
        return pafs.GcsFileSystem(anonymous=anonymous,
                                  retry_time_limit=datetime.timedelta(seconds=RETRY_TIME_LIMIT_S))

    return _cached(("gs", anonymous, RETRY_TIME_LIMIT_S), build)


def storage_environment(cfg: "StorageConfig") -> dict[str, str]:
    """The environment variables that ``cfg`` (the ``storage`` config section) stands for; unset options give
    none, so the process's own environment decides. Pass them to every Ray worker (``runtime_env``)."""
    env: dict[str, str] = {}
    if cfg.endpoint_url:
        env.update({"AWS_ENDPOINT_URL": cfg.endpoint_url, "AWS_ENDPOINT_URL_S3": cfg.endpoint_url})
    if cfg.region:
        env.update({"AWS_REGION": cfg.region, "AWS_DEFAULT_REGION": cfg.region})
    if cfg.anonymous:
        env[ANONYMOUS_ENV] = "1"
    return env


# Non-secret settings a driver passes on to its workers; credentials are never forwarded (they would show in the
# job's runtime environment): nodes take them from their own environment or instance role.
FORWARDED_ENV = (*ENDPOINT_ENV, *REGION_ENV, ANONYMOUS_ENV, CONNECT_TIMEOUT_ENV, REQUEST_TIMEOUT_ENV, MAX_ATTEMPTS_ENV)


def worker_environment(cfg: "StorageConfig") -> dict[str, str]:
    """What every worker of this driver needs to reach the same storage: the non-secret storage variables set in
    this process (:data:`FORWARDED_ENV`) overridden by the config's options."""
    return {**{n: os.environ[n] for n in FORWARDED_ENV if os.environ.get(n)}, **storage_environment(cfg)}


def apply_storage_options(cfg: "StorageConfig") -> dict[str, str]:
    """Set :func:`storage_environment` of ``cfg`` in this process's ``os.environ``; returns the variables set.
    The cached filesystems are forgotten only when a variable changed (they were built from the old values)."""
    env = storage_environment(cfg)
    if any(os.environ.get(name) != value for name, value in env.items()):
        os.environ.update(env)
        clear_filesystem_cache()
    return env


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it. ``str(loc)`` gives back the user-facing form."""

    fs: pafs.FileSystem
    path: str
    uri_prefix: str = ""

    @classmethod
    def parse(cls, path_or_uri: str | Path) -> "Location":
        """A local path, ``file://``, ``s3://bucket/key`` or ``gs://bucket/key`` (filesystems from the
        environment's options, cached per process), or any other URI pyarrow's ``FileSystem.from_uri`` knows."""
        text = str(path_or_uri)
        if not text:
            raise ValueError("path must not be empty")
        if _is_uri(text) and not text.startswith("file://"):
            scheme, rest = text.split("://", 1)
            if "?" not in rest and scheme.lower() in _S3_SCHEMES + _GCS_SCHEMES:
                bucket = rest.split("/", 1)[0]
                fs = s3_filesystem(bucket) if scheme.lower() in _S3_SCHEMES else gcs_filesystem()
                return cls(fs, rest.rstrip("/"), f"{scheme}://")
            fs, path = pafs.FileSystem.from_uri(text)  # other schemes, or options in the URI's query
            return cls(fs, path.rstrip("/"), f"{scheme}://")
        if text.startswith("file://"):
            text = text[len("file://"):]
        return cls(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return f"{self.uri_prefix}{self.path}"

    def __truediv__(self, name: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, name), self.uri_prefix)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path), self.uri_prefix)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size or 0

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def list(self, suffix: str = "", recursive: bool = False) -> list["Location"]:
        """Files directly under this directory (or below it), sorted by path; [] if it does not exist."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
        return [Location(self.fs, p, self.uri_prefix) for p in paths]

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input(self):
        return self.fs.open_input_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Write ``data`` atomically (readers see the old file or the whole new one)."""
        self.write_with(lambda f: f.write(data))

    def write_with(self, write: Callable[[Any], Any]) -> None:
        """``write(f)`` into a binary file object, atomically where local (a temporary file renamed into place):
        streams the content instead of building it in memory first."""
        self.parent.mkdir()
        if self.is_local:
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                write(f)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self):
        return json.loads(self.read_text())

    def write_parquet(self, table: pa.Table, row_group_rows: int | None = None) -> None:
        """Write a parquet file atomically; ``row_group_rows`` bounds the rows per row group (readers of a row
        range decode only the groups it touches, see :meth:`read_parquet_rows`). Vector columns are stored
        uncompressed (float noise does not compress; zstd would only cost time), the rest with zstd. Only
        string columns are dictionary-encoded: a dictionary of per-row numbers (ids, scores) is as large as the
        column and its hash table costs the writer ~100 bytes per row."""
        compression = {f.name: "none" if isinstance(f.type, vectors.VectorType) else "zstd" for f in table.schema}
        dictionary = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                      or pa.types.is_dictionary(f.type)]
        self.write_with(lambda f: pq.write_table(table, f, compression=compression or "zstd", use_dictionary=dictionary,
                                                 row_group_size=row_group_rows))

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def read_parquet_rows(self, offset: int, count: int, columns: list[str] | None = None) -> pa.Table:
        """Rows ``[offset, offset + count)`` of a parquet file, reading only the row groups they fall in."""
        with self.open_input() as handle:
            reader = pq.ParquetFile(handle)
            groups, first, start = [], None, 0
            for g in range(reader.metadata.num_row_groups):
                rows = reader.metadata.row_group(g).num_rows
                if start + rows > offset and start < offset + count:
                    groups.append(g)
                    first = start if first is None else first
                start += rows
            if not groups:
                return reader.schema_arrow.empty_table().select(columns or reader.schema_arrow.names)
            table = reader.read_row_groups(groups, columns=columns)
        return table.slice(offset - first, count)

    def write_npy(self, array) -> None:
        import numpy as np

        self.write_with(lambda f: np.save(f, array, allow_pickle=False))

    def read_npy(self, mmap: bool = False):
        """The array of a ``.npy`` file; ``mmap``: memory-mapped read-only where the file is local (rows are
        then read from disk only when indexed)."""
        import numpy as np

        if mmap and self.is_local:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.load(io.BytesIO(self.read_bytes()), allow_pickle=False)

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)


def read_parquet_dir(loc: Location, columns: list[str] | None = None) -> pa.Table | None:
    """Concatenate every ``*.parquet`` file under ``loc`` in path order; None when there is none."""
    files = loc.list(".parquet")
    if not files:
        return None
    tables = [f.read_parquet(columns) for f in files]
    return pa.concat_tables(tables, promote_options="default")
