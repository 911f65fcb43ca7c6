"""Smoke test of the select benchmark: the feature-store generator and one tiny benchmark run (no Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from feature_store_gen import ALL_COLUMNS, generate_features, write_run_dir  # noqa: E402


def test_generator_shapes_dtypes_and_structure():
    f = generate_features(3000, seed=3, chunk_rows=1024)
    assert list(f) == ["row_id", "task"] + [c for c in ALL_COLUMNS if c not in ("row_id", "task")]
    n = 3000
    assert f["coincide_vector"].shape == (n, 1024) and f["coincide_vector"].dtype == np.float16
    assert f["last_token"].shape == (n, 128) and f["last_token"].dtype == np.float16
    assert f["grad_proj"].shape == (n, 512) and f["grad_proj"].dtype == np.float32
    assert np.array_equal(f["row_id"], np.arange(n))
    assert len(np.unique(f["task"])) == 20
    norms = np.linalg.norm(f["coincide_vector"].astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    text = f["task"] == "text_only"
    assert text.any()
    halves = f["coincide_vector"][text].reshape(-1, 4, 2, 128)
    assert not halves[:, :, 0, :].any() and halves[:, :, 1, :].any()
    assert np.all(f["n_image_tokens"][text] == 0)
    assert np.all((f["tau"] > 0) & (f["tau"] < 1))
    assert np.all(f["informativeness"] > 0) and np.all(f["grad_norm"] > 0)
    assert set(np.unique(f["n_turns"])) <= {1, 2, 3}
    lt_norm = np.linalg.norm(f["last_token"].astype(np.float32), axis=1)
    assert lt_norm.min() > 5  # unnormalised
    # near duplicates exist: some pairs of rows are much closer than typical rows of the same concept
    x = f["last_token"][:1024].astype(np.float32)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert (d2.min(1) < 1.0).sum() >= 10
    # deterministic, and a column subset gives the same values
    g = generate_features(3000, seed=3, chunk_rows=1024, columns=["grad_proj"])
    assert set(g) == {"row_id", "task", "grad_proj"}
    assert np.array_equal(g["grad_proj"], f["grad_proj"]) and np.array_equal(g["task"], f["task"])
    assert not np.array_equal(generate_features(3000, seed=4, columns=["tau"])["tau"], f["tau"])


def test_write_run_dir(tmp_path):
    import pyarrow.parquet as pq

    f = generate_features(500, seed=0)
    write_run_dir(tmp_path / "run", f)
    feats = pq.read_table(tmp_path / "run" / "features" / "part-00000.parquet")
    assert feats.num_rows == 500 and feats.schema.field("coincide_vector").type.list_size == 1024
    samples = pq.read_table(tmp_path / "run" / "samples" / "part-00000.parquet")
    assert samples.column_names[:1] == ["row_id"] and {"raw", "source_file", "source_index"} <= set(
        samples.column_names)


@pytest.mark.integration  # runs the benchmark's measurement subprocesses
@pytest.mark.timeout(300)
def test_bench_record_structure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_SELECT_CACHE", str(tmp_path / "cache"))
    import bench_select

    results = tmp_path / "bench.jsonl"
    record = bench_select.main(["--sizes", "600,1200", "--methods", "tive,random", "--oracle-sizes", "300",
                                "--oracle-methods", "tive", "--results", str(results)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == record
    lines = results.read_text().splitlines()
    assert len(lines) == 1
    stored = json.loads(lines[0])
    assert "date" in stored and stored["benchmark"] == "bench_select" and stored["params"] == record["params"]
    assert record["params"]["sizes"] == [600, 1200]
    m = record["metrics"]
    for method in ("tive", "random"):
        for n in ("600", "1200"):
            row = m["table"][method][n]
            assert row["status"] == "ok", m["runs"][method][n]
            # wall time and memory are measured, not asserted: they belong to the benchmark record
            assert row["seconds"] > 0 and row["peak_rss_mb"] > 0 and row["peak_tree_rss_mb"] > 0
    tive_run = m["runs"]["tive"]["1200"]
    assert tive_run["selected"] == tive_run["budget_rows"] == 240
    assert {"tive.select", "tive.instance_values", "write_subset"} <= set(tive_run["steps"])
    assert tive_run["steps"]["tive.select"]["seconds"] > 0
    assert isinstance(m["summary"]["tive"]["post_clustering_exponent"], float)
    assert set(m["summary"]["tive"]["post_clustering_seconds"]) == {"600", "1200"}
    assert m["oracle"]["tive"]["300"]["agree"] is True
    assert set(m["targets"]["tive"]) >= {"seconds_le_900", "peak_rss_le_12gb"}
