"""A method defined in this file, registered through the public contract (``register_method``), runs through the
config, the aggregate and select phases, the online scorer's state (``RunStats.score_new``, what ``Scorer`` and
``POST /score`` answer with) and the report, with no edit to the package."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.methods.registry import (SelectionMethod, fitted_methods, method_names, register_method,
                                          scored_methods, unregister_method)
from datasel_ray.pipeline.aggregate import run_aggregate
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.fit.context import FitContext, MethodSelection
from datasel_ray.pipeline.select import run_select
from datasel_ray.report import write_report
from datasel_ray.scoring.state import RunStats

from benchmarks.feature_store_gen import generate_features, write_features, write_samples


class TauAboveTaskMedian(SelectionMethod):
    """Rank rows by how far their τ lies above their task's median τ (fitted in aggregate, frozen for scoring)."""

    name = "tau_above_median"
    description = "Test method: τ minus the task's median τ, highest first."
    columns = (schema.TAU,)
    fits = True
    scored = True
    report_clusters = "Tasks as clusters"

    MEDIANS = "medians.json"  # stats/tau_above_median/medians.json: {task: median τ}
    MARGIN = "margin"  # scores.parquet column
    CUTOFF = "margin_cutoff"  # summary.json key: the lowest selected margin

    def fit(self, ctx: FitContext) -> dict:
        tau = ctx.scalars([schema.TAU])[schema.TAU].astype(np.float64)
        codes = ctx.store.task_codes
        medians = {str(name): float(np.median(tau[codes == t])) for t, name in enumerate(ctx.store.task_names)}
        (ctx.stats(self.name) / self.MEDIANS).write_json(medians)
        sizes = np.bincount(codes, minlength=len(medians)).astype(np.int64)  # the report's cluster plot
        (ctx.stats(self.name) / layout.CLUSTERS).write_parquet(pa.table({
            layout.CLUSTER: np.arange(len(sizes), dtype=np.int64), layout.SIZE: sizes}))
        return {"tasks": len(medians)}

    def select(self, ctx: FitContext, budget: int) -> MethodSelection:
        medians = (layout.method_stats(ctx.run_dir, self.name) / self.MEDIANS).read_json()
        tau = ctx.scalars([schema.TAU])[schema.TAU].astype(np.float64)
        names = ctx.store.task_names.astype(str)
        margin = tau - np.array([medians[n] for n in names])[ctx.store.task_codes]
        selected = np.sort(np.argsort(-margin, kind="stable")[:budget]).astype(np.int64)
        return MethodSelection(selected=selected, columns={self.MARGIN: margin, layout.SCORE: margin},
                               summary={self.CUTOFF: float(margin[selected].min())})

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: Any) -> _TauState:
        return _TauState((layout.method_stats(run_dir, cls.name) / cls.MEDIANS).read_json(), summary[cls.CUTOFF])


@dataclass
class _TauState:
    medians: dict[str, float]
    cutoff: float

    def score_new(self, features: dict[str, Any], sample: Any) -> dict:
        margin = float(features[schema.TAU]) - self.medians[sample.task]
        return {"margin": margin, "would_select": margin >= self.cutoff}


@dataclass
class _Sample:
    task: str
    n_turns: int = 1


@pytest.fixture
def registered():
    register_method(TauAboveTaskMedian)
    yield TauAboveTaskMedian
    unregister_method(TauAboveTaskMedian.name)


