"""Location on a local path, on Arrow's in-memory mock filesystem and on a real S3-compatible server (moto's,
over HTTP: ``s3_bucket`` in conftest.py), plus the object-store options and their errors."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from datasel_ray.config import RunConfig, StorageConfig
from datasel_ray.io import storage
from datasel_ray.io.storage import Location, StorageError, read_parquet_dir


@pytest.fixture(params=["local", "mock", "s3"])
def root(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(str(tmp_path / "run"))
    if request.param == "s3":
        return Location.parse(request.getfixturevalue("s3_bucket") + "/run")
    fs, _ = pafs.FileSystem.from_uri("mock:///")
    return Location(fs, "bucket/run", "mock://")


def test_round_trips_and_listing(root):
    (root / "a" / "x.json").write_json({"k": [1, 2]})
    (root / "a" / "y.npy").write_npy(np.arange(5, dtype=np.int64))
    (root / "a" / "z.parquet").write_parquet(pa.table({"row_id": [3, 1]}))
    (root / "a" / "w.parquet").write_parquet(pa.table({"row_id": [7]}))
    assert (root / "a" / "x.json").read_json() == {"k": [1, 2]}
    np.testing.assert_array_equal((root / "a" / "y.npy").read_npy(), np.arange(5))
    assert [f.name for f in (root / "a").list(".parquet")] == ["w.parquet", "z.parquet"]
    assert read_parquet_dir(root / "a").column("row_id").to_pylist() == [7, 3, 1]
    assert read_parquet_dir(root / "missing") is None
    assert (root / "a").is_dir() and (root / "a" / "x.json").is_file()
    (root / "a").delete()
    assert not (root / "a").exists()


def test_overwrite_is_whole_and_leaves_no_temporary_file(root):
    target = root / "f.bin"
    target.write_bytes(b"old")
    target.write_bytes(b"new-content")
    assert target.read_bytes() == b"new-content"
    assert [f.name for f in root.list()] == ["f.bin"]


def test_uri_text_round_trip():
    loc = Location.parse("file:///tmp/some/run")
    assert loc.is_local and str(loc) == "/tmp/some/run"
    assert str(Location.parse("/tmp/x") / "samples") == "/tmp/x/samples"
    with pytest.raises(ValueError, match="must not be empty"):
        Location.parse("")


def test_row_range_reads_only_its_row_groups(root):
    import pyarrow.parquet as pq

    table = pa.table({"row_id": pa.array(np.arange(10, dtype=np.int64)), "text": [f"t{i}" for i in range(10)]})
    loc = root / "samples" / "s.parquet"
    loc.write_parquet(table, row_group_rows=3)
    with loc.open_input() as handle:
        assert pq.ParquetFile(handle).metadata.num_row_groups == 4
    for offset, count in [(0, 3), (3, 3), (4, 5), (9, 1), (0, 10), (8, 5)]:
        assert loc.read_parquet_rows(offset, count).equals(table.slice(offset, count)), (offset, count)
    assert loc.read_parquet_rows(2, 4, ["text"]).column("text").to_pylist() == ["t2", "t3", "t4", "t5"]
    assert loc.read_parquet_rows(10, 3).num_rows == 0


# ------------------------------------------------------------------------------------ object storage (S3, moto)


def test_s3_location_text_and_filesystem(s3_bucket):
    loc = Location.parse(f"{s3_bucket}/run/")
    assert str(loc) == f"{s3_bucket}/run" and not loc.is_local
    assert isinstance(loc.fs, pafs.S3FileSystem) and loc.fs.region == "us-east-1"
    assert str(loc / "samples" / "a.parquet") == f"{s3_bucket}/run/samples/a.parquet"
    assert Location.parse("s3://another-bucket/x").fs is loc.fs  # one filesystem per process and options


def test_s3_parquet_and_listing_round_trip(s3_bucket):
    run = Location.parse(s3_bucket) / "run"
    table = pa.table({"row_id": pa.array([5, 3, 9], pa.int64()), "text": ["a", "b", "c"]})
    (run / "samples" / "b.parquet").write_parquet(table)
    (run / "samples" / "a.parquet").write_parquet(table.slice(0, 1))
    (run / "samples" / "notes.txt").write_text("x")
    assert [f.name for f in (run / "samples").list(".parquet")] == ["a.parquet", "b.parquet"]
    assert Location.parse(f"{s3_bucket}/run/samples/b.parquet").read_parquet().equals(table)
    assert read_parquet_dir(run / "samples").column("row_id").to_pylist() == [5, 5, 3, 9]
    assert (run / "samples" / "b.parquet").read_parquet_rows(1, 2, ["text"]).column("text").to_pylist() == ["b", "c"]
    assert (run / "samples").is_dir() and not (run / "nothing").exists()


def test_s3_object_larger_than_the_multipart_part_size(s3_bucket):
    """pyarrow uploads in parts of 10 MiB; 12 MiB takes two parts (older moto releases broke this)."""
    data = np.random.default_rng(0).bytes(12 * 1024 * 1024 + 17)
    loc = Location.parse(f"{s3_bucket}/big/blob.bin")
    loc.write_bytes(data)
    assert loc.size() == len(data)
    assert loc.read_bytes() == data
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB through the streaming writer
    (loc.parent / "a.npy").write_npy(array)
    np.testing.assert_array_equal((loc.parent / "a.npy").read_npy(), array)


def test_s3_image_read_missing_and_corrupt(s3_bucket, tmp_path):
    from PIL import Image

    from datasel_ray.io.images import ImageError, load_image
    from datasel_ray.schema import Reason

    pixels = np.random.default_rng(1).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    Location.parse(f"{s3_bucket}/images/a.png").write_bytes(buffer.getvalue())
    Location.parse(f"{s3_bucket}/images/bad.png").write_bytes(buffer.getvalue()[:60])

    image = load_image(f"{s3_bucket}/images/a.png")
    assert image.mode == "RGB" and image.size == (20, 12)
    np.testing.assert_array_equal(np.asarray(image), pixels)
    assert load_image(f"{s3_bucket}/images/a.png", image_size=8).size == (8, 8)
    with pytest.raises(ImageError) as missing:
        load_image(f"{s3_bucket}/images/nope.png")
    assert missing.value.reason == Reason.IMAGE_MISSING
    assert str(missing.value) == f"image not found: {s3_bucket}/images/nope.png"
    with pytest.raises(ImageError) as corrupt:
        load_image(f"{s3_bucket}/images/bad.png")
    assert corrupt.value.reason == Reason.IMAGE_CORRUPT
    with pytest.raises(ImageError) as folder:  # a prefix with objects under it is no file
        load_image(f"{s3_bucket}/images")
    assert folder.value.reason == Reason.IMAGE_MISSING


@pytest.fixture
def unreachable_s3(s3_env, monkeypatch):
    """The S3 variables of ``s3_env`` with the endpoint moved to a port nobody listens on."""
    from datasel_ray.ports import pick_unbound_ports

    endpoint = f"http://127.0.0.1:{pick_unbound_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return endpoint


def test_unreachable_endpoint_is_a_storage_error_in_seconds(unreachable_s3):
    from datasel_ray.io.images import load_image
    from datasel_ray.schema import RowError

    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        load_image("s3://pools/gen/gqa/000000.png", image_size=8)
    assert time.monotonic() - started < 15  # connect timeout and retries bounded by default
    assert not isinstance(info.value, RowError)
    message = str(info.value)
    assert message.startswith("cannot read s3://pools/gen/gqa/000000.png: OSError: ")
    assert unreachable_s3 in message and "AWS_ENDPOINT_URL" in message and "AWS_ACCESS_KEY_ID" in message
    assert info.value.uri == "s3://pools/gen/gqa/000000.png"


def test_unreachable_endpoint_surfaces_in_every_caller(unreachable_s3, monkeypatch):
    """Extraction and ingest validation let the StorageError through (the phase stops, no row is
    quarantined); the scorer answers 503 for it, not 422."""
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "1")  # no retries: four failing reads below
    from datasel_ray.config import ModelConfig
    from datasel_ray.features.extractor import Preprocessor
    from datasel_ray.io.pool import RawRecord
    from datasel_ray.io.tasks import TaskResolver
    from datasel_ray.io.validation import Limits, RecordValidator
    from datasel_ray.scoring.request import STORAGE_ERROR, SampleError, SampleParser, ScoringLimits

    conversations = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    with pytest.raises(StorageError):
        Preprocessor(ModelConfig()).prepare_row('[{"from": "human", "value": "q"}]', "s3://pools/a.png")

    cfg = RunConfig()
    record = {"image": "gqa/a.png", "conversations": conversations, "task": "gqa"}
    for check_images in (True, False):
        validator = RecordValidator("s3://pools/gen", TaskResolver.for_pool(cfg.pool), Limits(check_images=check_images))
        with pytest.raises(StorageError, match="s3://pools/gen/gqa/a.png"):
            validator.validate(RawRecord(record_index=0, text="{}", value=record), 0, "pool.json")

    parser = SampleParser(cfg, ["gqa"], ["s3://pools/gen"], ScoringLimits())
    with pytest.raises(SampleError) as info:
        parser.validate(record, 0)
    assert (info.value.status, info.value.field, info.value.reason) == (503, "image", STORAGE_ERROR)
    assert "s3://pools/gen/gqa/a.png" in str(info.value)


def test_storage_options_from_config_and_environment(s3_env, monkeypatch):
    assert RunConfig().storage == StorageConfig()
    cfg = RunConfig.model_validate({"storage": {"endpoint_url": "http://10.0.0.5:9000", "region": "eu-west-3",
                                                "anonymous": True}}).storage
    env = storage.storage_environment(cfg)
    assert env == {"AWS_ENDPOINT_URL": "http://10.0.0.5:9000", "AWS_ENDPOINT_URL_S3": "http://10.0.0.5:9000",
                   "AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "eu-west-3", "DATASEL_STORAGE_ANONYMOUS": "1"}
    assert storage.storage_environment(StorageConfig()) == {}

    before = Location.parse("s3://bucket/x").fs
    for name in env:
        monkeypatch.delenv(name, raising=False)  # restored after the test
    assert storage.apply_storage_options(cfg) == env
    import os

    assert {k: os.environ[k] for k in env} == env
    fs = Location.parse("s3://bucket/x").fs
    assert fs is not before and fs.region == "eu-west-3"
    options = fs.__reduce__()[1][0]  # the options pyarrow pickles the filesystem with
    assert options["endpoint_override"] == "10.0.0.5:9000" and options["scheme"] == "http"
    assert options["anonymous"] is True and options["connect_timeout"] == storage.CONNECT_TIMEOUT_S


def test_region_and_endpoint_precedence(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.org")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    fs = Location.parse("s3://bucket/x").fs
    options = fs.__reduce__()[1][0]
    assert (options["endpoint_override"], options["scheme"], fs.region) == ("s3.example.org", "https", "ap-south-1")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert Location.parse("s3://bucket/x").fs.region == storage.DEFAULT_S3_REGION  # endpoint and no region


def test_gcs_uri_parses_without_network(monkeypatch):
    monkeypatch.setenv("DATASEL_STORAGE_ANONYMOUS", "1")
    storage.clear_filesystem_cache()
    loc = Location.parse("gs://public-bucket/pool/data.json")
    assert isinstance(loc.fs, pafs.GcsFileSystem) and loc.path == "public-bucket/pool/data.json"
    assert str(loc.parent) == "gs://public-bucket/pool"
    assert Location.parse("gs://other/x").fs is loc.fs
    storage.clear_filesystem_cache()


def test_workers_get_the_non_secret_storage_settings(monkeypatch):
    from datasel_ray.config import StorageConfig
    from datasel_ray.io.storage import worker_environment

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    env = worker_environment(StorageConfig(region="eu-west-1"))
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "AWS_SECRET_ACCESS_KEY" not in env
