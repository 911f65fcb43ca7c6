"""Ingest and extraction of a folder of pools in every shape (tests/shape_pools.py: LLaVA JSON with image lists,
HF parquet with embedded bytes, the_cauldron ``texts``, chat ``messages``), on Ray with the tiny model: every
good row gets one feature row whose image tokens count all of its images, and no row fails extraction."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from shape_pools import make_shape_pools

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.runner import run_phases

POOLS = ("llava_json", "ov_parquet", "cauldron_parquet", "messages_jsonl")


@pytest.mark.slow  # ingest + a Ray Data extraction with the tiny model
def test_every_shape_extracts_all_images_of_a_row(tmp_path, ray_local, tiny_model_dir):
    from datasel_ray.demo import demo_config

    image_root, pools = make_shape_pools(tmp_path / "shapes")
    folder = tmp_path / "pools"
    folder.mkdir()
    expected = {}
    for key in POOLS:
        target = folder / pools[key].path.name
        shutil.copy(pools[key].path, target)
        expected[str(target)] = pools[key].expected
    data = demo_config(tmp_path, folder, tive=False).model_dump(mode="json")
    data["run_dir"] = str(tmp_path / "run")
    data["pool"].update({"path": str(folder), "image_root": str(image_root), "task_map": None})
    data["model"]["name_or_path"] = str(tiny_model_dir)
    data["extract"].update({"shard_rows": 8, "batch_size": 4})
    cfg = RunConfig.model_validate(data)
    results = run_phases(cfg, ["ingest", "extract"], quiet=True)
    good = sum(1 for rows in expected.values() for e in rows if not e.reason)
    assert results["ingest"]["samples"] == good

    rd = RunDir(cfg.run_dir)
    samples = load_table(rd, "samples").to_pylist()
    n_images = {r[schema.ROW_ID]: r[schema.N_IMAGES] for r in samples}
    for r in samples:  # ingest kept what the shape fixtures expect, image counts included
        assert r[schema.N_IMAGES] == expected[r[schema.SOURCE_FILE]][r[schema.SOURCE_INDEX]].n_images
    assert max(n_images.values()) >= 2 and min(n_images.values()) == 0
    assert load_table(rd, "quarantine/extract") is None or load_table(rd, "quarantine/extract").num_rows == 0
    features = load_table(rd, "features")
    ids = column_to_numpy(features.column(schema.ROW_ID))
    assert sorted(ids.tolist()) == sorted(n_images)
    tokens = column_to_numpy(features.column(schema.N_IMAGE_TOKENS))
    images = np.array([n_images[i] for i in ids.tolist()])
    per_image = tokens[images > 0] / images[images > 0]
    assert np.all(tokens[images == 0] == 0)
    assert np.all(per_image == per_image[0]) and per_image[0] > 0, dict(zip(images.tolist(), tokens.tolist()))
