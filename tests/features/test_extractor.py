"""Preprocessor + FeatureExtractor stages: error rows, shapes, independent recomputation, batch independence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datasel_ray import schema
from datasel_ray.config import ModelConfig
from datasel_ray.features.extractor import FeatureExtractor, Preprocessor, object_column, sample_from_row

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "The square is blue."},
    {"from": "human", "value": "Is there a circle?"},
    {"from": "gpt", "value": "No, there is not."},
]
TEXT_CONV = [{"from": "human", "value": "Count from one to five."}, {"from": "gpt", "value": "one two three four five"}]


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / f"ok{k}.png")
    (root / "garbage.png").write_bytes(b"this is not an image")
    png = (root / "ok0.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    return root


@pytest.fixture(scope="module")
def raw_batch(images):
    rows = [
        (CONV, str(images / "ok0.png")),
        (TEXT_CONV, ""),
        (CONV, str(images / "garbage.png")),
        (CONV, str(images / "missing.png")),
        (CONV, str(images / "truncated.png")),
        (CONV[:2], str(images / "ok1.png")),
    ]
    return {
        schema.ROW_ID: np.arange(10, 10 + len(rows), dtype=np.int64),
        schema.CONVERSATIONS: np.array([json.dumps(c) for c, _ in rows], dtype=object),
        schema.IMAGE_PATH: np.array([p for _, p in rows], dtype=object),
    }


@pytest.fixture(scope="module")
def pre(model_cfg, raw_batch):
    return Preprocessor(model_cfg)(raw_batch)


@pytest.fixture(scope="module")
def extractor(model_cfg):
    fe = FeatureExtractor(model_cfg, device="cpu")
    fe.setup()
    return fe


@pytest.fixture(scope="module")
def feats(extractor, pre):
    return extractor(pre)


def take(batch, rows):
    return {k: (object_column([v[i] for i in rows]) if v.dtype == object else v[rows]) for k, v in batch.items()}


def test_preprocessor_columns_and_errors(pre):
    assert list(pre[schema.ERROR_REASON]) == [
        "", "", schema.Reason.IMAGE_CORRUPT, schema.Reason.IMAGE_MISSING, schema.Reason.IMAGE_CORRUPT, ""]
    assert pre[schema.ROW_ID].tolist() == list(range(10, 16))
    assert pre["pixel_values"].shape == (6, 1, 3, 32, 32) and pre["pixel_values"].dtype == np.float32  # one image
    assert pre["has_image"].tolist() == [True, False, False, False, False, True]
    assert not pre["pixel_values"][1].any()
    assert "missing.png" in pre[schema.ERROR_MESSAGE][3]
    for i in range(6):
        n = pre["input_ids"][i].shape[0]
        assert pre["input_ids"][i].dtype == np.int64
        assert all(pre[c][i].shape == (n,) and pre[c][i].dtype == bool
                   for c in ("image_mask", "text_mask", "answer_mask"))
    assert pre["image_mask"][0].sum() == 16 and pre["image_mask"][1].sum() == 0


def test_preprocessor_too_long_truncated_and_bad_json(model_cfg, raw_batch):
    rows = take(raw_batch, [0, 0, 1])
    rows[schema.CONVERSATIONS][2] = "{not json"
    short = Preprocessor(model_cfg.model_copy(update={"max_length": 40}))(rows)
    assert list(short[schema.ERROR_REASON]) == [schema.Reason.TOO_LONG] * 2 + [schema.Reason.EXTRACT_FAILED]
    cut = Preprocessor(model_cfg.model_copy(update={"max_length": 60}))(take(raw_batch, [0, 1]))
    assert cut[schema.TRUNCATED].tolist() == [True, False] and cut["input_ids"][0].shape == (60,)


def test_feature_columns(feats, extractor):
    d = 2 * 4 * 128
    assert extractor.coincide_dim == d
    assert feats[schema.COINCIDE_VECTOR].shape == (6, d) and feats[schema.COINCIDE_VECTOR].dtype == np.float16
    assert feats[schema.LAST_TOKEN].shape == (6, 128) and feats[schema.LAST_TOKEN].dtype == np.float16
    for col in (schema.INFORMATIVENESS, schema.TAU, schema.ANSWER_LOSS):
        assert feats[col].dtype == np.float32
    for col in (schema.N_IMAGE_TOKENS, schema.N_TEXT_TOKENS, schema.N_ANSWER_TOKENS):
        assert feats[col].dtype == np.int32
    assert feats[schema.ROW_ID].tolist() == list(range(10, 16))
    ok = feats[schema.ERROR_REASON] == ""
    assert ok.tolist() == [True, True, False, False, False, True]
    norms = np.linalg.norm(feats[schema.COINCIDE_VECTOR].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, [1, 1, 0, 0, 0, 1], atol=2e-3)
    assert not feats[schema.LAST_TOKEN][~ok].any() and np.isnan(feats[schema.TAU][~ok]).all()
    assert feats[schema.N_IMAGE_TOKENS].tolist() == [16, 0, 0, 0, 0, 16]
    assert (feats[schema.N_ANSWER_TOKENS][ok] > 0).all() and np.isfinite(feats[schema.ANSWER_LOSS][ok]).all()


def independent_features(model, ids: np.ndarray, pixels: np.ndarray | None, layers: list[int]):
    """Plain HF forward of one unpadded sample with hooks found by module name; features by hand."""
    captured = {}
    handles = []
    for name, module in model.named_modules():
        for layer in layers:
            if name == f"model.language_model.layers.{layer}.self_attn.o_proj":
                handles.append(module.register_forward_hook(
                    lambda m, i, o, layer=layer: captured.__setitem__(layer, o[0].clone())))
        if name == "model.language_model.norm":  # the final norm's input is the pre-norm last-block output
            handles.append(module.register_forward_pre_hook(lambda m, i: captured.__setitem__("pre", i[0][0])))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True,
                        pixel_values=None if pixels is None else torch.from_numpy(pixels))  # [images, C, H, W]
    finally:
        for h in handles:
            h.remove()
    image = ids == model.config.image_token_index
    text = np.arange(len(ids)) > (np.flatnonzero(image).max() if image.any() else -1)
    parts = []
    for layer in layers:
        a = captured[layer]
        for mask in (image, text):
            if mask.any():
                v = torch.tanh(a[torch.from_numpy(mask)].sum(0) / mask.sum())
                parts.append(v / torch.sqrt((v * v).sum()))
            else:
                parts.append(torch.zeros(a.shape[1]))
    spans = int(image.any()) + int(text.any())  # a text-only vector is scaled to unit norm too
    u = torch.cat(parts) / math.sqrt(spans * len(layers))
    s = torch.linalg.svd(captured["pre"].double(), full_matrices=False).S
    p = s / s.sum()
    return u, float(-(p * p.log()).sum()), float(p.max()), captured["pre"][-1], out.hidden_states[-1][0]


@pytest.mark.parametrize("row", [0, 1, 5])
def test_features_match_independent_computation(row, pre, feats, extractor):
    pixels = pre["pixel_values"][row] if pre["has_image"][row] else None
    u, info, tau, last, post = independent_features(
        extractor.vlm.model, pre["input_ids"][row], pixels, extractor.vlm.coincide_layers)
    np.testing.assert_allclose(feats[schema.COINCIDE_VECTOR][row].astype(np.float32), u.numpy(), atol=1e-3)
    assert feats[schema.INFORMATIVENESS][row] == pytest.approx(info, abs=1e-4)
    assert feats[schema.TAU][row] == pytest.approx(tau, abs=1e-4)
    np.testing.assert_allclose(feats[schema.LAST_TOKEN][row].astype(np.float32), last.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(feats[schema.LAST_TOKEN][row].astype(np.float32), post[-1].numpy(), atol=1e-2)
    assert feats[schema.N_TEXT_TOKENS][row] == pre["text_mask"][row].sum()


def test_batch_composition_does_not_change_features(pre, feats, extractor):
    vlm = extractor.vlm
    ok = [0, 1, 5]
    batched = vlm.forward_features([sample_from_row(pre, i) for i in ok])
    for k, i in enumerate(ok):
        alone = vlm.forward_features([sample_from_row(pre, i)])[0]
        for a, b in zip(alone.layer_outputs + [alone.last_hidden], batched[k].layer_outputs + [batched[k].last_hidden]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        single = extractor(take(pre, [i]))
        for col in (schema.INFORMATIVENESS, schema.TAU, schema.ANSWER_LOSS):
            assert single[col][0] == pytest.approx(feats[col][i], abs=1e-4)
        np.testing.assert_allclose(single[schema.COINCIDE_VECTOR][0].astype(np.float32),
                                   feats[schema.COINCIDE_VECTOR][i].astype(np.float32), atol=1e-3)


def test_length_grouped_passes_match_one_padded_pass(model_cfg, pre, feats, extractor):
    one_pass = FeatureExtractor(model_cfg.model_copy(update={"max_padding": None}), device="cpu")
    one_pass.vlm = extractor.vlm
    grouped = FeatureExtractor(model_cfg.model_copy(update={"max_padding": 0.0}), device="cpu")
    grouped.vlm = extractor.vlm
    a, b = one_pass(pre), grouped(pre)
    np.testing.assert_array_equal(a[schema.ERROR_REASON], b[schema.ERROR_REASON])
    for col in (schema.INFORMATIVENESS, schema.TAU, schema.ANSWER_LOSS):
        np.testing.assert_allclose(a[col], b[col], atol=1e-4, equal_nan=True)
    for col in (schema.COINCIDE_VECTOR, schema.LAST_TOKEN):
        np.testing.assert_allclose(a[col].astype(np.float32), b[col].astype(np.float32), atol=2e-3)
    assert len(set(sample_from_row(pre, i).length for i in (0, 1, 5))) > 1  # the batch really mixes lengths


def test_ray_block_round_trip(pre, feats, extractor):
    from ray.data.block import BlockAccessor

    def round_trip(batch):
        return BlockAccessor.for_block(BlockAccessor.batch_to_block(batch)).to_batch_format("numpy")

    back = round_trip(pre)
    assert back["input_ids"].dtype == object
    assert all(np.array_equal(a, b) for a, b in zip(back["answer_mask"], pre["answer_mask"]))
    again = extractor(back)
    np.testing.assert_array_equal(again[schema.COINCIDE_VECTOR], feats[schema.COINCIDE_VECTOR])
    np.testing.assert_array_equal(again[schema.ERROR_REASON], feats[schema.ERROR_REASON])
    out = round_trip(again)
    assert out[schema.COINCIDE_VECTOR].shape == (6, extractor.coincide_dim)
    same_length = round_trip(take(pre, [0, 0]))  # equal lengths come back as 2-D arrays
    assert same_length["input_ids"].ndim == 2
    np.testing.assert_array_equal(extractor(same_length)[schema.TAU], feats[schema.TAU][[0, 0]])


def test_model_failure_marks_only_that_row(pre, extractor, monkeypatch):
    real = extractor.vlm.forward_features

    def flaky(samples):
        if any(not s.has_image for s in samples):
            raise RuntimeError("boom")
        return real(samples)

    monkeypatch.setattr(extractor.vlm, "forward_features", flaky)
    out = extractor(pre)
    assert list(out[schema.ERROR_REASON]) == [
        "", schema.Reason.EXTRACT_FAILED, schema.Reason.IMAGE_CORRUPT, schema.Reason.IMAGE_MISSING,
        schema.Reason.IMAGE_CORRUPT, ""]
    assert "boom" in out[schema.ERROR_MESSAGE][1]
    assert not out[schema.COINCIDE_VECTOR][1].any() and out[schema.COINCIDE_VECTOR][0].any()


@pytest.mark.parametrize("error", [MemoryError("host"), RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                   ImportError("No module named 'flash_attn'")])
def test_machine_faults_are_raised_not_quarantined(error):
    """Out of memory or a missing package says nothing about the rows: the batch fails (Ray retries the task,
    then the phase stops with the cause) instead of quarantining every row as extract_failed."""
    from datasel_ray.config import ModelConfig
    from datasel_ray.features.extractor import FeatureExtractor
    from datasel_ray.models.vlm import PreparedSample

    class FailingModel:
        def forward_features(self, samples):
            raise error

    extractor = FeatureExtractor(ModelConfig())
    extractor.vlm = FailingModel()
    mask = np.zeros(3, dtype=bool)
    sample = PreparedSample(np.arange(3, dtype=np.int64), None, mask, mask.copy(), mask.copy())
    with pytest.raises(type(error)):
        extractor._forward({0: sample, 1: sample})


def test_a_row_error_of_the_model_stays_a_row_error():
    from datasel_ray.config import ModelConfig
    from datasel_ray.features.extractor import FeatureExtractor
    from datasel_ray.models.vlm import PreparedSample

    class ShapeError:
        def forward_features(self, samples):
            raise ValueError("image features and image tokens do not match")

    extractor = FeatureExtractor(ModelConfig())
    extractor.vlm = ShapeError()
    mask = np.zeros(3, dtype=bool)
    sample = PreparedSample(np.arange(3, dtype=np.int64), None, mask, mask.copy(), mask.copy())
    results = extractor._forward({0: sample, 1: sample})
    assert sorted(results) == [0, 1] and all(isinstance(r, ValueError) for r in results.values())
