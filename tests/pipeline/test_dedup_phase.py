"""The dedup phase: identical across partitionings, equal to the in-process semantic pass, resumable, exact
duplicates from image bytes + text, and select.dedup selecting among the kept rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasel_ray.config import RunConfig
from datasel_ray.dedup import semantic
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.pipeline.aggregate import run_aggregate
from datasel_ray.pipeline.dedup import run_dedup
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.select import run_select

from dedup_store import EXACT_COPIES, N, generated_features, write_run


@pytest.fixture(scope="module")
def feats():
    return generated_features()


_write_run = write_run

def _config(tmp: Path, partition_bytes: int, **sections) -> RunConfig:
    data = {"run_dir": str(tmp), "seed": 2, "aggregate": {"executor": "local", "partition_bytes": partition_bytes},
            "dedup": {"num_clusters": 12, "workspace_bytes": 4096}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return RunConfig.model_validate(data)


def _tables(tmp: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in (layout.DROPPED, layout.PAIRS, layout.GROUPS, layout.TASKS, layout.CLUSTERS):
        t = pq.read_table(tmp / layout.DEDUP / name)
        out[name] = {c: column_to_numpy(t.column(c)) for c in t.column_names}
    return out


def _assert_same(a: dict, b: dict) -> None:
    for name in a:
        if name == layout.CLUSTERS:  # bucket / offset depend on the partition size
            np.testing.assert_array_equal(a[name][layout.SIZE], b[name][layout.SIZE])
            continue
        for column, values in a[name].items():
            np.testing.assert_array_equal(values, b[name][column], err_msg=f"{name}.{column}")


def test_partitioned_equals_one_partition_and_the_in_process_pass(tmp_path, feats):
    _write_run(tmp_path / "many", feats)
    many = run_dedup(_config(tmp_path / "many", 1 << 16), RunDir(str(tmp_path / "many")), quiet=True)
    _write_run(tmp_path / "one", feats)
    one = run_dedup(_config(tmp_path / "one", 1 << 30), RunDir(str(tmp_path / "one")), quiet=True)
    assert many["buckets"] > 3 and one["buckets"] == 1
    a, b = _tables(tmp_path / "many"), _tables(tmp_path / "one")
    _assert_same(a, b)
    assert many["dropped_exact"] == 3 and many["dropped_semantic"] > 30
    exact = a[layout.DROPPED][layout.PASS] == layout.PASS_EXACT
    got = dict(zip(a[layout.DROPPED]["row_id"][exact].tolist(), a[layout.DROPPED][layout.DUPLICATE_OF][exact].tolist()))
    assert got == EXACT_COPIES
    # the semantic rows equal the in-process reference on the same centroids (exact-dropped rows left out)
    centroids = np.load(tmp_path / "many" / layout.DEDUP / layout.CENTROIDS)
    rest = ~np.isin(feats["row_id"], list(EXACT_COPIES))
    visual = semantic.feature_vectors("coincide_visual", feats["coincide_vector"][rest], feats["last_token"].shape[1])
    assert visual.shape[1] == feats["coincide_vector"].shape[1] // 2
    ref = semantic.semantic_dedup(visual, feats["row_id"][rest], centroids, "hard", 0.01, workspace_bytes=4096)
    sem = ~exact
    d = a[layout.DROPPED]
    order = np.argsort(ref["row_id"][ref["dropped"]])
    np.testing.assert_array_equal(d["row_id"][sem], ref["row_id"][ref["dropped"]][order])
    np.testing.assert_array_equal(d[layout.SIMILARITY][sem], ref["similarity"][ref["dropped"]][order])
    np.testing.assert_array_equal(d[layout.DUPLICATE_OF][sem], ref["duplicate_of"][ref["dropped"]][order])
    # per-task counts add up
    t = a[layout.TASKS]
    assert int(t["rows"].sum()) == N and int((t["rows"] - t["kept"]).sum()) == len(d["row_id"])
    g = a[layout.GROUPS]
    assert int((g[layout.SIZE] - 1).sum()) == len(d["row_id"])
    kept = set(feats["row_id"].tolist()) - set(d["row_id"].tolist())
    assert set(d[layout.REPRESENTATIVE].tolist()) <= kept


@pytest.mark.integration  # Ray tasks on the session's local Ray
def test_ray_executor_equals_the_local_one(tmp_path, feats, ray_local):
    _write_run(tmp_path / "local", feats)
    run_dedup(_config(tmp_path / "local", 1 << 30), RunDir(str(tmp_path / "local")), quiet=True)
    _write_run(tmp_path / "ray", feats)
    res = run_dedup(_config(tmp_path / "ray", 1 << 16, aggregate={"executor": "ray"}),
                    RunDir(str(tmp_path / "ray")), quiet=True)
    assert res["executor"] == "ray" and res["buckets"] > 3
    _assert_same(_tables(tmp_path / "local"), _tables(tmp_path / "ray"))


def test_a_killed_dedup_resumes_per_bucket(tmp_path, feats, monkeypatch):
    _write_run(tmp_path / "clean", feats)
    run_dedup(_config(tmp_path / "clean", 1 << 16), RunDir(str(tmp_path / "clean")), quiet=True)
    _write_run(tmp_path / "killed", feats)
    calls = {"n": 0}
    real = semantic.cluster_dedup

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(semantic, "cluster_dedup", dying)
    with pytest.raises(KeyboardInterrupt):
        run_dedup(_config(tmp_path / "killed", 1 << 16), RunDir(str(tmp_path / "killed")), quiet=True)
    done_buckets = len(list((tmp_path / "killed" / layout.DEDUP / layout.WORK / "clusters").glob("*.npz")))
    assert done_buckets >= 1
    calls["n"] = -10**9  # no more failures; count the clusters computed on the rerun
    run_dedup(_config(tmp_path / "killed", 1 << 16), RunDir(str(tmp_path / "killed")), quiet=True)
    clusters_total = int((_tables(tmp_path / "clean")[layout.CLUSTERS][layout.SIZE] > 0).sum())
    assert calls["n"] + 10**9 < clusters_total  # finished buckets were loaded, not recomputed
    _assert_same(_tables(tmp_path / "clean"), _tables(tmp_path / "killed"))
    assert not (tmp_path / "killed" / layout.DEDUP / layout.WORK).exists()


def test_select_dedup_selects_among_kept_rows_with_a_whole_pool_budget(tmp_path, feats):
    tmp = tmp_path / "run"
    _write_run(tmp, feats)
    methods = ["coincide", "datatailor", "random", "random_per_task"]
    cfg = _config(tmp, 1 << 17, select={"dedup": True, "methods": methods, "budget": 0.2},
                  datatailor={"dense_max_rows": 400, "precluster_size": 150})
    res = run_dedup(cfg, RunDir(str(tmp)), quiet=True)
    kept_ids = np.sort(np.concatenate([column_to_numpy(pq.read_table(f).column("row_id"))
                                       for f in sorted((tmp / layout.DEDUP / layout.KEPT).glob("*.parquet"))]))
    dropped = column_to_numpy(pq.read_table(tmp / layout.DEDUP / layout.DROPPED).column("row_id"))
    assert len(kept_ids) == res["kept"] == N - len(dropped)
    assert not np.isin(kept_ids, dropped).any()
    run_aggregate(cfg, RunDir(str(tmp)), quiet=True)
    run_select(cfg, RunDir(str(tmp)), quiet=True)
    for method in methods:
        ids = np.load(tmp / layout.SELECTIONS / method / layout.SELECTED_IDS)
        summary = json.loads((tmp / layout.SELECTIONS / method / layout.SUMMARY).read_text())
        assert summary["dedup"] is True and summary["whole_pool_rows"] == N, method
        assert summary["budget_rows"] == round(0.2 * N) and summary["pool_rows"] == res["kept"], method
        assert len(np.unique(ids)) == round(0.2 * N), method
        assert not np.isin(ids, dropped).any(), method


def test_report_shows_dedup_counts_groups_and_histogram(tmp_path, feats):
    from datasel_ray.report import write_report

    tmp = tmp_path / "run"
    _write_run(tmp, feats)
    res = run_dedup(_config(tmp, 1 << 20), RunDir(str(tmp)), quiet=True)
    out = write_report(RunDir(str(tmp)))
    assert any(p.endswith("dedup.png") for p in out["plots"])
    summary = json.loads(Path(out["summary"]).read_text())["dedup"]
    assert summary["kept"] == res["kept"] and summary["groups"] == res["groups"]
    assert sum(t["dropped_exact"] + t["dropped_semantic"] for t in summary["tasks"]) == res["dropped"]
    biggest = summary["example_groups"][0]
    assert biggest[0]["kept"] and not any(m["kept"] for m in biggest[1:]) and len(biggest) >= 2
    similarities = [m["similarity"] for m in biggest[1:]]
    assert similarities == sorted(similarities, reverse=True) and all(s >= 1 - 0.01 - 1e-6 for s in similarities)
    # one image strip per example group (these rows have no images: each panel says so)
    assert len(out["dedup_groups"]) == len(summary["example_groups"]) == min(5, res["groups"])
    page = Path(out["html"]).read_text()
    assert "Near-duplicate removal" in page and f"kept {res['kept']:,} of {N:,} rows" in page


def test_select_dedup_without_a_dedup_phase_is_refused_before_work(tmp_path):
    from datasel_ray.pipeline.runner import preflight

    cfg = RunConfig.model_validate({"run_dir": str(tmp_path / "run"), "select": {"dedup": True}})
    with pytest.raises(ValueError, match="select.dedup is true but phases has no 'dedup'"):
        preflight(cfg, ["aggregate", "select"])
    preflight(cfg, ["dedup", "aggregate", "select"])  # with the phase: accepted


def test_dedup_config_defaults_are_nemo_curators():
    cfg = RunConfig().dedup
    assert (cfg.eps, cfg.ranking, cfg.num_clusters) == (0.01, "hard", 100)
    with pytest.raises(ValueError, match="ranking"):
        RunConfig.model_validate({"dedup": {"ranking": "random"}})
    assert "dedup" in RunConfig().phases and RunConfig().phases.index("dedup") < RunConfig().phases.index("aggregate")
