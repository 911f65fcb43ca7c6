"""One reference-model copy per run, content-addressed, that every worker loads and checks (``model.shared``).

The driver resolves the model once (:func:`share_model`: builds a built model such as ``tiny`` or
``smol-llava``, or takes a local checkpoint), hashes its files (sha256 over every file's relative path and
bytes) and publishes the folder to ``<store>/<sha256>/`` on the run's storage: ``model.store`` when set (for
example ``s3://bucket/models``, shared by runs), else ``<run_dir>/model`` when the run directory is on object
storage, else the local folder itself (one machine: nothing to copy). The run manifest records
``model_copy: {uri, sha256, identity}`` and the config every stage receives carries ``model.shared``.

Every loader (extraction actors, preprocessing tasks, the warm-up workers, serve replicas) goes through
:func:`local_model_dir`: a local copy is hashed and used; a remote one is downloaded once per node into
``$DATASEL_HOME/models/<sha256>`` (atomically, verified before it is renamed into place). A copy whose hash is not
the recorded one is refused with :class:`ModelCopyMismatch`; no worker ever builds a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from datasel_ray.io.storage import Location

log = logging.getLogger(__name__)

MARKER = "_datasel_model.json"  # written last into a published copy: its presence means the copy is complete
_CHUNK = 1 << 22
_PARTIAL = ".partial-"  # prefix of a download in progress under $DATASEL_HOME/models: .partial-<pid>-<sha256[:12]>-<random>
_verified: dict[tuple[str, str], str] = {}  # (local dir, sha256) -> dir, hashed once per process


class ModelCopyMismatch(RuntimeError):
    """A model copy whose files do not hash to the sha256 the run recorded."""


def _files(root: Location) -> list[Location]:
    return [f for f in root.list(recursive=True) if f.name != MARKER and not f.name.startswith(".")]


def folder_sha256(root: str | Location) -> str:
    """sha256 over every file below ``root`` (its path relative to ``root`` and its bytes, in path order);
    the marker file and dot files are left out."""
    root = root if isinstance(root, Location) else Location.parse(root)
    digest = hashlib.sha256()
    prefix = root.path.rstrip("/") + "/"
    for f in _files(root):
        rel = f.path[len(prefix):]
        digest.update(json.dumps([rel, f.size()]).encode())
        with f.fs.open_input_stream(f.path) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def publish(local_dir: str, store: Location, sha: str | None = None) -> Location:
    """Copy ``local_dir`` to ``store/<sha256>/`` unless a complete copy is there; returns that location.
    ``sha``: the folder's :func:`folder_sha256` when the caller has it (hashing a 7B checkpoint takes a while)."""
    sha = sha or folder_sha256(local_dir)
    target = store / sha
    if (target / MARKER).exists():
        return target
    src = Location.parse(local_dir)
    prefix = src.path.rstrip("/") + "/"
    files = {}
    for f in _files(src):
        rel = f.path[len(prefix):]
        (target / rel).write_with(lambda out, f=f: _copy_stream(f, out))
        files[rel] = f.size()
    (target / MARKER).write_json({"sha256": sha, "files": files})
    log.info("model copy published to %s (%d files)", target, len(files))
    return target


def _copy_stream(src: Location, out) -> None:
    with src.fs.open_input_stream(src.path) as handle:
        while chunk := handle.read(_CHUNK):
            out.write(chunk)


