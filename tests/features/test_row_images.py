"""The extraction call site reads a sample's images with load_row_images: embedded bytes and paths give the same
pixels, a text-only row none, and a row with several images is refused per row (the single-image model code)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.features.extractor import HAS_IMAGE, PIXEL_VALUES, Preprocessor


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def preprocessor(tiny_model_dir):
    pre = Preprocessor(ModelConfig(name_or_path=str(tiny_model_dir)))
    pre.setup()
    return pre


def test_embedded_bytes_and_paths_give_the_same_pixels(preprocessor, tmp_path):
    (tmp_path / "a.png").write_bytes(_png(1))
    one = json.dumps([{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}])
    two = json.dumps([{"from": "human", "value": "<image><image>Compare."}, {"from": "gpt", "value": "Same."}])
    text = json.dumps([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hi."}])
    images = np.empty(5, dtype=object)
    images[:] = [[{"ref": "a.png", "uri": str(tmp_path / "a.png"), "data": None}],
                 [{"ref": "", "uri": "", "data": _png(1)}],
                 [], [{"ref": "a.png", "uri": str(tmp_path / "a.png"), "data": None},
                      {"ref": "", "uri": "", "data": _png(2)}], None]
    batch = {schema.ROW_ID: np.arange(5, dtype=np.int64),
             schema.CONVERSATIONS: np.array([one, one, text, two, one], dtype=object),
             schema.IMAGE_PATH: np.array([str(tmp_path / "a.png"), "", "", str(tmp_path / "a.png"),
                                          str(tmp_path / "a.png")], dtype=object),
             schema.IMAGES: images}
    out = preprocessor(batch)
    assert list(out[schema.ERROR_REASON]) == ["", "", "", "", ""]
    assert list(out[HAS_IMAGE]) == [True, True, False, True, True]
    # the two-image row holds both images, in placeholder order: the path's image first, then the embedded one
    two_images = np.asarray(out[PIXEL_VALUES][3])
    assert two_images.shape[0] == 2
    np.testing.assert_array_equal(two_images[0], np.asarray(out[PIXEL_VALUES][0]).reshape(two_images[0].shape))
    assert not np.array_equal(two_images[0], two_images[1])
    np.testing.assert_array_equal(out[PIXEL_VALUES][0], out[PIXEL_VALUES][1])  # path == embedded bytes
    np.testing.assert_array_equal(out[PIXEL_VALUES][0], out[PIXEL_VALUES][4])  # no images column: image_path
    assert out[PIXEL_VALUES][0].sum() != 0
