"""Scorer: frozen-stats scoring of pool members reproduces the select phase; input validation; TIVE helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasel_ray import schema
from datasel_ray.io.rundir import RunDir
from datasel_ray.methods import datatailor, tive
from datasel_ray.pipeline.feature_store import column_to_numpy, load_features
from datasel_ray.scoring import (
    RunStats,
    SampleError,
    Scorer,
    TiveStats,
    score_pool_samples,
    uniqueness_against_cluster,
)


@pytest.fixture(scope="module")
def run_dir(demo_run) -> str:
    return demo_run[0].run_dir


@pytest.fixture(scope="module")
def stats(run_dir) -> RunStats:
    return RunStats.load(RunDir(run_dir))


@pytest.fixture(scope="module")
def pool_features(run_dir) -> dict:
    return load_features(RunDir(run_dir), [schema.COINCIDE_VECTOR, schema.LAST_TOKEN, schema.INFORMATIVENESS,
                                           schema.TASK, schema.N_TURNS])


def _scores(run_dir: str, method: str) -> dict:
    table = (RunDir(run_dir) / "selections" / method / "scores.parquet").read_parquet()
    return {name: column_to_numpy(table.column(name)) for name in table.column_names}


def test_coincide_pool_members_land_in_their_cluster(stats, pool_features, run_dir):
    pool = _scores(run_dir, "coincide")
    scored = stats.coincide.score(pool_features[schema.COINCIDE_VECTOR])
    np.testing.assert_array_equal([s["cluster"] for s in scored], pool["cluster"])
    np.testing.assert_allclose([s["probability"] for s in scored], pool["probability"])
    np.testing.assert_allclose([s["transferability"] for s in scored], pool["transferability"])
    would = np.array([s["would_select"] for s in scored])
    assert would.sum() > 0 and abs(would.mean() - pool["selected"].mean()) < 0.1  # the rule selects at the budget


def test_datatailor_pool_members_reproduce_select_phase(stats, pool_features, run_dir):
    pool = _scores(run_dir, "datatailor")
    f = pool_features
    scored = [stats.datatailor.score_one(f[schema.LAST_TOKEN][i], float(f[schema.INFORMATIVENESS][i]),
                                         int(f[schema.N_TURNS][i]), str(f[schema.TASK][i]))
              for i in range(len(f[schema.ROW_ID]))]
    same = np.array([s["cluster"] for s in scored]) == pool["cluster"]
    assert same.mean() > 0.9  # nearest Ward-cluster mean == the Ward assignment for almost every member
    np.testing.assert_allclose(np.array([s["uniqueness"] for s in scored])[same], pool["uniqueness"][same],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.array([s["representativeness"] for s in scored])[same],
                               pool["representativeness"][same], rtol=1e-9)
    # percentile ranks agree wherever the member's values are not tied within its task (ties rank by position)
    tasks = pool[schema.TASK].astype(str)
    untied = np.ones(len(tasks), dtype=bool)
    for name in ("informativeness", "uniqueness", "representativeness"):
        for t in np.unique(tasks):
            rows = np.flatnonzero(tasks == t)
            _, inverse, counts = np.unique(pool[name][rows], return_inverse=True, return_counts=True)
            untied[rows] &= counts[inverse] == 1
    check = same & untied
    assert check.sum() > 10
    # a member's recomputed U may differ from the stored one in the last bit, which can move it past itself
    # (one rank step, 1/N_t, in one component); everything else must agree exactly
    diff = np.abs(np.array([s["score"] for s in scored]) - pool["score"])[check]
    n_task = np.array([np.sum(tasks == t) for t in tasks])[check]
    assert np.all(diff <= 1.0 / n_task / 3.0 + 1e-12)
    assert np.mean(diff < 1e-12) > 0.5


def test_uniqueness_of_a_member_equals_batch_formula():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(12, 5))
    v = rng.uniform(0.5, 2.0, size=12)
    labels = np.zeros(12, dtype=np.int64)
    from scipy.spatial.distance import cdist

    pair_sum = float(cdist(h, h).sum())
    for mode in ("reference", "paper"):
        expected = datatailor.uniqueness(h, v, labels, mode)
        got = [uniqueness_against_cluster(h[i], h, v, pair_sum, mode) for i in range(12)]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_tive_instance_value_matches_batch_formula():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(30, 8)).astype(np.float32)
    codes = rng.integers(0, 3, size=30)
    stats = TiveStats(task_index={"a": 0, "b": 1, "c": 2}, task_value=np.ones(3),
                      mean_grad=tive.task_mean_gradients(g, codes).astype(np.float64),
                      thresholds={"a": 0.0, "b": None, "c": 2.0}, selected_fraction={"a": 0.5})
    names = ["a", "b", "c"]
    got = [stats.score_one(g[i], names[codes[i]])["instance_value"] for i in range(30)]
    np.testing.assert_allclose(got, tive.instance_values(g, codes), atol=1e-5)
    assert stats.score_one(g[0], "b")["would_select"] is False  # no fitted threshold: never selected


@pytest.fixture(scope="module")
def scorer(run_dir) -> Scorer:
    return Scorer(run_dir)


@pytest.fixture(scope="module")
def pool_records(demo_pool) -> list[dict]:
    return json.loads(Path(demo_pool.pool_path).read_text())


def test_rescoring_pool_records_matches_their_features(scorer, run_dir, pool_records, pool_features):
    """A pool record sent as a new sample gets (nearly) the features and cluster the extract phase gave it."""
    samples = (RunDir(run_dir) / "samples").list(".parquet")
    table = samples[0].read_parquet([schema.ROW_ID, schema.SOURCE_INDEX])
    row_ids, index = column_to_numpy(table.column(schema.ROW_ID)), column_to_numpy(table.column(schema.SOURCE_INDEX))
    position = {int(r): i for i, r in enumerate(pool_features[schema.ROW_ID])}
    chosen = [(int(r), int(s)) for r, s in zip(row_ids, index) if int(r) in position][:8]
    records = [pool_records[s] for _, s in chosen]
    results = scorer.score_records(records)
    coincide = _scores(run_dir, "coincide")
    for (row_id, _), result in zip(chosen, results):
        p = position[row_id]
        assert result["coincide"]["cluster"] == coincide["cluster"][p]
        assert result["task"] == str(pool_features[schema.TASK][p])
        assert result["datatailor"]["informativeness"] == pytest.approx(
            float(pool_features[schema.INFORMATIVENESS][p]), abs=1e-3)
    # another batch composition pads differently: equal up to float rounding, same cluster
    alone = score_pool_samples(run_dir, records[:2])[0]["coincide"]
    assert alone["cluster"] == results[0]["coincide"]["cluster"]
    assert alone == pytest.approx(results[0]["coincide"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("record, field, reason, status", [
    ({"id": 1}, "samples[0].conversations", "missing_field", 422),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "samples[0].conversations", "no_assistant_turn", 422),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "task": "nope"},
     "samples[0].task", "unknown_task", 422),
    ({"image": "/etc/passwd", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "samples[0].image", "image_path_escape", 403),
    ({"task": "caption", "image_base64": "@@@", "conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]},
     "samples[0].image_base64", "image_corrupt", 422),
])
def test_bad_records_raise_sample_error(scorer, record, field, reason, status):
    with pytest.raises(SampleError) as info:
        scorer.score_records([record])
    assert (info.value.field, info.value.reason, info.value.status) == (field, reason, status)
    assert str(info.value).startswith(field)


def test_too_many_samples(scorer):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(SampleError) as info:
        scorer.score_records([record] * (scorer.limits.max_samples + 1))
    assert info.value.status == 413 and info.value.field == "samples"


def test_info_lists_methods_and_budgets(scorer, stats):
    info = scorer.info()
    assert info["methods"] == ["coincide", "datatailor"] and info["run_id"] == stats.run_id
    assert set(info["budgets"]) == {"coincide", "datatailor"} and info["tasks"] == stats.tasks


def test_scorer_refuses_a_projection_other_than_the_runs():
    from types import SimpleNamespace

    from datasel_ray.scoring import Scorer

    class Stage:
        def __init__(self, fingerprint):
            self.fingerprint = fingerprint

        def setup(self):
            pass

        def projector_fingerprint(self):
            return self.fingerprint

    recorded = {"kind": "rademacher", "proj_dim": 512, "generator": "torch-cpu", "seed": 7}
    scorer = Scorer.__new__(Scorer)
    scorer.run_dir = "runs/x"
    scorer.stats = SimpleNamespace(manifest={"phases": {"extract": {"result": {"projector": recorded}}}})
    scorer.gradients = Stage(dict(recorded))
    scorer._check_projector()  # same projection: accepted
    scorer.gradients = Stage({**recorded, "proj_dim": 8192, "generator": "torch-cuda"})
    with pytest.raises(ValueError, match=r"tive: .*projection.*'generator': \('torch-cpu', 'torch-cuda'\)"):
        scorer._check_projector()
    scorer.stats = SimpleNamespace(manifest={"phases": {"extract": {"result": {}}}})
    scorer._check_projector()  # a run from before projections were recorded
