"""The report phase on fabricated run directories: full, partial and empty."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from datasel_ray.io.rundir import RunDir
from datasel_ray.report import plot_specs, write_report

TASKS = ("caption", "color_qa", "counting", "ocr", "text_chat")
TASK_WEIGHTS = (0.35, 0.25, 0.2, 0.15, 0.05)
METHODS = ("coincide", "datatailor", "random")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


IMAGE_STRUCT = pa.struct([("ref", pa.string()), ("uri", pa.string()), ("data", pa.binary())])


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> bytes:
    from PIL import Image

    sink = io.BytesIO()
    Image.new("RGB", size, colour).save(sink, format="PNG")
    return sink.getvalue()


def _images(run_dir: RunDir, row: int) -> list[dict]:
    """The samples' images: row 0 (the duplicate group's kept row) and even rows one file under the run
    directory; row 1 two (a file and embedded bytes); row 3 a file that was removed; other odd rows none."""
    folder = Path(str(run_dir)) / "pool-images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row}.png"
    if row % 2 == 0 or row in (1, 3):
        path.write_bytes(_png((row % 256, 90, 160)))
    out = [{"ref": f"{row}.png", "uri": str(path), "data": None}] if row % 2 == 0 or row in (1, 3) else []
    if row == 1:
        out.append({"ref": "inline.png", "uri": "", "data": _png((250, 200, 10))})
    if row == 3:
        path.unlink()
    return out


def _write_samples(run_dir: RunDir, rng: np.random.Generator, n_rows: int) -> np.ndarray:
    tasks = rng.choice(TASKS, size=n_rows, p=TASK_WEIGHTS)
    for shard, rows in enumerate(np.array_split(np.arange(n_rows), 2)):
        (run_dir / "samples" / f"block-{shard:05d}.parquet").write_parquet(pa.table({
            "row_id": pa.array(rows, pa.int64()),
            "task": pa.array(tasks[rows].tolist(), pa.string()),
            "n_turns": pa.array(rng.integers(1, 5, size=len(rows)), pa.int32()),
            "images": pa.array([_images(run_dir, int(r)) for r in rows], pa.list_(IMAGE_STRUCT)),
            "conversations": [json.dumps([{"from": "human", "value": f"question {r}"}]) for r in rows],
        }))
    return tasks


def _write_quarantine(run_dir: RunDir, phase: str, reasons: list[str]) -> None:
    n = len(reasons)
    (run_dir / "quarantine" / phase / "block-00000.parquet").write_parquet(pa.table({
        "row_id": pa.array(range(10_000, 10_000 + n), pa.int64()),
        "phase": [phase] * n, "reason": reasons, "message": ["fabricated"] * n, "raw": ["{}"] * n,
    }))


def _write_selection(run_dir: RunDir, method: str, tasks: np.ndarray, budget: int, rng: np.random.Generator) -> None:
    scores = rng.gamma(2.0, 1.0, size=len(tasks)) if method != "random" else rng.random(len(tasks))
    selected = np.zeros(len(tasks), dtype=bool)
    selected[np.argsort(-scores)[:budget]] = True
    folder = run_dir / "selections" / method
    (folder / "scores.parquet").write_parquet(pa.table({
        "row_id": pa.array(np.arange(len(tasks)), pa.int64()), "task": tasks.tolist(),
        "selected": selected, "score": scores, "component": scores * 0.5,
    }))
    selected_tasks, counts = np.unique(tasks[selected], return_counts=True)
    pool_tasks, pool_counts = np.unique(tasks, return_counts=True)
    (folder / "summary.json").write_json({
        "method": method, "budget_rows": budget, "selected": int(selected.sum()),
        "task_counts": dict(zip(selected_tasks.tolist(), counts.tolist())),
        "pool_task_counts": dict(zip(pool_tasks.tolist(), pool_counts.tolist())),
    })


def _write_clusters(run_dir: RunDir, rng: np.random.Generator, k: int = 40) -> None:
    sizes = rng.integers(1, 30, size=k)
    (run_dir / "stats" / "coincide" / "clusters.parquet").write_parquet(pa.table({
        "cluster": pa.array(np.arange(k), pa.int64()), "size": pa.array(sizes, pa.int64()),
        "density": rng.random(k), "transferability": rng.random(k), "probability": rng.dirichlet(np.ones(k)),
    }))


def _write_manifest(run_dir: RunDir, rows_in: int, samples: int, quarantined: int) -> None:
    run_dir.save_manifest({
        "run_id": "fab123456789", "created": "2025-01-01T00:00:00+00:00", "model_id": "tiny", "seed": 7,
        "versions": {"datasel-ray": "0.1.0", "ray": "2.60.0", "numpy": "2.4.6"},
        "phases": {
            "ingest": {"status": "done", "seconds": 4.2, "result": {
                "rows_in": rows_in, "samples": samples, "quarantined": quarantined, "by_reason": {}}},
            "extract": {"status": "done", "seconds": 95.0, "result": {"features": samples - 1, "failed": 1}},
            "aggregate": {"status": "done", "seconds": 3.1, "result": {}},
            "select": {"status": "done", "seconds": 0.8, "result": {}},
            "report": {"status": "running"},
        },
    })


def _write_dedup(run_dir: RunDir, tasks: np.ndarray, rng: np.random.Generator) -> None:
    """dedup/ as the dedup phase writes it: rows 1..20 dropped as near duplicates of row 0 (2 exact)."""
    dropped = np.arange(1, 21)
    out = run_dir / "dedup"
    (out / "dropped.parquet").write_parquet(pa.table({
        "row_id": pa.array(dropped, pa.int64()), "task": pa.array(tasks[dropped].tolist()),
        "representative": pa.array(np.zeros(20), pa.int64()), "duplicate_of": pa.array(np.zeros(20), pa.int64()),
        "similarity": pa.array(np.r_[1.0, 1.0, 0.99 + 0.01 * rng.random(18)], pa.float32()),
        "pass": ["exact"] * 2 + ["semantic"] * 18, "cluster": pa.array(np.r_[-1, -1, np.zeros(18)], pa.int64())}))
    (out / "groups.parquet").write_parquet(pa.table({
        "representative": pa.array([0], pa.int64()), "task": [str(tasks[0])], "size": pa.array([21], pa.int64()),
        "exact": pa.array([2], pa.int64()), "semantic": pa.array([18], pa.int64())}))
    names = sorted(set(tasks.tolist()))
    counts = {t: int((tasks == t).sum()) for t in names}
    drops = {t: int((tasks[dropped] == t).sum()) for t in names}
    (out / "tasks.parquet").write_parquet(pa.table({
        "task": names, "rows": [counts[t] for t in names], "kept": [counts[t] - drops[t] for t in names],
        "dropped_exact": [int((tasks[[1, 2]] == t).sum()) for t in names],
        "dropped_semantic": [drops[t] - int((tasks[[1, 2]] == t).sum()) for t in names],
        "groups": [int(t == tasks[0]) for t in names]}))
    (out / "meta.json").write_json({"rows": len(tasks), "kept": len(tasks) - 20, "dropped": 20, "dropped_exact": 2,
                                    "dropped_semantic": 18, "groups": 1, "feature": "coincide_vector",
                                    "config": {"eps": 0.01, "ranking": "hard"}})


def make_run_dir(root: Path, n_rows: int = 300, selections: bool = True, clusters: bool = True,
                 seed: int = 0) -> RunDir:
    """Fabricate a run directory with the tables the other phases write (tiny, seeded)."""
    rng = np.random.default_rng(seed)
    run_dir = RunDir(str(root))
    tasks = _write_samples(run_dir, rng, n_rows)
    ingest_reasons = ["image_missing"] * 4 + ["invalid_json"] * 2 + ["too_long"]
    _write_quarantine(run_dir, "ingest", ingest_reasons)
    _write_quarantine(run_dir, "extract", ["extract_failed"])
    if selections:
        for method in METHODS:
            _write_selection(run_dir, method, tasks, budget=n_rows // 5, rng=rng)
    if clusters:
        _write_clusters(run_dir, rng)
    _write_dedup(run_dir, tasks, rng)
    _write_manifest(run_dir, n_rows + len(ingest_reasons), n_rows, len(ingest_reasons))
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _referenced_images(page: str) -> set[str]:
    return set(re.findall(r"<img src='([^']+)'", page))


def _check_report(result: dict) -> str:
    """The page exists, references exactly the PNGs on disk, and each PNG is a sane image."""
    page_path = Path(result["html"])
    page = page_path.read_text()
    on_disk = {p.name for p in page_path.parent.glob("*.png")}
    assert _referenced_images(page) == on_disk
    assert {Path(p).name for p in result["plots"] + result["dedup_groups"]} == on_disk
    for name in on_disk:
        width, height = _png_size(page_path.parent / name)
        assert 300 <= width <= 1400 and 150 <= height <= 1400, (name, width, height)
    return page


def test_full_report(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    result = write_report(run_dir)
    page = _check_report(result)
    assert {Path(p).name for p in result["plots"]} == {spec.filename for spec in plot_specs()}
    assert result["notes"] == []
    assert "fab123456789" in page and "tiny" in page and "ray 2.60.0" in page
    for method in METHODS:
        assert f"<td>{method}</td>" in page
    for task in TASKS:
        assert f"<td>{task}</td>" in page
    assert "image_missing" in page and "extract_failed" in page
    assert "Near-duplicate removal" in page and "kept 280 of 300 rows; dropped 2 exact and 18 near" in page
    assert [Path(p).name for p in result["dedup_groups"]] == ["dedup_group_0.png"]


def test_dedup_example_group_shows_its_rows_and_images(tmp_path):
    from datasel_ray.report import DEDUP_EXAMPLE_MEMBERS, plot_dedup_group, read_run_inputs

    run_dir = make_run_dir(tmp_path / "run")
    inputs = read_run_inputs(run_dir)
    (group,) = inputs.dedup["examples"]
    dropped = (run_dir / "dedup" / "dropped.parquet").read_parquet().to_pylist()
    order = sorted(dropped, key=lambda r: (-r["similarity"], r["row_id"]))[:DEDUP_EXAMPLE_MEMBERS - 1]
    assert [m["row_id"] for m in group] == [0] + [r["row_id"] for r in order]
    assert group[0]["kept"] and group[0]["images"] == ["0.png"] and group[0]["text"] == "question 0"
    for member, row in zip(group[1:], order):
        assert not member["kept"] and member["pass"] == row["pass"]
        assert member["similarity"] == pytest.approx(row["similarity"], abs=1e-4)
    png = plot_dedup_group(inputs, 0)
    assert png[:8] == PNG_SIGNATURE and plot_dedup_group(inputs, 1) is None
    from PIL import Image

    strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert np.any(np.all(strip == (0, 90, 160), axis=-1)), "the kept row's image is not on the strip"
    # a member with two images (a file and embedded bytes) shows both; one whose file is gone still gets a panel
    group[1:] = [{"row_id": 1, "kept": False, "similarity": 1.0, "pass": "exact", "images": ["1.png", "inline.png"]},
                 {"row_id": 3, "kept": False, "similarity": 0.99, "pass": "semantic", "images": ["3.png"]}]
    strip = np.asarray(Image.open(io.BytesIO(plot_dedup_group(inputs, 0))).convert("RGB"))
    assert np.any(np.all(strip == (1, 90, 160), axis=-1)) and np.any(np.all(strip == (250, 200, 10), axis=-1))

    write_report(run_dir)
    summary = (run_dir / "report" / "summary.json").read_json()["dedup"]["example_groups"]
    assert [m["row_id"] for m in summary[0]] == [0] + [r["row_id"] for r in order]


def test_summary_json_counts(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", n_rows=200)
    summary = (run_dir / "report" / "summary.json")
    write_report(run_dir)
    data = summary.read_json()
    assert data["counts"]["samples"] == 200 and data["counts"]["quarantined"] == 7
    assert sum(data["pool_task_counts"].values()) == 200
    by_method = {m["method"]: m for m in data["methods"]}
    assert set(by_method) == set(METHODS)
    assert all(m["selected"] == 40 and sum(m["task_counts"].values()) == 40 for m in by_method.values())
    assert {q["reason"]: q["rows"] for q in data["quarantine"]}["image_missing"] == 4
    assert [p["phase"] for p in data["phase_seconds"]] == ["ingest", "extract", "aggregate", "select"]


def test_missing_selections_and_stats_give_notes(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", selections=False, clusters=False)
    result = write_report(run_dir)
    page = _check_report(result)
    written = {Path(p).name for p in result["plots"]}
    assert written == {"task_mix.png", "quarantine_reasons.png", "phase_times.png", "dedup.png"}
    assert len(result["notes"]) == 3
    assert "coincide/clusters.parquet" in page and "Not shown" in page


def test_empty_run_dir(tmp_path):
    result = write_report(RunDir(str(tmp_path / "empty")))
    page = _check_report(result)
    assert result["plots"] == []
    assert len(result["notes"]) == len(plot_specs()) + 1
    assert "unknown run" in page


def test_rerun_removes_stale_plots(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    write_report(run_dir)
    (run_dir / "stats" / "coincide" / "clusters.parquet").delete()
    result = write_report(run_dir)
    _check_report(result)
    assert not (tmp_path / "run" / "report" / "coincide_clusters.png").exists()


def test_selection_without_summary_counts_from_scores(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "selections" / "random" / "summary.json").delete()
    write_report(run_dir)
    methods = {m["method"]: m for m in (run_dir / "report" / "summary.json").read_json()["methods"]}
    assert methods["random"]["selected"] == 60 and methods["random"]["budget_rows"] is None
    assert sum(methods["random"]["task_counts"].values()) == 60


@pytest.mark.parametrize("html_escape_task", ["<b>bold</b>"])
def test_task_names_are_escaped(tmp_path, html_escape_task):
    run_dir = RunDir(str(tmp_path / "run"))
    (run_dir / "samples" / "s.parquet").write_parquet(pa.table({
        "row_id": pa.array([0, 1], pa.int64()), "task": [html_escape_task, "caption"]}))
    page = Path(write_report(run_dir)["html"]).read_text()
    assert html_escape_task not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
