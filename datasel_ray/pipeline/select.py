"""Select phase: features + stats → ``selections/<method>/``.

Per method (its ``select`` in :mod:`datasel_ray.pipeline.fit`, on the same executor as aggregate) it writes
``scores.parquet`` (row id, task, cluster, every component score, ``score`` = the method's main score,
``selected``), ``selected_ids.npy`` (int64 row ids, ascending), the subset in the pool's own format under
``subset/`` (the original records; images referenced, not copied), and ``summary.json`` (budget, per-task counts
vs the pool, method variant switches, and the per-task/per-cluster values the online scorer answers with).
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
from datasel_ray.io import layout
from datasel_ray.methods.registry import get_method
from datasel_ray.pipeline.feature_store import column_to_numpy, load_table
from datasel_ray.pipeline.fit.context import FitContext
from datasel_ray.pipeline.progress import Progress


def _task_thresholds(tasks: np.ndarray, score: np.ndarray, selected: np.ndarray) -> dict[str, float | None]:
    """Per task, the lowest score among its selected rows (a new sample scoring above it would be selected)."""
    out: dict[str, float | None] = {}
    for task in np.unique(tasks):
        rows = selected[tasks[selected] == task]
        vals = score[rows][np.isfinite(score[rows])]
        out[str(task)] = float(vals.min()) if len(vals) else None
    return out


def select_method(ctx: FitContext, method: str, budget: int) -> dict:
    """Run one method (its ``select`` in :mod:`datasel_ray.pipeline.fit`) and write its selection directory;
    returns its summary."""
    spec = get_method(method)
    started = time.monotonic()
    choice = spec.select(ctx, budget)
    store = ctx.store
    selected = np.asarray(choice.selected, dtype=np.int64)
    out = layout.selection_dir(ctx.run_dir, method)
    tasks = store.tasks.astype(str)
    is_selected = np.zeros(store.n, dtype=bool)
    is_selected[selected] = True
    columns = {schema.ROW_ID: store.row_ids, schema.TASK: pa.array(tasks), **choice.columns,
               layout.SELECTED: is_selected}
    out.mkdir()
    (out / layout.SCORES).write_parquet(pa.table(columns))
    selected_ids = np.sort(store.row_ids[selected]).astype(np.int64)
    (out / layout.SELECTED_IDS).write_npy(selected_ids)
    subset_files = write_subset(ctx.run_dir, out / layout.SUBSET, selected_ids)
    (out / layout.WORK).delete()
    summary = {
        "method": method,
        "budget": ctx.cfg.select.budget,
        "budget_rows": budget,
        "pool_rows": int(store.n),
        "selected": int(len(selected)),
        "unique_selected": int(len(np.unique(selected))),
        "task_counts": dict(sorted(Counter(tasks[selected].tolist()).items())),
        "pool_task_counts": dict(sorted(Counter(tasks.tolist()).items())),
        "task_score_threshold": _task_thresholds(tasks, choice.columns[layout.SCORE], np.unique(selected)),
        "subset_files": subset_files,
        "seed": ctx.cfg.seed,
        "executor": ctx.executor.name,
        "seconds": round(time.monotonic() - started, 3),
        **choice.summary,
    }
    (out / layout.SUMMARY).write_json(summary)
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
    from datasel_ray.pipeline.aggregate import make_context

    ctx = make_context(cfg, run_dir, quiet)
    methods = cfg.select.methods
    for m in methods:
        ctx.store.require(list(get_method(m).columns))
    budget = cfg.select.budget_rows(ctx.store.n)
    progress = Progress("select", len(methods), run_dir / "progress.json", quiet=quiet, unit="methods")
    results = {}
    for method in methods:
        summary = select_method(ctx, method, budget)
        results[method] = {k: summary[k] for k in ("selected", "budget_rows", "seconds")}
        progress.update(1)
    progress.finish()
    return results
