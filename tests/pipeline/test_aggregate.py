"""Aggregate + select as a partitioned pipeline: identical results across partitionings and executors, equal
to the library methods, resumable per partition, and the COINCIDE reduction recovering known clusters."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.aggregate import run_aggregate
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.select import run_select

from benchmarks.feature_store_gen import generate_features, write_features, write_samples

METHODS = ["coincide", "datatailor", "tive", "random", "random_per_task", "answer_loss"]


@pytest.fixture(scope="module")
def store_feats():
    """2,400 generated rows over 5 tasks (two larger than datatailor.dense_max_rows below)."""
    return generate_features(2400, seed=3, n_tasks=5)


def _config(tmp: Path, executor: str, partition_bytes: int, **overrides) -> RunConfig:
    data = {"run_dir": str(tmp), "seed": 5, "select": {"methods": METHODS, "budget": 0.15},
            "tive": {"enabled": True}, "aggregate": {"executor": executor, "partition_bytes": partition_bytes},
            "datatailor": {"dense_max_rows": 400, "precluster_size": 150}}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return RunConfig.model_validate(data)


def _write_store(tmp: Path, feats: dict) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    write_features(tmp, feats, shard_rows=200)
    write_samples(tmp, feats["row_id"], feats["task"])


def _run(tmp: Path, feats: dict, executor: str, partition_bytes: int, write: bool = True, **overrides) -> RunConfig:
    if write:
        _write_store(tmp, feats)
    cfg = _config(tmp, executor, partition_bytes, **overrides)
    run_aggregate(cfg, RunDir(str(tmp)), quiet=True)
    run_select(cfg, RunDir(str(tmp)), quiet=True)
    return cfg


def _selection(run_dir: Path, method: str) -> tuple[np.ndarray, dict]:
    table = (RunDir(str(run_dir)) / layout.SELECTIONS / method / layout.SCORES).read_parquet()
    cols = {n: column_to_numpy(table.column(n)) for n in table.column_names}
    return np.load(run_dir / layout.SELECTIONS / method / layout.SELECTED_IDS), cols


@pytest.mark.integration  # many Ray tasks on the session's local Ray
def test_partitioned_ray_run_equals_in_process_run(tmp_path, store_feats, ray_local):
    _run(tmp_path / "local", store_feats, "local", 1 << 30)
    _run(tmp_path / "ray", store_feats, "ray", 1 << 17)  # ~128 KiB: many partitions and buckets
    meta = (RunDir(str(tmp_path / "ray")) / layout.STATS / layout.META).read_json()
    assert meta["executor"] == "ray" and meta["coincide"]["buckets"] > 3
    for method in METHODS:
        ids_local, scores_local = _selection(tmp_path / "local", method)
        ids_ray, scores_ray = _selection(tmp_path / "ray", method)
        np.testing.assert_array_equal(ids_local, ids_ray, err_msg=method)
        for name, values in scores_local.items():
            np.testing.assert_array_equal(values, scores_ray[name], err_msg=f"{method}.{name}")


def test_pipeline_equals_library_methods(tmp_path, store_feats, monkeypatch):
    from datasel_ray.methods import coincide, datatailor, tive
    from datasel_ray.seeds import derive_seed

    monkeypatch.setattr(coincide, "TRANSFER_BLOCK", 5)  # several row-block tasks merging column blocks

    cfg = _run(tmp_path / "run", store_feats, "local", 1 << 18)
    f = store_feats
    budget = cfg.select.budget_rows(len(f["row_id"]))
    co = coincide.select(f["coincide_vector"], budget, cfg.coincide, seed=derive_seed(5, "coincide", "kmeans"),
                         n_layers=4)
    dt = datatailor.select(f["last_token"], f["informativeness"], f["tau"], f["n_turns"], f["task"], budget,
                           cfg.datatailor, seed=derive_seed(5, "datatailor"))
    tv = tive.select(f["grad_proj"], f["grad_norm"], f["task"], budget, cfg.tive,
                     seed=derive_seed(5, "tive", "sampling"))
    ids = f["row_id"]
    for method, expected in (("coincide", co.selected), ("datatailor", dt.selected), ("tive", tv.selected)):
        got, scores = _selection(tmp_path / "run", method)
        np.testing.assert_array_equal(got, np.sort(ids[expected]), err_msg=method)
    _, scores = _selection(tmp_path / "run", "coincide")
    np.testing.assert_array_equal(scores["cluster"], co.labels)
    np.testing.assert_allclose(scores["transferability"], co.row_S, rtol=1e-12)
    np.testing.assert_allclose(scores["density"], co.row_D, rtol=1e-12)
    assert (scores["selection_order"][co.selected] == np.arange(len(co.selected))).all()
    # bucket tasks are packed from the actual cluster sizes: none holds more than partition_bytes (unless one
    # cluster alone is larger), whatever the k-means sample estimated
    clusters = (layout.method_stats(RunDir(str(tmp_path / "run")), "coincide") / layout.CLUSTERS).read_parquet()
    size, bucket = column_to_numpy(clusters.column(layout.SIZE)), column_to_numpy(clusters.column(layout.BUCKET))
    filled = np.unique(bucket[size > 0])
    assert len(filled) > 3
    for b in filled:
        members = (bucket == b) & (size > 0)
        assert size[members].sum() * f["coincide_vector"].shape[1] * 2 <= 1 << 18 or members.sum() == 1
    _, scores = _selection(tmp_path / "run", "datatailor")
    np.testing.assert_allclose(scores["uniqueness"], dt.U, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(scores["score"], dt.score, rtol=1e-12)


def test_coincide_reduce_dim_same_centroids_in_library_pipeline_and_serve(tmp_path, store_feats, monkeypatch):
    from datasel_ray.methods import coincide
    from datasel_ray.methods.registry import get_method
    from datasel_ray.scoring.state import MemberCache
    from datasel_ray.seeds import derive_seed

    monkeypatch.setattr(coincide, "TRANSFER_BLOCK", 5)  # blocks of cluster means spanning several bucket files

    over = {"coincide": {"reduce_dim": 32, "reduce_method": "random", "train_sample": 1500}}
    cfg = _run(tmp_path / "run", store_feats, "local", 1 << 18, **over)
    f = store_feats
    budget = cfg.select.budget_rows(len(f["row_id"]))
    lib = coincide.select(f["coincide_vector"], budget, cfg.coincide, seed=derive_seed(5, "coincide", "kmeans"),
                          n_layers=4)
    got, scores = _selection(tmp_path / "run", "coincide")
    np.testing.assert_array_equal(scores["cluster"], lib.labels)
    np.testing.assert_allclose(scores["transferability"], lib.row_S, rtol=1e-6)
    np.testing.assert_array_equal(got, np.sort(f["row_id"][lib.selected]))
    state = type(get_method("coincide")).load(RunDir(str(tmp_path / "run")), cfg, {}, MemberCache())
    served, _ = state.assign(f["coincide_vector"])
    np.testing.assert_array_equal(served, lib.labels)  # a pool row is served in its stored cluster


@pytest.mark.slow  # a kill-and-resume scenario, as the other resume tests (test_fault_tolerance, test_extract)
def test_aggregate_resumes_per_partition_after_a_kill(tmp_path, store_feats, monkeypatch):
    from datasel_ray.pipeline.fit import coincide as fit_coincide

    _run(tmp_path / "ref", store_feats, "local", 1 << 17)
    calls = {"n": 0}
    original = fit_coincide._cluster_stats

    def dying(task):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(task)

    monkeypatch.setattr(fit_coincide, "_cluster_stats", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", store_feats, "local", 1 << 17)
    work = tmp_path / "resumed" / "stats" / "_work"
    assert len(list((work / "coincide:assign").glob("*.npz"))) > 1  # finished partitions were kept
    assert len(list((work / "coincide:clusters").glob("*.npz"))) == 2
    seen = []
    monkeypatch.setattr(fit_coincide, "_cluster_stats", original)
    monkeypatch.setattr(fit_coincide, "_assign", lambda task: seen.append(task.part.key))
    _run(tmp_path / "resumed", store_feats, "local", 1 << 17, write=False)
    assert seen == []  # every assignment partition was loaded from its result file, none recomputed
    assert not work.exists()
    for method in METHODS:
        np.testing.assert_array_equal(_selection(tmp_path / "ref", method)[0],
                                      _selection(tmp_path / "resumed", method)[0], err_msg=method)


def _ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings."""
    from math import comb

    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)
    sum_comb = sum(comb(int(x), 2) for x in table.ravel())
    rows = sum(comb(int(x), 2) for x in table.sum(1))
    cols = sum(comb(int(x), 2) for x in table.sum(0))
    expected = rows * cols / comb(len(a), 2)
    return (sum_comb - expected) / (0.5 * (rows + cols) - expected)


def test_random_projection_recovers_known_clusters_as_well_as_pca_and_no_reduction():
    from datasel_ray.clustering import spherical_kmeans

    rng = np.random.default_rng(0)
    k, d, n = 12, 384, 1200  # faiss PCA costs O(d^3): keep d small here
    centres = rng.standard_normal((k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centres[truth] + 0.9 * rng.standard_normal((n, d)) / np.sqrt(d)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    def mean_ari(**kw) -> float:  # over k-means seeds: one seed's local optimum can merge two blobs
        return float(np.mean([_ari(truth, spherical_kmeans(x, k, niter=20, seed=s, **kw)[1]) for s in (1, 2, 3)]))

    full = mean_ari()
    pca = mean_ari(reduce_dim=48, reduce_method="pca")
    rand = mean_ari(reduce_dim=48, reduce_method="random")
    assert full > 0.8
    assert rand >= min(full, pca) - 0.05, (full, pca, rand)
