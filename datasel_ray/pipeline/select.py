"""Select phase: features + stats → ``selections/<method>/``.

Per method (its ``select`` in :mod:`datasel_ray.pipeline.fit`, on the same executor as aggregate) it writes
``scores.parquet`` (row id, task, cluster, every component score, ``score`` = the method's main score,
``selected``), ``selected_ids.npy`` (int64 row ids, ascending), the subset in the pool's own format under
``subset/`` (the original records; images referenced, not copied), and ``summary.json`` (budget, per-task counts
vs the pool, method variant switches, and the per-task/per-cluster values the online scorer answers with).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

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
from datasel_ray.pipeline.feature_store import column_to_numpy
from datasel_ray.pipeline.fit.context import TASK_SCORE_THRESHOLD, FitContext
from datasel_ray.pipeline.memory import release_free_memory
from datasel_ray.pipeline.progress import Progress


def _task_thresholds(names: np.ndarray, codes: np.ndarray, score: np.ndarray,
                     selected: np.ndarray) -> dict[str, float | None]:
    """Per task, the lowest score among its selected rows (a new sample scoring above it would be selected).

    names: (T,) task names; codes: int64[N] task code of each row; score: float[N]; selected: unique positions.
    """
    out: dict[str, float | None] = {}
    selected_codes = codes[selected]
    for t, name in enumerate(names.tolist()):
        vals = score[selected[selected_codes == t]]
        vals = vals[np.isfinite(vals)]
        out[name] = float(vals.min()) if len(vals) else None
    return out


def _task_counts(names: np.ndarray, codes: np.ndarray) -> dict[str, int]:
    """{task: rows} for the tasks present in ``codes`` (int64 codes into ``names``), sorted by task."""
    counts = np.bincount(codes, minlength=len(names))
    return {name: int(c) for name, c in zip(names.tolist(), counts.tolist()) if c}


def select_method(ctx: FitContext, method: str, budget: int, extra: dict | None = None) -> dict:
    """Run one method (its ``select`` in :mod:`datasel_ray.pipeline.fit`) and write its selection directory;
    returns its summary."""
    spec = get_method(method)
    started = time.monotonic()
    choice = spec.select(ctx, budget)
    store = ctx.store
    selected = np.asarray(choice.selected, dtype=np.int64)
    out = layout.selection_dir(ctx.run_dir, method)
    names, codes = store.task_names, store.task_codes
    is_selected = np.zeros(store.n, dtype=bool)
    is_selected[selected] = True
    task_column = pc.take(pa.array(names.tolist(), pa.string()), pa.array(codes))
    columns = {schema.ROW_ID: store.row_ids, schema.TASK: task_column, **choice.columns,
               layout.SELECTED: is_selected}
    out.mkdir()
    (out / layout.SCORES).write_parquet(pa.table(columns))
    thresholds = _task_thresholds(names, codes, choice.columns[layout.SCORE], np.unique(selected))
    method_summary = choice.summary
    del columns, choice, is_selected, task_column  # the score columns are on disk: free them before the subset
    release_free_memory()
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
        "task_counts": _task_counts(names, codes[selected]),
        "pool_task_counts": _task_counts(names, codes),
        TASK_SCORE_THRESHOLD: thresholds,
        "subset_files": subset_files,
        "seed": ctx.cfg.seed,
        "executor": ctx.executor.name,
        "seconds": round(time.monotonic() - started, 3),
        **method_summary,
        **(extra or {}),
    }
    (out / layout.SUMMARY).write_json(summary)
    return summary


def write_subset(run_dir: RunDir, out: Location, selected_ids: np.ndarray) -> list[str]:
    """The selected records, exactly as read, in each source file's own format and order.

    ``selected_ids``: (K,) int64 row ids. The format of each source file is the one ingest read it in
    (``samples/pool_files.json``), so a pool ``data.txt`` ingested with ``pool.format: jsonl`` comes back as
    JSONL under the same name. JSON/JSONL records stream from ``samples/`` one shard at a time when the shards
    hold a source's rows in source order (as ingest writes them); otherwise that source's selected records are
    held and sorted. Parquet sources are read back row group by row group, only the groups holding a selected
    row.
    """
    from datasel_ray.io.pool import POOL_FILES, read_parquet_records, read_pool_files

    keys = _selected_keys(run_dir, selected_ids)
    recorded = read_pool_files(run_dir / "samples" / POOL_FILES)
    # run directories ingested before pool_files.json existed: the configured format, else the suffix
    configured = run_dir.load_manifest().get("config", {}).get("pool", {}).get("format", "auto")
    written = []
    for source in sorted({name for part in keys for name in part.sources}):
        src = Location.parse(source)
        target = out / src.name
        if source in recorded:
            fmt = recorded[source].format
        else:
            fmt = detect_format(src.name) if configured == "auto" else configured
        if fmt in ("json", "jsonl"):
            target.write_with(functools.partial(_write_records, raws=_source_records(keys, source), fmt=fmt))
        else:
            indices = np.concatenate([part.index[part.of(source)] for part in keys if source in part.sources])
            target.write_parquet(read_parquet_records(src, np.sort(indices)))
        written.append(str(target))
    return written


@dataclass
class _ShardKeys:
    """The selected rows of one ``samples/`` shard: their positions in it, their source files (``source_code``
    into ``sources``) and their indices in those files."""

    file: Location
    positions: np.ndarray
    sources: list[str]
    source_code: np.ndarray
    index: np.ndarray

    def of(self, source: str) -> np.ndarray:
        """bool mask over this shard's selected rows: those read from ``source``."""
        return self.source_code == self.sources.index(source)