def local_model_dir(uri: str, sha256: str) -> str:
    """A local folder holding the model copy at ``uri``, checked against ``sha256`` (once per process).

    Local ``uri``: hashed in place. Remote: downloaded to ``$DATASEL_HOME/models/<sha256>`` unless already there
    (a ``.partial-<pid>-*`` folder, hashed, then renamed, so concurrent workers of a node never see a partial
    copy; partial folders of processes that died mid-download are removed by the next download). Raises
    :class:`ModelCopyMismatch` when the files hash otherwise, FileNotFoundError when there is no copy."""
    from datasel_ray.models.loading import datasel_home

    loc = Location.parse(uri)
    if loc.is_local:
        return _checked(loc.path, sha256, uri)
    cached = datasel_home() / "models" / sha256
    if (cached / MARKER).is_file():
        return _checked(str(cached), sha256, uri)
    if not (loc / MARKER).exists():
        raise FileNotFoundError(f"model.shared: no complete model copy at {uri} (no {MARKER}): the driver "
                                f"publishes it at run start; re-run `datasel run`, or check the storage settings")
    cached.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_downloads(cached.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{os.getpid()}-{sha256[:12]}-{uuid.uuid4().hex[:8]}-", dir=cached.parent))
    try:
        prefix = loc.path.rstrip("/") + "/"
        for f in _files(loc):
            out = tmp / f.path[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as handle:
                _copy_stream(f, handle)
        got = folder_sha256(str(tmp))
        if got != sha256:
            raise ModelCopyMismatch(_mismatch(uri, sha256, got))
        (tmp / MARKER).write_bytes((loc / MARKER).read_bytes())
        try:
            os.replace(tmp, cached)
        except OSError:
            if not (cached / MARKER).is_file():  # another worker of this node won the race with a full copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _verified[(str(cached), sha256)] = str(cached)
    return str(cached)


def _remove_abandoned_downloads(models_dir: Path) -> None:
    """Delete the partial downloads under ``models_dir`` whose process is gone (a worker killed mid-download:
    an actor ended with its pool, a node stopped); those of live processes are left to finish."""
    for partial in models_dir.glob(f"{_PARTIAL}*"):
        try:
            pid = int(partial.name[len(_PARTIAL):].split("-", 1)[0])
        except ValueError:
            continue
        if not _process_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _checked(path: str, sha256: str, uri: str) -> str:
    if (path, sha256) not in _verified:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model.shared: the model copy {uri} is not on this node: a run directory on "
                                    f"local disk works on one machine only; put run_dir (or model.store) on "
                                    f"storage every node reaches")
        got = folder_sha256(path)
        if got != sha256:
            raise ModelCopyMismatch(_mismatch(uri, sha256, got))
        _verified[(path, sha256)] = path
    return path


def _mismatch(uri: str, expected: str, got: str) -> str:
    return (f"model copy {uri} hashes to sha256 {got[:16]}..., but the run recorded {expected[:16]}...: its "
            f"files changed after the run started. Features from other weights cannot be mixed into this run: "
            f"restore the copy, or start a new run directory")


def model_store(model_cfg, run_dir) -> Location | None:
    """Where the run's copy is published: ``model.store``, else ``<run_dir>/model`` for a run directory on
    object storage, else None (a local run directory: the local folder is the copy)."""
    if model_cfg.store:
        return Location.parse(model_cfg.store)
    if not run_dir.root.is_local:
        return run_dir / "model"
    return None


def _local_source(model_cfg) -> str:
    """The local folder of the configured model, built or fetched here (the driver) if need be."""
    from datasel_ray.models.loading import resolve_model_path

    path = resolve_model_path(model_cfg.name_or_path)
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser().resolve())
    from huggingface_hub import snapshot_download  # a hub id: its files once, in the driver

    return snapshot_download(path, revision=model_cfg.revision)


def share_model(cfg, run_dir):
    """The config with ``model.shared`` set to the run's model copy, publishing the copy when needed.

    Reuses the copy the manifest records (``model_copy``) while the model's identity is unchanged, so a later
    phase (or ``datasel select`` on another machine) neither builds nor hashes the model again; ``model.shared``
    already set (a config read back from a manifest) is kept as is."""
    from datasel_ray.models.identity import model_identity

    if cfg.model.shared is not None:
        return cfg
    identity = model_identity(cfg.model.name_or_path, cfg.model.revision)
    manifest = run_dir.load_manifest()
    recorded = manifest.get("model_copy")
    if not recorded or recorded.get("identity") != identity:
        source = _local_source(cfg.model)
        store = model_store(cfg.model, run_dir)
        sha = folder_sha256(source)
        uri = str(publish(source, store, sha)) if store is not None else source
        recorded = {"uri": uri, "sha256": sha, "identity": identity, "source": source}
        manifest = run_dir.load_manifest()
        manifest["model_copy"] = recorded
        run_dir.root.mkdir()
        run_dir.save_manifest(manifest)
    from datasel_ray.config import SharedModel

    shared = SharedModel(uri=recorded["uri"], sha256=recorded["sha256"])
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"shared": shared})})
