"""The scorer on the demo run: a pool row rewritten in the other shapes (chat ``messages`` with a side image list,
typed parts, the image sent as base64 bytes) gets the same task, features and batch decision as the row itself;
a row with several images is refused per sample with the field named."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from datasel_ray import schema
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.feature_store import column_to_numpy, load_features
from datasel_ray.scoring import Scorer


@pytest.fixture(scope="module")
def run_dir(demo_run) -> str:
    return demo_run[0].run_dir


@pytest.fixture(scope="module")
def scorer(run_dir) -> Scorer:
    return Scorer(run_dir)


def _as_messages(record: dict) -> dict:
    return {"id": record.get("id"), "images": [record["image"]] if record.get("image") else [],
            "messages": [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]}
                         for t in record["conversations"]]}


def _as_parts(record: dict, image_root: Path) -> dict:
    messages = []
    for turn in record["conversations"]:
        role = {"human": "user", "gpt": "assistant"}[turn["from"]]
        if "<image>" in turn["value"]:
            text = turn["value"].replace("<image>\n", "")
            data = base64.b64encode((image_root / record["image"]).read_bytes()).decode()
            content = [{"type": "image", "image": {"bytes": data, "path": record["image"]}},
                       {"type": "text", "text": text}]
        else:
            content = [{"type": "text", "text": turn["value"]}]
        messages.append({"role": role, "content": content})
    return {"id": record.get("id"), "messages": messages}


def test_pool_rows_in_other_shapes_get_the_batch_decision(scorer, run_dir, demo_pool):
    records = json.loads(Path(demo_pool.pool_path).read_text())
    rd = RunDir(run_dir)
    table = (rd / "samples").list(".parquet")[0].read_parquet([schema.ROW_ID, schema.SOURCE_INDEX])
    features = load_features(rd, [schema.TASK])
    position = {int(r): i for i, r in enumerate(features[schema.ROW_ID])}
    chosen = [(int(r), int(s)) for r, s in zip(column_to_numpy(table.column(schema.ROW_ID)),
                                               column_to_numpy(table.column(schema.SOURCE_INDEX)))
              if int(r) in position and records[int(s)].get("image")][:3]
    scores = (rd / "selections" / "coincide" / "scores.parquet").read_parquet()
    selected = {int(r): bool(s) for r, s in zip(column_to_numpy(scores.column(schema.ROW_ID)),
                                                column_to_numpy(scores.column("selected")))}
    originals = [records[s] for _, s in chosen]
    shaped = [_as_messages(r) for r in originals] + [_as_parts(r, Path(demo_pool.image_root)) for r in originals]
    results = scorer.score_records(originals + shaped)
    for k, (row_id, _) in enumerate(chosen):
        want = results[k]
        assert want["coincide"]["pool_row_id"] == row_id
        for got in (results[len(chosen) + k], results[2 * len(chosen) + k]):
            assert got["task"] == want["task"] == str(features[schema.TASK][position[row_id]])
            assert got["coincide"]["pool_row_id"] == row_id
            assert got["coincide"]["would_select"] == selected[row_id]
            assert got["features"]["n_image_tokens"] == want["features"]["n_image_tokens"] > 0
            assert got["features"]["n_images"] == want["features"]["n_images"] == 1
            np.testing.assert_allclose(got["datatailor"]["score"], want["datatailor"]["score"], rtol=1e-4, atol=1e-5)


def test_several_images_per_sample_are_scored(scorer, demo_pool):
    records = json.loads(Path(demo_pool.pool_path).read_text())
    image = next(r["image"] for r in records if r.get("image") and (Path(demo_pool.image_root) / r["image"]).is_file())
    one = {"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                             {"from": "gpt", "value": "Shapes."}]}
    two = {"image": [image, image], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nAre these the same?"}, {"from": "gpt", "value": "Yes."}]}
    got_one, got_two = scorer.score_records([one, two])
    assert got_one["features"]["n_images"] == 1 and got_two["features"]["n_images"] == 2
    assert got_two["features"]["n_image_tokens"] == 2 * got_one["features"]["n_image_tokens"] > 0
