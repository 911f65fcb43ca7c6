"""Select phase: features + stats → ``selections/<method>/``.

Per method it writes ``scores.parquet`` (row id, task, cluster, every component score, ``score`` = the
method's main score, ``selected``), ``selected_ids.npy`` (int64 row ids, ascending), the subset in the pool's
own format under ``subset/`` (the original records; images referenced, not copied), and ``summary.json``
(budget, per-task counts vs the pool, method variant switches, and the per-task/per-cluster thresholds the
online scorer uses to say whether a new sample would be selected).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io.pool import detect_format
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.methods.registry import get_method
from datasel_ray.pipeline.aggregate import coincide_layer_count
from datasel_ray.pipeline.feature_store import column_to_numpy, load_features, load_table
from datasel_ray.pipeline.progress import Progress
from datasel_ray.seeds import derive_seed


def _assignments(run_dir: RunDir, name: str, row_ids: np.ndarray) -> np.ndarray:
    loc = run_dir / "stats" / f"{name}_assignments.parquet"
    if not loc.exists():
        raise RuntimeError(f"{loc} is missing: run the aggregate phase first")
    t = loc.read_parquet()
    ids = column_to_numpy(t.column(schema.ROW_ID))
    labels = column_to_numpy(t.column("cluster"))
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], row_ids):
        raise RuntimeError(f"{loc} does not cover the same rows as features/: re-run aggregate (--force)")
    return labels[order]


def _select_coincide(cfg: RunConfig, run_dir: RunDir, feats: dict, budget: int) -> tuple[np.ndarray, dict, dict]:
    from datasel_ray.methods import coincide

    clusters = (run_dir / "stats" / "coincide_clusters.parquet").read_parquet()
    labels = _assignments(run_dir, "coincide", feats[schema.ROW_ID])
    x = feats[schema.COINCIDE_VECTOR]
    res = coincide.select(
        x, budget, cfg.coincide, n_layers=coincide_layer_count(x.shape[1], feats[schema.LAST_TOKEN].shape[1]),
        labels=labels, centroids=(run_dir / "stats" / "coincide_centroids.npy").read_npy(),
        S=column_to_numpy(clusters.column("transferability")), D=column_to_numpy(clusters.column("density")))
    scores = {"cluster": res.labels, "transferability": res.row_S, "density": res.row_D,
              "probability": res.row_P, "selection_order": res.row_rank, "score": res.row_P}
    sizes = res.cluster_size
    thresholds = {"cluster_selected_fraction": (res.cluster_quota / np.maximum(sizes, 1)).round(6).tolist()}
    return res.selected, scores, thresholds


def _select_datatailor(cfg: RunConfig, run_dir: RunDir, feats: dict, budget: int) -> tuple[np.ndarray, dict, dict]:
    from datasel_ray.methods import datatailor

    labels = _assignments(run_dir, "datatailor", feats[schema.ROW_ID])
    res = datatailor.select(feats[schema.LAST_TOKEN], feats[schema.INFORMATIVENESS], feats[schema.TAU],
                            feats[schema.N_TURNS], feats[schema.TASK].astype(str), budget, cfg.datatailor,
                            seed=derive_seed(cfg.seed, "datatailor"), labels=labels)
    scores = {"cluster": res.labels, "informativeness": feats[schema.INFORMATIVENESS].astype(np.float64),
              "uniqueness": res.U, "representativeness": res.R, "rank_informativeness": res.rank_I,
              "rank_uniqueness": res.rank_U, "rank_representativeness": res.rank_R, "score": res.score}
    return res.selected, scores, {"task_score_threshold": _task_thresholds(feats, res.score, res.selected),
                                  "task_budget": dict(zip(res.task_names.astype(str).tolist(),
                                                          res.task_budget.tolist()))}


def _select_tive(cfg: RunConfig, run_dir: RunDir, feats: dict, budget: int) -> tuple[np.ndarray, dict, dict]:
    from datasel_ray.methods import tive

    tasks = feats[schema.TASK].astype(str)
    res = tive.select(feats[schema.GRAD_PROJ], feats[schema.GRAD_NORM], tasks, budget, cfg.tive,
                      seed=derive_seed(cfg.seed, "tive", "sampling"))
    task_value = dict(zip(res.task_names.astype(str).tolist(), res.task_value.tolist()))
    scores = {"instance_value": res.instance_value.astype(np.float64),
              "task_value": np.array([task_value[t] for t in tasks]), "score": res.instance_value.astype(np.float64)}
    summary = res.summary()
    summary["task_selected_fraction"] = {t: b / max(s, 1) for t, b, s in zip(
        res.task_names.astype(str).tolist(), res.task_budget.tolist(), res.task_size.tolist())}
    summary["task_score_threshold"] = _task_thresholds(feats, res.instance_value, np.unique(res.selected))
    return res.selected, scores, summary


def _select_baseline(method: str, cfg: RunConfig, feats: dict, budget: int) -> tuple[np.ndarray, dict, dict]:
    from datasel_ray.methods import baselines

    n = len(feats[schema.ROW_ID])
    seed = derive_seed(cfg.seed, "select", method)
    if method == "random":
        res = baselines.random_global(n, budget, seed)
    elif method == "random_per_task":
        res = baselines.random_per_task(feats[schema.TASK].astype(str), budget, seed)
    else:
        res = baselines.answer_loss_ranking(feats[schema.ANSWER_LOSS], budget)
    return res.selected, {"score": res.score}, {"task_score_threshold": _task_thresholds(feats, res.score, res.selected)}


def _task_thresholds(feats: dict, score: np.ndarray, selected: np.ndarray) -> dict[str, float | None]:
    """Per task, the lowest score among its selected rows (a new sample scoring above it would be selected)."""
    tasks = feats[schema.TASK].astype(str)
    out: dict[str, float | None] = {}
    for task in np.unique(tasks):
        rows = selected[tasks[selected] == task]
        vals = score[rows][np.isfinite(score[rows])]
        out[str(task)] = float(vals.min()) if len(vals) else None
    return out


def select_method(cfg: RunConfig, run_dir: RunDir, method: str, feats: dict, budget: int) -> dict:
    """Run one method and write its selection directory; returns its summary."""
    get_method(method)
    started = time.monotonic()
    if method == "coincide":
        selected, scores, extra = _select_coincide(cfg, run_dir, feats, budget)
    elif method == "datatailor":
        selected, scores, extra = _select_datatailor(cfg, run_dir, feats, budget)
    elif method == "tive":
        selected, scores, extra = _select_tive(cfg, run_dir, feats, budget)
    else:
        selected, scores, extra = _select_baseline(method, cfg, feats, budget)
    out = run_dir / "selections" / method
    row_ids = feats[schema.ROW_ID]
    tasks = feats[schema.TASK].astype(str)
    is_selected = np.zeros(len(row_ids), dtype=bool)
    is_selected[selected] = True
    columns = {schema.ROW_ID: row_ids, schema.TASK: pa.array(tasks), **scores, "selected": is_selected}
    out.mkdir()
    (out / "scores.parquet").write_parquet(pa.table(columns))
    selected_ids = np.sort(row_ids[selected]).astype(np.int64)
    (out / "selected_ids.npy").write_npy(selected_ids)
    subset_files = write_subset(run_dir, out / "subset", selected_ids)
    summary = {
        "method": method,
        "budget": cfg.select.budget,
        "budget_rows": budget,
        "pool_rows": int(len(row_ids)),
        "selected": int(len(selected)),
        "unique_selected": int(len(np.unique(selected))),
        "task_counts": dict(sorted(Counter(tasks[selected].tolist()).items())),
        "pool_task_counts": dict(sorted(Counter(tasks.tolist()).items())),
        "subset_files": subset_files,
        "seed": cfg.seed,
        "seconds": round(time.monotonic() - started, 3),
        **extra,
    }
    (out / "summary.json").write_json(summary)
    return summary


def write_subset(run_dir: RunDir, out: Location, selected_ids: np.ndarray) -> list[str]:
    """The selected records, exactly as read, in each source file's own format and order.

    ``selected_ids``: (K,) int64 row ids. The format of each source file is the one ingest read it in
    (``samples/pool_files.json``), so a pool ``data.txt`` ingested with ``pool.format: jsonl`` comes back as
    JSONL under the same name. Parquet sources are read back row group by row group, only the groups holding
    a selected row.
    """
    from datasel_ray.io.pool import POOL_FILES, read_parquet_records, read_pool_files

    samples = load_table(run_dir, "samples", [schema.ROW_ID, schema.RAW, schema.SOURCE_FILE, schema.SOURCE_INDEX])
    ids = column_to_numpy(samples.column(schema.ROW_ID))
    keep = np.isin(ids, selected_ids)
    rows = samples.filter(pa.array(keep))
    recorded = read_pool_files(run_dir / "samples" / POOL_FILES)
    # run directories ingested before pool_files.json existed: the configured format, else the suffix
    configured = run_dir.load_manifest().get("config", {}).get("pool", {}).get("format", "auto")
    written = []
    for source in sorted(set(rows.column(schema.SOURCE_FILE).to_pylist())):
        part = rows.filter(pc.equal(rows.column(schema.SOURCE_FILE), source))
        part = part.sort_by(schema.SOURCE_INDEX)
        src = Location.parse(source)
        target = out / src.name
        if source in recorded:
            fmt = recorded[source].format
        else:
            fmt = detect_format(src.name) if configured == "auto" else configured
        raws = part.column(schema.RAW).to_pylist()
        if fmt == "json":
            target.write_text("[\n" + ",\n".join(raws) + "\n]\n")
        elif fmt == "jsonl":
            target.write_text("".join(r + "\n" for r in raws))
        else:
            target.write_parquet(read_parquet_records(src, part.column(schema.SOURCE_INDEX).to_numpy()))
        written.append(str(target))
    return written


def run_select(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    methods = cfg.select.methods
    columns = sorted({c for m in methods for c in get_method(m).columns} | {schema.TASK, schema.LAST_TOKEN})
    feats = load_features(run_dir, columns)
    budget = cfg.select.budget_rows(len(feats[schema.ROW_ID]))
    progress = Progress("select", len(methods), run_dir / "progress.json", quiet=quiet, unit="methods")
    results = {}
    for method in methods:
        summary = select_method(cfg, run_dir, method, feats, budget)
        results[method] = {k: summary[k] for k in ("selected", "budget_rows", "seconds")}
        progress.update(1)
    progress.finish()
    return results

