"""Scorer: frozen-stats scoring of pool members reproduces the select phase; input validation; TIVE helper."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from datasel_ray import schema
from datasel_ray.io.rundir import RunDir
from datasel_ray.methods import coincide, datatailor, tive
from datasel_ray.pipeline.feature_store import column_to_numpy, load_features
from datasel_ray.scoring import RunStats, SampleError, Scorer, score_pool_samples
from datasel_ray.pipeline.fit.tive import TiveState
from datasel_ray.scoring.state import MemberCache


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


@dataclass
class _Sample:
    """The fields of a validated request sample that the methods' ``score_new`` read."""

    task: str
    n_turns: int = 1


def _scores(run_dir: str, method: str) -> dict:
    table = (RunDir(run_dir) / "selections" / method / "scores.parquet").read_parquet()
    return {name: column_to_numpy(table.column(name)) for name in table.column_names}


def test_coincide_pool_rows_get_their_cluster_and_the_batch_decision(stats, pool_features, run_dir):
    pool = _scores(run_dir, "coincide")
    state = stats.states["coincide"]
    scored = [state.score_new({schema.COINCIDE_VECTOR: v}, None) for v in pool_features[schema.COINCIDE_VECTOR]]
    np.testing.assert_array_equal([s["cluster"] for s in scored], pool["cluster"])
    np.testing.assert_allclose([s["probability"] for s in scored], pool["probability"])
    _assert_pool_rows_recognised(scored, pool, pool_features[schema.COINCIDE_VECTOR])
    assert state.cache.nbytes <= state.cache.max_bytes


def _assert_pool_rows_recognised(scored: list[dict], pool: dict, vectors: np.ndarray) -> None:
    """Every pool row is recognised as itself, or as an earlier row with the same features (the pool's exact
    duplicates: ties go to the lowest row id), and gets that row's batch decision."""
    ids = pool[schema.ROW_ID]
    got = np.array([s["pool_row_id"] for s in scored])
    other = np.flatnonzero(got != ids)
    pos = np.searchsorted(ids, got[other])
    assert np.all(got[other] < ids[other])
    np.testing.assert_allclose(vectors[pos].astype(np.float32), vectors[other].astype(np.float32), atol=1e-2)
    would = np.array([s["would_select"] for s in scored])
    np.testing.assert_array_equal(would, pool["selected"][np.searchsorted(ids, got)])
    assert np.mean(would == pool["selected"]) >= 0.99, (len(other), np.mean(would == pool["selected"]))


def test_datatailor_pool_rows_get_the_batch_decision_and_values(stats, pool_features, run_dir):
    pool = _scores(run_dir, "datatailor")
    f = pool_features
    state = stats.states["datatailor"]
    scored = [state.score_new({schema.LAST_TOKEN: f[schema.LAST_TOKEN][i],
                               schema.INFORMATIVENESS: f[schema.INFORMATIVENESS][i]},
                              _Sample(task=str(f[schema.TASK][i]), n_turns=int(f[schema.N_TURNS][i])))
              for i in range(len(f[schema.ROW_ID]))]
    _assert_pool_rows_recognised(scored, pool, f[schema.LAST_TOKEN])


def test_replica_state_holds_no_pool_vectors(stats, pool_features):
    n = len(pool_features[schema.ROW_ID])
    for state in stats.states.values():
        for name, value in vars(state).items():
            if isinstance(value, np.ndarray):
                assert not (value.ndim == 2 and value.shape[0] == n), f"{name} holds a per-row matrix"


def test_coincide_new_sample_rule():
    ring = np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)])
    centre, far = np.array([0.0, 0.0]), np.array([3.0, 0.0])
    assert coincide.would_select_new(centre, ring, 1, False)  # the most central point is the first prototype
    assert not coincide.would_select_new(far, ring, 1, False)
    assert not coincide.would_select_new(centre, ring, 0, False)  # the cluster gave nothing
    assert coincide.would_select_new(far, ring, 3, True)  # taken whole
    assert coincide.match_member(ring[3] * (1 + 1e-6), ring, 1e-4) == 3
    assert coincide.match_member(np.array([1.0, 1.0]), ring, 1e-4) is None  # 15 degrees from the nearest


