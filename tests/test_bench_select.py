"""Smoke test of the select benchmark: the feature-store generator and one tiny benchmark run (no Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.feature_store_gen import ALL_COLUMNS, generate_features, write_run_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


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
    feats = pq.read_table(tmp_path / "run" / "features" / "part-000000.parquet")
    assert feats.num_rows == 500 and feats.schema.field("coincide_vector").type.width == 1024
    samples = pq.read_table(tmp_path / "run" / "samples" / "part-00000.parquet")
    assert samples.column_names[:1] == ["row_id"] and {"raw", "source_file", "source_index"} <= set(
        samples.column_names)


def test_write_store_equals_generate_features(tmp_path):
    from benchmarks.feature_store_gen import StoreSpec, write_store

    from datasel_ray.pipeline.store import FeatureStore, read_shard
    from datasel_ray.io.storage import Location

    spec = StoreSpec(1300, seed=2, n_tasks=4, chunk_rows=500)
    write_store(tmp_path / "s", spec, ["coincide_vector", "tau"], shard_rows=200)
    store = FeatureStore(Location.parse(str(tmp_path / "s" / "features")))
    f = generate_features(spec, columns=["coincide_vector", "tau"])
    got = np.concatenate([read_shard(p, ["coincide_vector"])["coincide_vector"] for p in store.files])
    np.testing.assert_array_equal(got, f["coincide_vector"])
    np.testing.assert_array_equal(store.tasks.astype(str), f["task"].astype(str))
    assert store.widths == {"coincide_vector": 1024} and len(store.files) == 8  # 500-row chunks, 200-row shards


@pytest.mark.integration  # runs the benchmark's measurement subprocesses
@pytest.mark.timeout(900)
def test_bench_record_structure(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "bench_select.py"), "--dims", "tiny", "--sizes", "800,1600",
                           "--methods", "tive,random", "--n-tasks", "5", "--no-record", "--cache",
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "bench_select" and record["params"]["dims"] == "tiny"
    assert record["params"]["stores"]["1600"]["spec"]["hidden"] == 128  # dims recorded from the spec
    m = record["metrics"]
    assert m["failed"] == [] and len(m["cells"]) == 4
    for cell in m["cells"]:
        assert cell["exit"] == 0 and cell["max_process_peak_rss_mb"] > 0
        assert cell["select"][cell["method"]]["selected"] == cell["select"][cell["method"]]["budget_rows"] == \
            round(0.2 * cell["rows"])
    tive_cell = next(c for c in m["cells"] if c["method"] == "tive" and c["rows"] == 1600)
    assert tive_cell["aggregate"]["tive"]["proj_dim"] == 512
    assert tive_cell["serve_state"]["scored"] > 0
    assert isinstance(m["per_method"]["tive"]["time_exponent"], float)
    assert set(m["per_method"]["tive"]["targets"]) == {"rss_le_4gib", "rss_growth_le_10pct", "exponent_le_1_15",
                                                       "largest_within_target_minutes"}