def _selected_keys(run_dir: RunDir, selected_ids: np.ndarray) -> list[_ShardKeys]:
    """Per ``samples/`` shard holding a selected row, the keys of its selected rows (no raw record is read)."""
    files = (run_dir / "samples").list(".parquet")
    if not files:
        raise RuntimeError(f"No parquet files in {run_dir / 'samples'}: run the ingest phase first")
    out = []
    for f in files:
        table = f.read_parquet([schema.ROW_ID, schema.SOURCE_FILE, schema.SOURCE_INDEX])
        positions = np.flatnonzero(np.isin(column_to_numpy(table.column(schema.ROW_ID)), selected_ids))
        if not len(positions):
            continue
        names = table.column(schema.SOURCE_FILE).take(pa.array(positions))
        if pa.types.is_dictionary(names.type):
            names = names.cast(pa.string())
        sources = pc.dictionary_encode(names).combine_chunks()
        out.append(_ShardKeys(f, positions, sources.dictionary.to_pylist(),
                              sources.indices.to_numpy(zero_copy_only=False).astype(np.int64),
                              column_to_numpy(table.column(schema.SOURCE_INDEX))[positions].astype(np.int64)))
    return out


def _source_records(keys: list[_ShardKeys], source: str):
    """Raw records of ``source``'s selected rows in source order: an iterator of string chunks, one shard's
    worth at a time when the shards are in source order for this source, else one sorted chunk."""
    parts = [(part, part.of(source)) for part in keys if source in part.sources]
    order = np.concatenate([part.index[mine] for part, mine in parts])
    if np.all(np.diff(order) > 0):
        return (part.file.read_parquet([schema.RAW]).column(schema.RAW).take(pa.array(part.positions[mine]))
                for part, mine in parts)
    raws = pa.concat_arrays([part.file.read_parquet([schema.RAW]).column(schema.RAW).combine_chunks()
                             .take(pa.array(part.positions[mine])) for part, mine in parts])
    return iter([raws.take(pa.array(np.argsort(order, kind="stable")))])


def _write_records(f, raws, fmt: str, batch: int = 4096) -> None:
    """The raw JSON records ``raws`` (an iterable of string arrays, in output order) as a JSON array (``fmt``
    json) or one per line (jsonl), into binary file ``f`` a batch at a time."""
    sep, first, last = (",\n", "[\n", "\n]\n") if fmt == "json" else ("\n", "", "\n")
    wrote = False
    if fmt == "json":
        f.write(first.encode())
    for chunk in raws:
        for start in range(0, len(chunk), batch):
            text = sep.join(chunk.slice(start, batch).to_pylist())
            f.write(((sep if wrote else "") + text).encode("utf-8"))
            wrote = True
    if fmt == "json" or wrote:
        f.write(last.encode())


def run_select(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    from datasel_ray.pipeline.aggregate import make_context

    ctx = make_context(cfg, run_dir, quiet)
    methods = cfg.select.methods
    for m in methods:
        ctx.store.require(list(get_method(m).columns))
    from datasel_ray.pipeline.dedup import pool_rows

    whole = pool_rows(cfg, run_dir, ctx.store.n)  # with select.dedup the budget stays a share of the whole pool
    budget = min(cfg.select.budget_rows(whole), ctx.store.n)
    progress = Progress("select", len(methods), run_dir / "progress.json", quiet=quiet, unit="methods")
    results = {}
    for method in methods:
        summary = select_method(ctx, method, budget, extra={"dedup": cfg.select.dedup, "whole_pool_rows": whole})
        results[method] = {k: summary[k] for k in ("selected", "budget_rows", "seconds", "dedup")}
        release_free_memory()
        progress.update(1)
    progress.finish()
    return results