def test_a_registered_method_runs_through_every_phase(tmp_path, registered):
    assert registered.name in method_names() and registered.name in scored_methods()
    assert fitted_methods([registered.name, "random"], tive_enabled=False) == [registered.name]
    feats = generate_features(600, seed=4, n_tasks=3)
    run = tmp_path / "run"
    shutil.rmtree(run, ignore_errors=True)
    write_features(run, feats, shard_rows=200)
    write_samples(run, feats["row_id"], feats["task"])
    cfg = RunConfig.model_validate({"run_dir": str(run), "seed": 5,
                                    "select": {"methods": [registered.name, "random"], "budget": 0.1}})
    (run / "manifest.json").write_text(json.dumps({"run_id": "custom", "config": cfg.model_dump(mode="json")}))
    run_dir = RunDir(str(run))

    aggregated = run_aggregate(cfg, run_dir, quiet=True)
    assert aggregated[registered.name] == {"tasks": 3}
    run_select(cfg, run_dir, quiet=True)

    # select: the method's own selection, scores and summary key, through the generic select phase
    out = layout.selection_dir(run_dir, registered.name)
    tau, tasks = feats[schema.TAU].astype(np.float64), feats["task"].astype(str)
    margin = tau - np.array([np.median(tau[tasks == t]) for t in tasks])
    expected = np.sort(feats["row_id"][np.argsort(-margin, kind="stable")[:60]])
    np.testing.assert_array_equal((out / layout.SELECTED_IDS).read_npy(), expected)
    table = (out / layout.SCORES).read_parquet()
    np.testing.assert_allclose(column_to_numpy(table.column(registered.MARGIN)), margin, rtol=1e-12)
    summary = (out / layout.SUMMARY).read_json()
    assert summary["selected"] == 60 and summary[registered.CUTOFF] == pytest.approx(np.sort(margin)[-60])

    # online scoring: the run's state answers for the method, keyed by its name
    stats = RunStats.load(run_dir)
    assert stats.methods == [registered.name] and not stats.needs_gradients
    picked, skipped = int(np.argmax(margin)), int(np.argmin(margin))
    answers = [stats.score_new({schema.TAU: feats[schema.TAU][i]}, _Sample(tasks[i])) for i in (picked, skipped)]
    assert answers[0][registered.name] == {"margin": pytest.approx(margin[picked]), "would_select": True}
    assert answers[1][registered.name]["would_select"] is False

    # report: a row for the method, its task counts and score histogram, and the cluster plot its class names
    report = write_report(run_dir)
    rows = {r["method"]: r for r in json.loads(Path(report["summary"]).read_text())["methods"]}
    assert rows[registered.name]["selected"] == 60
    assert rows[registered.name]["task_counts"] == summary["task_counts"]
    page = Path(report["html"]).read_text()
    assert registered.name in page and "Tasks as clusters" in page
    assert f"{registered.name}_clusters.png" in {Path(p).name for p in report["plots"]}


def test_an_unregistered_method_is_refused_by_the_config():
    with pytest.raises(ValueError, match="Unknown method 'tau_above_median'"):
        RunConfig.model_validate({"run_dir": "/tmp/x", "select": {"methods": ["tau_above_median"]}})


@pytest.mark.integration  # the session's demo run (Ray ingest + extract) and the tiny model
def test_a_registered_method_answers_post_score(demo_run, demo_pool, tmp_path, registered):
    """The registered method on a copy of the demo run: aggregate and select, then the served path of
    ``POST /score`` (``serve.app.parse_and_score_requests`` over a loaded :class:`Scorer`) answers for it."""
    from datasel_ray.scoring import Scorer
    from serve.app import parse_and_score_requests

    cfg, _ = demo_run
    run = tmp_path / "run"
    shutil.copytree(cfg.run_dir, run)
    mine = cfg.model_copy(deep=True)
    mine.run_dir = str(run)
    mine.select.methods = ["coincide", registered.name]
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"] = mine.model_dump(mode="json")
    (run / "manifest.json").write_text(json.dumps(manifest))
    run_aggregate(mine, RunDir(str(run)), quiet=True)
    run_select(mine, RunDir(str(run)), quiet=True)

    scorer = Scorer(str(run))
    assert scorer.info()["methods"][-1] == registered.name  # after the copied run's built-in methods
    records = json.loads(Path(demo_pool.pool_path).read_text())[:40]
    good = [r for r in records if not isinstance(scorer_parse_error(scorer, r), Exception)][:4]
    assert len(good) == 4
    [(samples, results)] = parse_and_score_requests([(scorer, {"samples": good})], pass_size=8)
    medians = (layout.method_stats(RunDir(str(run)), registered.name) / registered.MEDIANS).read_json()
    cutoff = (layout.selection_dir(RunDir(str(run)), registered.name) / layout.SUMMARY).read_json()[registered.CUTOFF]
    for result in results:
        answer = result[registered.name]
        assert answer["margin"] == pytest.approx(result["features"]["tau"] - medians[result["task"]], abs=1e-6)
        assert answer["would_select"] == (answer["margin"] >= cutoff)
        assert "cluster" in result["coincide"]


def scorer_parse_error(scorer, record) -> Exception | None:
    """The SampleError a record raises when parsed (the demo pool has injected bad rows), else None."""
    from datasel_ray.scoring import SampleError

    try:
        scorer.parse({"samples": [record]})
    except SampleError as err:
        return err
    return None
