"""The one image read and decode (io/images.py): what is a row's fault and what is the storage's."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from datasel_ray.io.images import (
    IMAGE_TOO_LARGE,
    ImageError,
    decode_image,
    image_exists,
    load_image,
    read_image_bytes,
)
from datasel_ray.io.storage import Location, StorageError
from datasel_ray.schema import Reason, RowError


def _png(width: int = 20, height: int = 12, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode="L" if channels == 1 else mode)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _old_load_image(path: str, image_size: int | None):
    """features/extractor.load_image before io/images.py (local paths), the reference for bit-identity."""
    image = Image.open(Path(path))
    image.load()
    image = image.convert("RGB")
    if image_size is not None:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return image


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG")])
@pytest.mark.parametrize("image_size", [None, 8, 32])
def test_decode_is_bit_identical_to_the_old_load_image(tmp_path, mode, fmt, image_size):
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(_png(37, 23, mode, seed=3, fmt=fmt))
    new = load_image(str(path), image_size)
    old = _old_load_image(str(path), image_size)
    assert new.mode == "RGB" and new.size == old.size == ((37, 23) if image_size is None else (image_size,) * 2)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    from datasel_ray.features import extractor
    from datasel_ray.io.images import load_row_images

    assert extractor.load_row_images is load_row_images  # the extraction path decodes with this one function
    row = load_row_images({"image_path": str(path)}, image_size)[0]
    np.testing.assert_array_equal(np.asarray(row), np.asarray(old))


def test_missing_file_and_directory_are_image_missing(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    for path in (tmp_path / "nope.png", tmp_path, tmp_path / "f.png" / "x.png"):
        with pytest.raises(ImageError) as info:
            load_image(str(path))
        assert info.value.reason == Reason.IMAGE_MISSING
        assert str(info.value) == f"image not found: {path}"
        assert isinstance(info.value, RowError) and info.value.uri == str(path)
    assert not image_exists(str(tmp_path / "nope.png")) and image_exists(str(tmp_path / "f.png"))


def test_truncated_and_garbage_bytes_are_image_corrupt():
    data = _png(16, 16)
    with pytest.raises(ImageError) as truncated:
        decode_image(data[: len(data) // 2], "s3://b/t.png")
    assert truncated.value.reason == Reason.IMAGE_CORRUPT
    assert str(truncated.value).startswith("cannot decode image s3://b/t.png: ")
    assert "truncated" in truncated.value.detail
    with pytest.raises(ImageError) as garbage:
        decode_image(b"not an image at all", "x.png")
    assert (garbage.value.reason, garbage.value.detail) == (Reason.IMAGE_CORRUPT, "cannot identify image file")
    assert str(garbage.value) == "cannot decode image x.png: cannot identify image file"  # no buffer address


def test_max_pixels_is_checked_from_the_header():
    data = _png(40, 30)
    assert decode_image(data, max_pixels=1200).size == (40, 30)
    with pytest.raises(ImageError) as info:
        decode_image(data, "img", max_pixels=1199)
    assert (info.value.reason, info.value.detail) == (IMAGE_TOO_LARGE, "40x30 pixels, more than the limit of 1199")


def test_decompression_bomb_is_too_large_with_a_limit_and_corrupt_without(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x30 = 1200 > 2 * 100: PIL refuses at open
    data = _png(40, 30)
    with pytest.raises(ImageError) as limited:
        decode_image(data, max_pixels=10_000)
    assert limited.value.reason == IMAGE_TOO_LARGE and "exceeds limit" in limited.value.detail
    with pytest.raises(ImageError) as unlimited:
        decode_image(data)
    assert unlimited.value.reason == Reason.IMAGE_CORRUPT


def test_max_bytes_is_checked_before_reading(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    size = path.stat().st_size
    assert read_image_bytes(str(path), max_bytes=size) == path.read_bytes()
    with pytest.raises(ImageError) as info:
        read_image_bytes(str(path), max_bytes=size - 1)
    assert (info.value.reason, info.value.detail) == (IMAGE_TOO_LARGE, f"{size} bytes, more than the limit of {size - 1}")


def test_memory_error_while_decoding_is_not_a_row_fault(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr(Image, "open", no_memory)
    with pytest.raises(MemoryError):
        decode_image(_png())


class _FailingFS:
    """A filesystem whose every call raises ``error`` (a store that refuses or cannot be reached)."""

    def __init__(self, error: BaseException):
        self.error = error

    def open_input_file(self, path):
        raise self.error

    def get_file_info(self, path):
        raise self.error


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   OSError("AWS Error ACCESS_DENIED during HeadObject operation"),
                                   TimeoutError("timed out"), MemoryError(), ImportError("No module named 'x'")])
def test_read_errors_other_than_not_found_are_storage_errors(error):
    loc = Location(_FailingFS(error), "bucket/img.png", "s3://")
    with pytest.raises(StorageError) as info:
        read_image_bytes(loc)
    assert not isinstance(info.value, RowError) and isinstance(info.value, RuntimeError)
    assert info.value.uri == "s3://bucket/img.png" and info.value.__cause__ is error
    assert str(info.value).startswith(f"cannot read s3://bucket/img.png: {type(error).__name__}")
    with pytest.raises(StorageError):
        image_exists(loc)


def test_storage_error_advice_names_what_to_check():
    s3 = str(StorageError.wrap("s3://b/k", OSError("refused")))
    assert "AWS_ENDPOINT_URL" in s3 and "AWS_ACCESS_KEY_ID" in s3 and "permissions" in s3
    assert "permissions" in str(StorageError.wrap("/data/img.png", PermissionError("denied")))
    assert "install" in str(StorageError.wrap("s3://b/k", ImportError("no", name="pkg")))
    assert "memory" in str(StorageError.wrap("s3://b/k", MemoryError()))


def test_a_not_found_store_error_is_image_missing():
    fs, _ = pafs.FileSystem.from_uri("mock:///")
    with pytest.raises(ImageError) as info:
        read_image_bytes(Location(fs, "bucket/none.png", "mock://"))
    assert info.value.reason == Reason.IMAGE_MISSING


def test_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ImageError(Reason.IMAGE_CORRUPT, "cannot decode image u: bad", "u", "bad")))
    assert (err.reason, str(err), err.uri, err.detail) == (Reason.IMAGE_CORRUPT, "cannot decode image u: bad", "u", "bad")
    storage_err = pickle.loads(pickle.dumps(StorageError.wrap("s3://b/k", OSError("x"))))
    assert storage_err.uri == "s3://b/k" and str(storage_err).startswith("cannot read s3://b/k: OSError: x.")
    row = pickle.loads(pickle.dumps(RowError(Reason.TOO_LONG, "too long")))
    assert (row.reason, str(row)) == (Reason.TOO_LONG, "too long")


# ------------------------------------------------------------------------------------ the callers' contracts


def _validator(root: str, check_images: bool = True):
    from datasel_ray.config import PoolConfig
    from datasel_ray.io.tasks import TaskResolver
    from datasel_ray.io.validation import Limits, RecordValidator

    return RecordValidator(root, TaskResolver.for_pool(PoolConfig()), Limits(check_images=check_images))


def _record(image: str) -> object:
    from datasel_ray.io.pool import RawRecord

    value = {"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                               {"from": "gpt", "value": "A cat."}]}
    return RawRecord(record_index=0, text="{}", value=value)


def test_ingest_validation_keeps_its_reasons_and_messages(tmp_path):
    (tmp_path / "good.png").write_bytes(_png())
    (tmp_path / "bad.png").write_bytes(_png()[:50])
    validator = _validator(str(tmp_path))
    sample, _ = validator.validate(_record("good.png"), 1, "pool.json")
    assert sample["image_path"] == str(tmp_path / "good.png")
    _, missing = validator.validate(_record("gone.png"), 2, "pool.json")
    assert (missing["reason"], missing["message"]) == (Reason.IMAGE_MISSING, f"image: file not found: {tmp_path}/gone.png")
    _, corrupt = validator.validate(_record("bad.png"), 3, "pool.json")
    assert corrupt["reason"] == Reason.IMAGE_CORRUPT
    assert corrupt["message"].startswith("image: cannot decode 'bad.png': ") and "BytesIO" not in corrupt["message"]
    _, unchecked = _validator(str(tmp_path), check_images=False).validate(_record("gone.png"), 4, "pool.json")
    assert unchecked["reason"] == Reason.IMAGE_MISSING
    assert _validator(str(tmp_path), check_images=False).validate(_record("bad.png"), 5, "pool.json")[1] is None


@pytest.mark.parametrize("check_images", [True, False])
def test_ingest_validation_lets_a_storage_error_through(check_images):
    validator = _validator("/pool", check_images)
    validator.image_root = Location(_FailingFS(OSError("AWS Error NETWORK_CONNECTION")), "bucket/pool", "s3://")
    with pytest.raises(StorageError, match="s3://bucket/pool/a.png"):
        validator.validate(_record("a.png"), 1, "pool.json")


def test_scorer_maps_image_faults_to_4xx_and_storage_errors_to_503(tmp_path, monkeypatch):
    import base64

    from datasel_ray.config import RunConfig
    from datasel_ray.scoring import request
    from datasel_ray.scoring.request import STORAGE_ERROR, SampleError, SampleParser, ScoringLimits

    (tmp_path / "a.png").write_bytes(_png(40, 30))
    cfg = RunConfig.model_validate({"model": {"image_size": 16}})
    parser = SampleParser(cfg, ["other"], [str(tmp_path)], ScoringLimits(max_image_pixels=1199))
    convs = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]

    def error(sample) -> SampleError:
        with pytest.raises(SampleError) as info:
            parser.validate(sample, 0)
        return info.value

    too_big = error({"image": "a.png", "conversations": convs})
    assert (too_big.status, too_big.field, too_big.reason) == (413, "image", IMAGE_TOO_LARGE)
    assert str(too_big) == "image: 40x30 pixels, more than the limit of 1199"
    bad = base64.b64encode(_png()[:40]).decode()
    corrupt = error({"image_base64": bad, "task": "other", "conversations": convs})
    assert (corrupt.status, corrupt.reason) == (422, Reason.IMAGE_CORRUPT)
    assert str(corrupt).startswith("image_base64: cannot decode image: ")

    parser.limits.max_image_pixels = 1200
    _, (image,) = parser.validate({"image": "a.png", "conversations": convs}, 0)
    assert image.mode == "RGB" and image.size == (16, 16)

    def unreachable(*args, **kwargs):
        raise StorageError("cannot read s3://b/a.png: OSError: refused. Check AWS_ENDPOINT_URL.", "s3://b/a.png")

    monkeypatch.setattr(request, "read_image_bytes", unreachable)
    down = error({"image": "a.png", "conversations": convs})
    assert (down.status, down.field, down.reason) == (503, "image", STORAGE_ERROR)
    assert "AWS_ENDPOINT_URL" in str(down)
