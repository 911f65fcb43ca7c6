"""ingest -> warm-up -> extract (COINCIDE, DataTailor, TIVE) -> aggregate -> select through the Ray pipeline, then
pool rows scored by the online :class:`~datasel_ray.scoring.scorer.Scorer`, for each tiny random architecture of
``tests/tiny_architectures.py`` (Qwen2-VL / Qwen2.5-VL: concatenated patches and M-RoPE; Idefics3 / SmolVLM:
tiles and pixel masks; LLaVA-OneVision: anyres tiles and ``batch_num_images``).

The pool is the generated LLaVA-shaped pool with every fourth image row given a second image (two ``<image>``
placeholders), so each run holds rows with two images, one and none: extraction must count every image's tokens,
the extract manifest entry names the architecture's hook points, and a pool row sent to the scorer as it is (two
images included) gets the image-token count extraction computed for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_architectures import ARCHITECTURES, build

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.synthetic import SynthConfig, generate_pool

POOL_ROWS = 32
# (architecture class, the block DataTailor hooks: the last decoder layer, read before the final norm)
HOOKS = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "model.language_model.layers.3"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "model.language_model.layers.3"),
    "idefics3": ("Idefics3ForConditionalGeneration", "model.text_model.layers.3"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "model.text_model.layers.3"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "model.language_model.layers.3"),
}


def _pool_with_two_image_rows(folder):
    """The generated pool under ``folder`` with every fourth image row given the next image row's image as a
    second image (a second ``<image>`` placeholder after its first); returns the pool file's path."""
    info = generate_pool(folder, SynthConfig(num_samples=POOL_ROWS, seed=3, bad_rate=0.0))
    rows = json.loads(info.pool_path.read_text())
    with_image = [r for r in rows if r.get("image")]
    for k in range(0, len(with_image) - 1, 4):
        row, other = with_image[k], with_image[k + 1]
        first = row["conversations"][0]
        if first["value"].count("<image>") != 1:
            continue
        first["value"] = first["value"].replace("<image>", "<image>\n<image>", 1)
        row["image"] = [row["image"], other["image"]]
    info.pool_path.write_text(json.dumps(rows))
    return info.pool_path


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_through_every_phase_and_the_scorer(architecture, tmp_path, ray_local):
    from datasel_ray.demo import demo_config
    from datasel_ray.scoring.scorer import Scorer

    model_dir = build(architecture, tmp_path / architecture)
    pool_path = _pool_with_two_image_rows(tmp_path / "pool")
    data = demo_config(tmp_path, pool_path, tive=True).model_dump(mode="json")
    data["model"]["name_or_path"] = str(model_dir)
    data["phases"] = ["ingest", "warmup", "extract", "aggregate", "select"]
    data["extract"].update({"shard_rows": 16, "batch_size": 4})
    cfg = RunConfig.model_validate(data)
    results = run_phases(cfg, quiet=True)

    assert results["ingest"]["samples"] == POOL_ROWS
    assert results["extract"]["failed"] == 0
    hooks = results["extract"]["hooks"]
    assert (hooks["architecture"], hooks["datatailor_module"]) == HOOKS[architecture], hooks
    assert len(hooks["coincide_modules"]) > 0 and all(m.endswith("self_attn.o_proj") for m in hooks["coincide_modules"])
    rd = RunDir(cfg.run_dir)
    assert rd.load_manifest()["phases"]["extract"]["result"]["hooks"] == hooks

    samples = {r[schema.ROW_ID]: r for r in load_table(rd, "samples").to_pylist()}
    features = load_table(rd, "features")
    ids = column_to_numpy(features.column(schema.ROW_ID))
    tokens = column_to_numpy(features.column(schema.N_IMAGE_TOKENS))
    n_images = np.array([samples[int(i)][schema.N_IMAGES] for i in ids])
    assert sorted(ids.tolist()) == sorted(samples) and set(n_images.tolist()) == {0, 1, 2}
    assert np.all(tokens[n_images == 0] == 0) and np.all(tokens[n_images > 0] > 0)
    # the generated images are all one size: one count per number of images; two images give twice one image's
    # tokens, except in LLaVA-OneVision, which tiles (anyres) only the image of a one-image sample
    per_count = {n: set(tokens[n_images == n].tolist()) for n in (1, 2)}
    assert all(len(counts) == 1 for counts in per_count.values()), per_count
    if architecture != "llava_onevision":
        assert per_count[2] == {2 * min(per_count[1])}, per_count
    norms = column_to_numpy(features.column(schema.GRAD_NORM))
    assert np.all(np.isfinite(norms)) and np.all(norms > 0)
    assert np.all(np.isfinite(column_to_numpy(features.column(schema.COINCIDE_VECTOR))))
    for method in cfg.select.methods:
        assert results["select"][method]["selected"] > 0, (method, results["select"][method])

    # the online scorer on this run: pool rows sent as they are (two images, one, none) get their features
    picked = [next(r for r in samples.values() if r[schema.N_IMAGES] == n) for n in (2, 1, 0)]
    served = Scorer(cfg.run_dir).score_records([json.loads(r[schema.RAW]) for r in picked])
    position = {int(i): k for k, i in enumerate(ids)}
    for row, got in zip(picked, served):
        k = position[row[schema.ROW_ID]]
        assert got["features"]["n_image_tokens"] == int(tokens[k]), (row[schema.ROW_ID], got["features"])
        assert got["coincide"]["pool_row_id"] == row[schema.ROW_ID]
