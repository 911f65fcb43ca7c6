"""ingest -> warm-up -> extract (COINCIDE, DataTailor, TIVE) -> aggregate -> select on a small generated pool with a
tiny random Qwen2-VL (concatenated patches, M-RoPE, image-only processor) through the Ray pipeline; the extract
manifest entry names the hook points. The generated pool is LLaVA-shaped (one image or none per row); several
images per row are covered by tests/models/test_architectures.py at the extractor level."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_architectures import build

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases
from datasel_ray.synthetic import SynthConfig, generate_pool


@pytest.mark.slow
def test_qwen2_vl_through_every_phase(tmp_path, ray_local):
    from datasel_ray.demo import demo_config

    model_dir = build("qwen2_vl", tmp_path / "qwen2-vl")
    info = generate_pool(tmp_path / "pool", SynthConfig(num_samples=48, seed=3, bad_rate=0.0))
    data = demo_config(tmp_path, info.pool_path, tive=True).model_dump(mode="json")
    data["model"]["name_or_path"] = str(model_dir)
    data["phases"] = ["ingest", "warmup", "extract", "aggregate", "select"]
    data["extract"].update({"shard_rows": 16, "batch_size": 4})
    cfg = RunConfig.model_validate(data)
    results = run_phases(cfg, quiet=True)
    assert results["extract"]["failed"] == 0
    hooks = results["extract"]["hooks"]
    assert hooks["architecture"] == "Qwen2VLForConditionalGeneration"
    assert hooks["datatailor_module"] == "model.language_model.layers.3"
    manifest = RunDir(cfg.run_dir).load_manifest()
    assert manifest["phases"]["extract"]["result"]["hooks"] == hooks
    features = load_table(RunDir(cfg.run_dir), "features")
    norms = column_to_numpy(features.column(schema.GRAD_NORM))
    assert len(norms) == 48 and np.all(norms > 0)
    images = column_to_numpy(features.column(schema.N_IMAGE_TOKENS))
    assert (images > 0).any() and (images == 0).any()
    for method in cfg.select.methods:
        assert results["select"][method]["selected"] > 0

    # the online scorer on this run: a pool row sent as it is gets the features extraction computed for it
    import json

    from datasel_ray.scoring.scorer import Scorer

    samples = load_table(RunDir(cfg.run_dir), "samples").to_pylist()
    rows = [r for r in samples if r[schema.N_IMAGES] == 1][:2] + [r for r in samples if r[schema.N_IMAGES] == 0][:1]
    served = Scorer(cfg.run_dir).score_records([json.loads(r[schema.RAW]) for r in rows])
    position = {int(i): k for k, i in enumerate(column_to_numpy(features.column(schema.ROW_ID)))}
    for row, got in zip(rows, served):
        k = position[row[schema.ROW_ID]]
        assert got["features"]["n_image_tokens"] == int(images[k]), (row[schema.ROW_ID], got["features"])
        assert got["coincide"]["pool_row_id"] == row[schema.ROW_ID]
