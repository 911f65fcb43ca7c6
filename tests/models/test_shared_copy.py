"""One model copy per run: content hash, publish to storage, download once per node, refuse a changed copy."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.models import shared_copy
from datasel_ray.models.shared_copy import (MARKER, ModelCopyMismatch, folder_sha256, local_model_dir, publish,
                                            share_model)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 50)
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


@pytest.fixture(autouse=True)
def fresh_process_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(shared_copy, "_verified", {})
    monkeypatch.setenv("DATASEL_HOME", str(tmp_path / "home"))


def test_hash_covers_names_and_bytes(model_dir):
    before = folder_sha256(str(model_dir))
    assert len(before) == 64 and before == folder_sha256(str(model_dir))
    (model_dir / "sub" / "tokenizer.json").rename(model_dir / "sub" / "other.json")
    assert folder_sha256(str(model_dir)) != before


def _mock_store() -> Location:
    fs, _ = pafs.FileSystem.from_uri("mock:///")
    return Location(fs, "bucket/models", "mock://")


def test_publish_download_verify(model_dir, tmp_path, monkeypatch):
    store = _mock_store()
    copy = publish(str(model_dir), store)
    sha = folder_sha256(str(model_dir))
    assert copy.path == f"bucket/models/{sha}" and (copy / MARKER).read_json()["sha256"] == sha
    assert folder_sha256(copy) == sha
    # the download path of an s3:// copy, on Arrow's in-process mock filesystem (no URI reaches it)
    uri = str(copy)
    parse = Location.parse
    monkeypatch.setattr(Location, "parse", staticmethod(lambda text: copy if str(text) == uri else parse(text)))
    local = local_model_dir(uri, sha)
    again = local_model_dir(uri, sha)
    assert local == again == str(tmp_path / "home" / "models" / sha)
    assert folder_sha256(local) == sha
    assert (tmp_path / "home" / "models" / sha / "model.safetensors").read_bytes() == \
        (model_dir / "model.safetensors").read_bytes()


def test_a_download_abandoned_by_a_dead_process_is_removed(model_dir, tmp_path, monkeypatch):
    import subprocess
    import sys

    copy = publish(str(model_dir), _mock_store())
    sha = folder_sha256(str(model_dir))
    uri = str(copy)
    parse = Location.parse
    monkeypatch.setattr(Location, "parse", staticmethod(lambda text: copy if str(text) == uri else parse(text)))
    models = tmp_path / "home" / "models"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = models / f".partial-{int(dead.stdout)}-abcd1234-x"
    in_progress = models / f".partial-{os.getpid()}-ffff0000-y"
    for partial in (abandoned, in_progress):
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"half")
    local_model_dir(uri, sha)
    assert sorted(p.name for p in models.iterdir()) == sorted([sha, in_progress.name])


def test_changed_copy_is_refused(model_dir):
    sha = folder_sha256(str(model_dir))
    assert local_model_dir(str(model_dir), sha) == str(model_dir)
    shared_copy._verified.clear()
    (model_dir / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ModelCopyMismatch, match="its files changed after the run started"):
        local_model_dir(str(model_dir), sha)


def test_missing_local_copy_says_local_run_dirs_are_single_machine(tmp_path):
    with pytest.raises(FileNotFoundError, match="works on one machine only"):
        local_model_dir(str(tmp_path / "nowhere"), "0" * 64)


def test_share_model_records_once_and_reuses(model_dir, tmp_path, monkeypatch):
    calls = []
    real = shared_copy._local_source
    monkeypatch.setattr(shared_copy, "_local_source", lambda m: calls.append(1) or real(m))
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)}})
    run_dir = RunDir(cfg.run_dir)
    shared = share_model(cfg, run_dir)
    sha = folder_sha256(str(model_dir))
    assert shared.model.shared.sha256 == sha and shared.model.shared.uri == str(model_dir)  # local run: no copy
    assert run_dir.load_manifest()["model_copy"]["sha256"] == sha
    assert share_model(cfg, run_dir).model.shared == shared.model.shared
    assert len(calls) == 1  # the second call read the manifest: no resolve, no hash
    # a run directory on object storage gets its own content-addressed copy
    store = tmp_path / "store"
    cfg2 = cfg.model_copy(update={"model": cfg.model.model_copy(update={"store": str(store)}),
                                  "run_dir": str(tmp_path / "run2")})
    shared2 = share_model(cfg2, RunDir(cfg2.run_dir))
    assert shared2.model.shared.uri == str(store / sha) and (store / sha / MARKER).is_file()


def test_a_run_whose_model_was_shared_first_still_gets_its_identity(model_dir, tmp_path):
    """run_phases shares the model before RunDir.init: the manifest then already exists with model_copy only."""
    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)}})
    run_dir = RunDir(cfg.run_dir)
    cfg = share_model(cfg, run_dir)
    run_dir.init(cfg)
    manifest = run_dir.load_manifest()
    assert len(manifest["run_id"]) == 12 and manifest["created"] and manifest["phases"] == {}
    assert manifest["model_copy"]["sha256"] == cfg.model.shared.sha256
    assert manifest["config"]["model"]["shared"]["sha256"] == cfg.model.shared.sha256
