"""Ingest phase: pool files → ``samples/`` (validated rows) + ``quarantine/ingest/`` (bad rows, reasons).

Each pool file is split into blocks (:mod:`datasel_ray.io.pool`); one task validates a block and writes
one samples shard and one quarantine shard named after the block, atomically. Tasks run on Ray or one after the
other in this process (``pool.executor``, :func:`ingest_executor`); the shards are the same either way. A re-run skips blocks whose
two shards exist, so a killed ingest resumes.

Duplicate ids are found after every block is done, by one pass over the ``(row_id, id)`` columns of
``samples/`` (:func:`quarantine_duplicate_ids`): the first valid row of an id in pool order (file, then
record index) is kept, every later one moves to ``quarantine/ingest/<block>.duplicate_id.parquet`` with reason
``duplicate_id``. The outcome depends on the row ids only, never on which task finished first; the pass is
idempotent, so a killed or repeated ingest converges to the same shards.

Invariant checked at the end: rows in = samples + quarantined.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasel_ray import schema
from datasel_ray.config import PoolConfig, RunConfig
from datasel_ray.io.pool import (
    POOL_FILES,
    BlockSpec,
    list_pool_files,
    plan_blocks,
    probe_records,
    read_block,
    write_pool_files,
)
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.shapes import detect_shape
from datasel_ray.io.storage import Location, worker_environment
from datasel_ray.io.tasks import TaskResolver, llava_665k_mismatch
from datasel_ray.io.validation import (
    Limits,
    RecordValidator,
    duplicate_id_message,
    first_seen_duplicates,
    quarantine_row,
)
from datasel_ray.pipeline import ray_adapter
from datasel_ray.pipeline.failures import FailureBudget
from datasel_ray.pipeline.progress import Progress

log = logging.getLogger(__name__)

# one struct per image, in placeholder order (schema.IMAGES)
IMAGES_TYPE = pa.list_(pa.struct([("ref", pa.string()), ("uri", pa.string()), ("data", pa.binary())]))
SAMPLES_SCHEMA = pa.schema([
    (schema.ROW_ID, pa.int64()),
    (schema.SAMPLE_ID, pa.string()),
    (schema.TASK, pa.string()),
    (schema.TASK_FROM, pa.string()),
    (schema.N_TURNS, pa.int32()),
    (schema.IMAGE, pa.string()),
    (schema.IMAGES, IMAGES_TYPE),
    (schema.N_IMAGES, pa.int32()),
    (schema.IMAGE_PATH, pa.string()),
    (schema.CONVERSATIONS, pa.string()),
    (schema.RAW, pa.string()),
    (schema.SOURCE_FILE, pa.string()),
    (schema.SOURCE_INDEX, pa.int64()),
    (schema.CONTENT_DIGEST, pa.binary()),
])
QUARANTINE_SCHEMA = pa.schema([
    (schema.ROW_ID, pa.int64()),
    (schema.SOURCE_FILE, pa.string()),
    (schema.SOURCE_INDEX, pa.int64()),
    (schema.PHASE, pa.string()),
    (schema.REASON, pa.string()),
    (schema.MESSAGE, pa.string()),
    (schema.RAW, pa.string()),
])


def resolve_image_root(pool: PoolConfig) -> str:
    """The configured image root, else the folder of the pool file (or the pool folder itself)."""
    if pool.image_root:
        return pool.image_root
    loc = Location.parse(pool.path)
    return str(loc if loc.is_dir() else loc.parent)


# quarantined on purpose, not failures: they do not count against failures.max_quarantine_fraction
NOT_FAILURES = frozenset({schema.Reason.DUPLICATE_ID, schema.Reason.UNSUPPORTED_VIDEO})


class IngestBlockStage:
    """Validates one block of records and writes its samples and quarantine shards. No Ray inside."""

    def __init__(self, pool: dict, image_root: str, run_dir: str, row_group_rows: int | None = None,
                 index_blocks: bool = False, shape: str | None = None, file_shapes: dict[int, str] | None = None):
        """``shape``: the record shape of every pool file (default: ``pool.schema``, ``llava`` when auto);
        ``file_shapes``: ``{file_index: shape}`` for the files whose shape differs (a folder of mixed pools)."""
        cfg = PoolConfig.model_validate(pool)
        resolver = TaskResolver.for_pool(cfg, index_blocks=index_blocks)
        shape = shape or (cfg.shape if cfg.shape != "auto" else "llava")
        limits = Limits(cfg.max_turns, cfg.max_chars, cfg.check_images)
        self.validators = {s: RecordValidator(image_root, resolver, limits, shape=s, source_fields=cfg.source_fields)
                           for s in {shape, *(file_shapes or {}).values()}}
        self.validator = self.validators[shape]
        self.file_shapes = {int(k): v for k, v in (file_shapes or {}).items()}
        self.io_threads = cfg.io_threads
        self.run_dir = RunDir(run_dir)
        self.row_group_rows = row_group_rows
        self.last_kept_out = 0

    def __call__(self, batch: dict) -> dict:
        names, good, bad, kept_out = [], [], [], []
        for i in range(len(batch["file_index"])):
            spec = BlockSpec(**{k: _py(batch[k][i]) for k in BlockSpec.__dataclass_fields__})
            n_good, n_bad = self.process(spec)
            names.append(spec.name)
            good.append(n_good)
            bad.append(n_bad)
            kept_out.append(self.last_kept_out)
        return {"block": names, "good": good, "bad": bad, "kept_out": kept_out}

    def process(self, spec: BlockSpec) -> tuple[int, int]:
        """Validate the block's records, ``pool.io_threads`` at a time (each image check is a read, on object
        storage a round trip, and a decode), in record order; a StorageError of any record stops the block.
        Returns ``(samples, quarantined)``; ``last_kept_out``: how many of the quarantined rows were kept out by
        design (:data:`NOT_FAILURES`, e.g. video rows)."""
        validator = self.validators[self.file_shapes[spec.file_index]] if spec.file_index in self.file_shapes \
            else self.validator

        def validate(raw):
            return validator.validate(raw, schema.make_row_id(spec.file_index, raw.record_index), spec.uri)

        samples, quarantined = [], []
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="ingest-io") as threads:
            for sample, bad in threads.map(validate, read_block(spec)):
                (samples if sample else quarantined).append(sample or bad)
        write_block_outputs(self.run_dir, spec.name, samples, quarantined, self.row_group_rows)
        self.last_kept_out = sum(1 for q in quarantined if q[schema.REASON] in NOT_FAILURES)
        return len(samples), len(quarantined)


def write_block_outputs(run_dir: RunDir, name: str, samples: list[dict], quarantined: list[dict],
                        row_group_rows: int | None = None) -> None:
    """``row_group_rows``: rows per parquet row group of the samples file (``extract.shard_rows``, so that an
    extraction shard decodes only its own rows)."""
    # The quarantine shard is written first: a block counts as done only once its samples shard exists.
    (run_dir / "quarantine" / "ingest" / f"{name}.parquet").write_parquet(
        pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA))
    (run_dir / "samples" / f"{name}.parquet").write_parquet(
        pa.Table.from_pylist(samples, schema=SAMPLES_SCHEMA), row_group_rows=row_group_rows)


def _py(value):
    return value.item() if hasattr(value, "item") else value


def block_done(run_dir: RunDir, name: str) -> bool:
    return (run_dir / "samples" / f"{name}.parquet").exists() and \
        (run_dir / "quarantine" / "ingest" / f"{name}.parquet").exists()


def ingest_executor(cfg: RunConfig, blocks: list[BlockSpec]) -> str:
    """``pool.executor`` resolved: ``auto`` is ``local`` for a pool of one block (one task: Ray adds nothing)."""
    if cfg.pool.executor == "auto":
        return "local" if len(blocks) <= 1 else "ray"
    return cfg.pool.executor


def validate_blocks(cfg: RunConfig, pending: list[BlockSpec], stage_args: dict,
                    executor: str) -> Iterator[tuple[int, int, int]]:
    """Run :class:`IngestBlockStage` on every pending block, in this process (``local``, in block order) or as
    Ray tasks (``ray``, in completion order); yields ``(good, bad, kept_out)`` row counts per block as blocks
    finish (``kept_out``: quarantined by design, :data:`NOT_FAILURES`)."""
    if not pending:
        return
    if executor == "local":
        stage = IngestBlockStage(**stage_args)
        for spec in pending:
            good, bad = stage.process(spec)
            yield good, bad, stage.last_kept_out
        return
    ray_adapter.ensure_ray(cfg.ray, env=worker_environment(cfg.storage))
    ds = ray_adapter.map_task_stage(ray_adapter.from_rows([b.to_dict() for b in pending]), IngestBlockStage,
                                    stage_args)
    for row in ray_adapter.iter_result_rows(ds):
        yield int(row["good"]), int(row["bad"]), int(row["kept_out"])


def run_ingest(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    """Run the ingest phase; returns counts ``{rows_in, samples, quarantined, by_reason}``."""
    started = time.monotonic()
    files = list_pool_files(cfg.pool.path, cfg.pool.format)
    write_pool_files(run_dir / "samples" / POOL_FILES, files)
    blocks = plan_blocks(files, cfg.pool.records_per_block)
    shape = pool_shape(cfg.pool, files, blocks)
    tasks = task_source(cfg.pool, files, blocks)
    total = sum(b.num_records for b in blocks)
    pending = [b for b in blocks if not block_done(run_dir, b.name)]
    done = total - sum(b.num_records for b in pending)
    progress = Progress("ingest", total, run_dir / "progress.json", already_done=done, quiet=quiet)
    budget = FailureBudget("ingest", cfg.failures, run_dir / "quarantine" / "ingest", seen=done,
                           exclude=NOT_FAILURES)
    stage_args = {"pool": cfg.pool.model_dump(), "image_root": resolve_image_root(cfg.pool), "run_dir": str(run_dir),
                  "row_group_rows": cfg.extract.shard_rows, "index_blocks": tasks["from"] == "index_blocks",
                  "shape": shape["shape"], "file_shapes": file_shapes(shape, files)}
    for good, bad, kept_out in validate_blocks(cfg, pending, stage_args, ingest_executor(cfg, blocks)):
        progress.update(good + bad)
        budget.update(good + bad, bad - kept_out)
    progress.finish()
    quarantine_duplicate_ids(run_dir, cfg.extract.shard_rows)
    counts = ingest_counts(run_dir)
    if counts["samples"] + counts["quarantined"] != total:
        raise RuntimeError(f"ingest lost rows: {total} read but {counts['samples']} samples + "
                           f"{counts['quarantined']} quarantined (stale shards from another pool in {run_dir}?)")
    counts["rows_in"] = total
    counts["shape"] = shape
    counts["tasks"] = tasks
    counts["tasks_decided_by"] = task_decisions(run_dir)
    counts["seconds"] = round(time.monotonic() - started, 3)
    return counts


DUPLICATES_SUFFIX = ".duplicate_id.parquet"


def quarantine_duplicate_ids(run_dir: RunDir, row_group_rows: int | None = None) -> int:
    """Move every row whose ``id`` an earlier valid row (in row-id order) already used from ``samples/`` to
    ``quarantine/ingest/<block>.duplicate_id.parquet``; returns the number of rows moved by this call.

    Reads only the ``row_id``, ``sample_id``, ``source_file`` and ``source_index`` columns of every samples
    shard, then rewrites just the shards that hold a duplicate. Each duplicates shard is written (merged with
    what an earlier, interrupted pass wrote) before its samples shard is rewritten, so a pass killed in between
    is completed by the next one with the same result.
    """
    shards = (run_dir / "samples").list(".parquet")
    if not shards:
        return 0
    columns = [schema.ROW_ID, schema.SAMPLE_ID, schema.SOURCE_FILE, schema.SOURCE_INDEX]
    tables = [f.read_parquet(columns) for f in shards]
    shard_of = np.repeat(np.arange(len(shards)), [t.num_rows for t in tables])
    ids = pa.concat_tables(tables)
    row_ids = ids.column(schema.ROW_ID).to_numpy()
    dup, first = first_seen_duplicates(row_ids, np.asarray(ids.column(schema.SAMPLE_ID).to_pylist(), dtype=object))
    if len(dup) == 0:
        return 0
    sample_ids = ids.column(schema.SAMPLE_ID)
    sources = ids.column(schema.SOURCE_FILE)
    indices = ids.column(schema.SOURCE_INDEX)
    message = {int(row_ids[d]): duplicate_id_message(sample_ids[int(d)].as_py(), sources[int(f)].as_py(),
                                                     indices[int(f)].as_py()) for d, f in zip(dup, first)}
    for s in np.unique(shard_of[dup]):
        shard = shards[int(s)]
        table = shard.read_parquet()
        is_dup = np.isin(table.column(schema.ROW_ID).to_numpy(), np.fromiter(message, np.int64))
        moved = table.filter(pa.array(is_dup)).select([schema.ROW_ID, schema.SOURCE_FILE, schema.SOURCE_INDEX,
                                                       schema.RAW])
        rows = [quarantine_row(r[schema.ROW_ID], r[schema.SOURCE_FILE], r[schema.SOURCE_INDEX], "ingest",
                               schema.Reason.DUPLICATE_ID, message[r[schema.ROW_ID]], r[schema.RAW])
                for r in moved.to_pylist()]
        target = run_dir / "quarantine" / "ingest" / (shard.name[:-len(".parquet")] + DUPLICATES_SUFFIX)
        quarantined = pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)
        if target.exists():
            earlier = target.read_parquet()
            again = pc.is_in(earlier.column(schema.ROW_ID), quarantined.column(schema.ROW_ID))
            earlier = earlier.filter(pc.invert(again))
            quarantined = pa.concat_tables([earlier, quarantined]).sort_by(schema.ROW_ID)
        target.write_parquet(quarantined)
        shard.write_parquet(table.filter(pa.array(~is_dup)), row_group_rows=row_group_rows)
    return len(dup)


def pool_shape(pool: PoolConfig, files: list, blocks: list[BlockSpec]) -> dict:
    """``{"shape", "from"}``: ``pool.schema`` when set (``from: config``), else the shape of each pool file's
    first records (:func:`datasel_ray.io.shapes.detect_shape`, ``from: detected``); ``shape`` is the first file's,
    and ``files`` (``{file uri: shape}``) is added when the files of a pool folder differ."""
    if pool.shape != "auto":
        return {"shape": pool.shape, "from": "config"}
    per_file = {}
    for f in files:
        first = next((b for b in blocks if b.file_index == f.index), None)
        per_file[f.uri] = detect_shape(probe_records([first] if first else []))
    shapes = list(per_file.values())
    out = {"shape": shapes[0] if shapes else "llava", "from": "detected"}
    if len(set(shapes)) > 1:
        out["files"] = per_file
    return out


def file_shapes(shape: dict, files: list) -> dict[int, str]:
    """``{file_index: shape}`` of the files whose shape is not ``shape["shape"]`` (from :func:`pool_shape`)."""
    return {f.index: shape["files"][f.uri] for f in files
            if f.uri in shape.get("files", {}) and shape["files"][f.uri] != shape["shape"]}


def task_decisions(run_dir: RunDir) -> dict[str, int]:
    """How many samples got their task each way (``task_from`` counts, :class:`~datasel_ray.schema.TaskFrom`)."""
    out: dict[str, int] = {}
    for f in (run_dir / "samples").list(".parquet"):
        table = f.read_parquet([schema.TASK_FROM]) if schema.TASK_FROM in _parquet_columns(f) else None
        for value in ([] if table is None else table.column(schema.TASK_FROM).to_pylist()):
            out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


def _parquet_columns(f: Location) -> list[str]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(f.open_input()).schema_arrow.names


def task_source(pool: PoolConfig, files: list, blocks: list[BlockSpec]) -> dict:
    """How tasks are inferred: ``{"recipe", "from", "why"?}``; ``from`` is ``index_blocks`` when the pool is
    ``llava_v1_5_mix665k.json`` under ``task_recipe: llava_665k``, else ``rules``, with ``why`` saying
    what made a ``llava_665k`` pool fall back to the per-row rules."""
    if pool.task_recipe != "llava_665k":
        return {"recipe": pool.task_recipe, "from": "rules"}
    why = llava_665k_mismatch(files, blocks)
    if why is None:
        return {"recipe": pool.task_recipe, "from": "index_blocks"}
    log.info("pool.task_recipe=llava_665k: tasks from image folders and response-format prompts, not the "
             "llava_v1_5_mix665k.json index blocks, because %s", why)
    return {"recipe": pool.task_recipe, "from": "rules", "why": why}


def ingest_counts(run_dir: RunDir) -> dict:
    import pyarrow.parquet as pq

    n_samples = sum(pq.ParquetFile(f.open_input()).metadata.num_rows for f in (run_dir / "samples").list(".parquet"))
    by_reason: dict[str, int] = {}
    for f in (run_dir / "quarantine" / "ingest").list(".parquet"):
        for reason in f.read_parquet([schema.REASON]).column(schema.REASON).to_pylist():
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return {"samples": n_samples, "quarantined": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items()))}
