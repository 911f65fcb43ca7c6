"""Online near-duplicate answer from a run's dedup/ (exact digest lookup, nearest cluster's members)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.dedup import run_dedup
from datasel_ray.scoring.duplicates import DuplicateIndex
from datasel_ray.scoring.state import MemberCache

from dedup_store import generated_features, write_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    feats = generated_features()
    tmp = tmp_path_factory.mktemp("dedup-online")
    write_run(tmp, feats)
    cfg = RunConfig.model_validate({"run_dir": str(tmp), "aggregate": {"executor": "local", "partition_bytes": 1 << 16},
                                    "dedup": {"num_clusters": 12, "feature": "coincide_vector"}})
    run_dedup(cfg, RunDir(str(tmp)), quiet=True)
    return tmp, cfg, feats


def _sample(tmp: Path, row_id: int) -> tuple[list[bytes], list[dict]]:
    t = pq.read_table(sorted((tmp / "samples").glob("*.parquet"))[0])
    i = t.column("row_id").to_pylist().index(row_id)
    path = t.column("image_path")[i].as_py()
    return ([Path(path).read_bytes()] if path else []), json.loads(t.column("conversations")[i].as_py())


def test_exact_and_semantic_answers(run, tmp_path):
    tmp, cfg, feats = run
    cache = MemberCache(1 << 20)
    index = DuplicateIndex.load(RunDir(str(tmp)), cfg, cache)
    assert index is not None and index.threshold == pytest.approx(0.99)
    # a pool row re-sent: exact match on its image bytes + text (any letter case)
    image, turns = _sample(tmp, 21)
    turns[0]["value"] = turns[0]["value"].lower()
    row = {"coincide_vector": feats["coincide_vector"][21]}
    ans = index.answer(row, turns, image)
    assert ans["is_duplicate"] and ans["pass"] == layout.PASS_EXACT and ans["row_id"] == 21
    # a new image and text whose vector is a pool row's plus tiny noise: semantic match to that row (or its copy)
    other = [b"never seen"]
    rng = np.random.default_rng(0)
    v = feats["coincide_vector"][21].astype(np.float32) + 1e-4 * rng.standard_normal(feats["coincide_vector"].shape[1])
    ans = index.answer({"coincide_vector": v}, [{"from": "human", "value": "new"}], other)
    assert ans["is_duplicate"] and ans["pass"] == layout.PASS_SEMANTIC and ans["similarity"] >= 0.99
    u = feats["coincide_vector"].astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    assert u[ans["row_id"]] @ u[21] >= 0.99
    misses_before = cache.misses
    index.answer({"coincide_vector": v}, [{"from": "human", "value": "new"}], other)
    assert cache.misses == misses_before and cache.hits >= 1  # the cluster's members came from the cache
    # a vector unlike every pool row: the most similar member is reported, not a duplicate
    far = rng.standard_normal(feats["coincide_vector"].shape[1]).astype(np.float32)
    ans = index.answer({"coincide_vector": far}, [{"from": "human", "value": "new"}], [])
    assert not ans["is_duplicate"] and ans["pass"] is None and ans["similarity"] < 0.99
    assert ans["row_id"] is not None and 0 <= ans["cluster"] < 12


def test_coincide_visual_answer_reads_the_image_halves(run, tmp_path):
    tmp, cfg, feats = run
    cfg = cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update={"feature": "coincide_visual"})})
    target = tmp_path / "visual"
    write_run(target, feats)
    cfg = cfg.model_copy(update={"run_dir": str(target)})
    run_dedup(cfg, RunDir(str(target)), quiet=True)
    index = DuplicateIndex.load(RunDir(str(target)), cfg, MemberCache(1 << 20))
    image_rows = np.flatnonzero(feats["task"] != "text_only")
    r = int([i for i in image_rows if i not in (3, 7, 9, 12, 400)][5])
    v = feats["coincide_vector"][r].astype(np.float32).copy()
    half = feats["last_token"].shape[1]
    v.reshape(-1, 2, half)[:, 1, :] = 0.5  # a different text: the visual halves still match row r
    ans = index.answer({"coincide_vector": v, "last_token": feats["last_token"][r]},
                       [{"from": "human", "value": "new"}], [])
    assert ans["is_duplicate"] and ans["pass"] == layout.PASS_SEMANTIC and ans["similarity"] >= 0.999, (ans, r)


def test_no_dedup_phase_means_no_index(tmp_path):
    assert DuplicateIndex.load(RunDir(str(tmp_path)), RunConfig(), MemberCache()) is None


def test_score_results_carry_the_duplicate_answer(demo_run, demo_pool, tmp_path):
    """End to end on the tiny model: a pool record sent to the scorer is an exact duplicate of its own row."""
    import shutil

    from datasel_ray import schema
    from datasel_ray.pipeline.feature_store import column_to_numpy
    from datasel_ray.scoring.scorer import Scorer
    from datasel_ray.synthetic import read_pool

    cfg, _ = demo_run
    copy = tmp_path / "run"
    shutil.copytree(cfg.run_dir, copy)
    # both passes (the demo config runs the exact pass alone with the tiny model)
    dedup_cfg = cfg.model_copy(update={"run_dir": str(copy), "dedup": cfg.dedup.model_copy(update={"semantic": True})})
    run_dedup(dedup_cfg, RunDir(str(copy)), quiet=True)
    table = sorted((copy / "samples").glob("*.parquet"))[0]
    t = pq.read_table(table, columns=[schema.ROW_ID, schema.SOURCE_INDEX, schema.IMAGE_PATH])
    exact = set(column_to_numpy(pq.read_table(copy / layout.DEDUP / layout.DROPPED).column("row_id")).tolist())
    rows = [(int(r), int(s)) for r, s, img in zip(column_to_numpy(t.column(schema.ROW_ID)),
                                                  column_to_numpy(t.column(schema.SOURCE_INDEX)),
                                                  t.column(schema.IMAGE_PATH).to_pylist()) if img and int(r) not in exact][:3]
    records = read_pool(demo_pool.pool_path)
    results = Scorer(str(copy)).score_records([records[s] for _, s in rows])
    for (row_id, _), result in zip(rows, results):
        dup = result["duplicate"]
        assert dup["is_duplicate"] and dup["pass"] == layout.PASS_EXACT and dup["row_id"] == row_id, dup
        assert dup["cluster"] is not None and dup["feature"] == "coincide_visual"