def test_uniqueness_of_a_member_equals_batch_formula():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(12, 5))
    v = rng.uniform(0.5, 2.0, size=12)
    labels = np.zeros(12, dtype=np.int64)
    _, pair_sum = datatailor.cluster_distance_sums(h, v)
    for mode in ("reference", "paper"):
        expected = datatailor.uniqueness(h, v, labels, mode)
        got = [datatailor.uniqueness_new(h[i], h, v, pair_sum, mode) for i in range(12)]
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_tive_state_instance_value_matches_batch_formula():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(30, 8)).astype(np.float32)
    codes = rng.integers(0, 3, size=30)
    state = TiveState(task_index={"a": 0, "b": 1, "c": 2}, task_value=np.ones(3),
                      mean_grad=tive.task_mean_gradients(g, codes), kappa={"a": 0.0, "b": None, "c": 2.0},
                      draw_all=set(), selected_fraction={"a": 0.5}, temperature=1.0, sampling="softmax")
    names = ["a", "b", "c"]
    got = [state.score_new({schema.GRAD_PROJ: g[i]}, _Sample(task=names[codes[i]]))["instance_value"]
           for i in range(30)]
    np.testing.assert_allclose(got, tive.instance_values(g, codes), atol=1e-5)
    # the task drew nothing
    assert state.score_new({schema.GRAD_PROJ: g[0]}, _Sample(task="b"))["inclusion_probability"] == 0.0


def test_tive_inclusion_probability_is_calibrated_against_repeated_draws():
    rng = np.random.default_rng(2)
    values = rng.uniform(-1, 1, 200)
    n, temperature = 40, 0.2
    kappa = tive.inclusion_threshold(values, n, temperature, "softmax")
    prob = tive.inclusion_probability(values, kappa, temperature, "softmax")
    assert prob.sum() == pytest.approx(n, abs=1e-6)
    hits = np.zeros(len(values))
    draws = 2000
    for seed in range(draws):
        hits[tive.sample_within_task(values, n, temperature, "softmax", np.random.default_rng(seed))] += 1
    freq = hits / draws
    assert np.abs(freq - prob).max() < 0.06
    brier = lambda p: np.mean([(np.isin(np.arange(len(values)), tive.sample_within_task(  # noqa: E731
        values, n, temperature, "softmax", np.random.default_rng(10_000 + s))) - p) ** 2 for s in range(200)])
    assert brier(prob) < brier(np.full(len(values), n / len(values)))
    top = tive.inclusion_probability(values, tive.inclusion_threshold(values, n, temperature, "topk"), temperature,
                                     "topk")
    assert top.sum() == n and set(np.unique(top)) <= {0.0, 1.0}


def test_member_cache_is_bounded(tmp_path):
    import pyarrow as pa

    from datasel_ray.io.storage import Location

    loc = Location.parse(str(tmp_path / "m.parquet"))
    loc.write_parquet(pa.table({"x": np.arange(100)}), row_group_rows=10)
    cache = MemberCache(max_bytes=25 * 8)  # 25 int64 values
    for off in range(0, 100, 10):
        assert cache.get(loc, off, 10, ["x"])["x"].tolist() == list(range(off, off + 10))
    assert cache.nbytes <= 25 * 8 and cache.rows == 20 and cache.misses == 10
    cache.get(loc, 90, 10, ["x"])
    assert cache.hits == 1


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
    coincide_scores = _scores(run_dir, "coincide")
    datatailor_scores = _scores(run_dir, "datatailor")
    for (row_id, _), result in zip(chosen, results):
        p = position[row_id]
        assert result["coincide"]["cluster"] == coincide_scores["cluster"][p]
        # re-extracted pool rows are recognised and get the batch decision
        assert result["coincide"]["pool_row_id"] == row_id
        assert result["coincide"]["would_select"] == bool(coincide_scores["selected"][p])
        assert result["datatailor"]["pool_row_id"] == row_id
        assert result["datatailor"]["would_select"] == bool(datatailor_scores["selected"][p])
        assert result["task"] == str(pool_features[schema.TASK][p])
        assert result["datatailor"]["informativeness"] == pytest.approx(
            float(pool_features[schema.INFORMATIVENESS][p]), abs=1e-3)
    # another batch composition pads differently: equal up to float rounding, same cluster
    alone = score_pool_samples(run_dir, records[:2])[0]["coincide"]
    assert alone["cluster"] == results[0]["coincide"]["cluster"]
    numeric = {k for k, v in alone.items() if isinstance(v, float)}
    assert {k: alone[k] for k in numeric} == pytest.approx({k: results[0]["coincide"][k] for k in numeric},
                                                            rel=1e-5, abs=1e-6)
    assert {k: v for k, v in alone.items() if k not in numeric} == \
        {k: v for k, v in results[0]["coincide"].items() if k not in numeric}


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
