"""Warm-up phase (TIVE §3.2): a LoRA adapter trained with Ray Train on a per-task sample of the pool.

``samples/`` → ``lora/``:

- ``warmup_ids.npy``: int64 row ids of the warm-up sample (``tive.warmup_fraction · N / #tasks`` per task,
  seeded from ``derive_seed(seed, "warmup")``; :func:`datasel_ray.training.lora.select_warmup_rows`);
- ``adapter/``: the peft LoRA adapter (``save_pretrained``), loaded by extraction for TIVE/LESS gradients;
- ``optimizer.pt``: the AdamW state keyed by parameter name (LESS ``adam`` gradients; LESS issue #4);
- ``training_log.json``: loss per step and epoch, samples, seconds, config, ``adapter_sha256`` and
  ``"complete": true`` — written last, so a directory without it is an unfinished run and is retrained.

Training runs as a Ray Train ``TorchTrainer`` (:mod:`datasel_ray.pipeline.train_adapter`) with
``tive.num_workers`` workers of 1 CPU (+ 1 GPU when ``tive.use_gpu``, default: iff the cluster has GPUs). Each
worker reads and preprocesses the warm-up rows itself (same :class:`~datasel_ray.features.extractor.Preprocessor`
as extraction; rows that fail it are dropped and counted), loads the reference model, attaches the LoRA adapter
and trains (:func:`datasel_ray.training.lora.train_lora`). Rank 0 reports a checkpoint after every epoch and
writes progress to ``progress.json``. Ray Train's own files go to ``lora/_ray_train`` and are removed after
success.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasel_ray import schema
from datasel_ray.config import ModelConfig, RunConfig, TiveConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.seeds import derive_seed
from datasel_ray.training.lora import (
    ADAPTER_DIR,
    TRAINING_LOG_FILE,
    WARMUP_IDS_FILE,
    files_sha256,
    select_warmup_rows,
)

log = logging.getLogger(__name__)

RAY_TRAIN_DIR = "_ray_train"
_PREPROCESS_CHUNK = 32


def adapter_location(run_dir: RunDir) -> Location:
    """Where the warm-up writes the LoRA adapter that extraction and the scorer load."""
    return run_dir / "lora" / ADAPTER_DIR


def adapter_dir_for_extract(cfg: RunConfig, run_dir: RunDir) -> str | None:
    """The warm-up adapter that extraction loads for TIVE gradients, or None when TIVE is off."""
    if not cfg.tive.enabled:
        return None
    adapter = adapter_location(run_dir)
    if not adapter.exists():
        raise RuntimeError(f"TIVE is enabled but {adapter} does not exist: run the warmup phase first")
    return str(adapter)


# -- driver ------------------------------------------------------------------------------------------------
def run_warmup(cfg: RunConfig, run_dir: RunDir, quiet: bool = False) -> dict:
    """Run the warm-up phase (or return the recorded result when ``lora/`` holds a complete run).

    Returns ``{samples, warmup_rows, dropped, steps, epochs, first_loss (first step), final_loss (mean of the
    last epoch), last_step_loss, epoch_loss, seconds, train_seconds, num_workers, use_gpu, adapter_dir,
    adapter_sha256}``; the runner stores it under ``phases.warmup.result`` of the manifest.
    """
    lora = run_dir / "lora"
    finished = completed_log(lora)
    if finished is not None:
        if not quiet:
            log.info("warmup: %s holds a complete adapter: skipped", lora)
        return result_from_log(finished, lora)
    started = time.monotonic()
    seed = derive_seed(cfg.seed, "warmup")
    ids = warmup_row_ids(run_dir, cfg.tive.warmup_fraction, seed)
    (lora / WARMUP_IDS_FILE).write_npy(ids)
    use_gpu = resolve_use_gpu(cfg.tive)
    if not quiet:
        log.info("warmup: training a LoRA adapter on %d rows (%d workers, gpu=%s)", len(ids),
                 cfg.tive.num_workers, use_gpu)
    worker_config = {"model": cfg.model.model_dump(), "tive": cfg.tive.resolved(cfg.model).model_dump(), "seed": seed,
                     "samples_dir": str(run_dir / "samples"), "row_ids": ids.tolist(),
                     "progress_file": str(run_dir / "progress.json"), "quiet": quiet}
    storage = lora / RAY_TRAIN_DIR
    storage.delete()
    local = Path(tempfile.mkdtemp(prefix="datasel-warmup-"))
    try:
        from datasel_ray.pipeline.train_adapter import fit_torch

        fit_torch(warmup_worker, worker_config, num_workers=cfg.tive.num_workers, use_gpu=use_gpu,
                  storage_path=str(storage), name="warmup", dest_dir=str(local / "checkpoint"))
        train_log = _publish(local / "checkpoint", lora, cfg, time.monotonic() - started, use_gpu)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    storage.delete()
    return result_from_log(train_log, lora)


def warmup_row_ids(run_dir: RunDir, fraction: float, seed: int) -> np.ndarray:
    """Warm-up row ids (int64, sorted) from ``samples/`` (columns row_id, task)."""
    tables = [f.read_parquet([schema.ROW_ID, schema.TASK]) for f in (run_dir / "samples").list(".parquet")]
    if not tables:
        raise RuntimeError(f"No samples in {run_dir / 'samples'}: run the ingest phase first")
    table = pa.concat_tables(tables)
    return select_warmup_rows(table.column(schema.ROW_ID).to_numpy(),
                              np.asarray(table.column(schema.TASK).to_pylist(), dtype=object), fraction, seed)


def resolve_use_gpu(tive: TiveConfig) -> bool:
    """``tive.use_gpu`` when set, else True iff some node of the cluster has a GPU."""
    if tive.use_gpu is not None:
        return tive.use_gpu
    from datasel_ray.pipeline import ray_adapter

    return any(n.get("GPU", 0) >= 1 for n in ray_adapter.cluster_nodes())


def validate_warmup_resources(tive: TiveConfig) -> None:
    """Refuse a warm-up the cluster cannot place (Ray Train would wait for it forever): each of
    ``tive.num_workers`` workers takes 1 CPU, plus 1 GPU when ``use_gpu``. Skipped when the cluster autoscales."""
    from datasel_ray.pipeline import ray_adapter

    if ray_adapter.has_autoscaler():
        return
    nodes = ray_adapter.cluster_nodes()
    gpus = sum(int(n.get("GPU", 0.0)) for n in nodes)
    cpus = sum(int(n.get("CPU", 0.0)) for n in nodes)
    if resolve_use_gpu(tive) and tive.num_workers > gpus:
        raise ValueError(f"tive.use_gpu with tive.num_workers={tive.num_workers} needs {tive.num_workers} GPUs but "
                         f"the cluster has {gpus}: set tive.use_gpu=false, lower tive.num_workers, or add GPU nodes "
                         f"(set DATASEL_ASSUME_AUTOSCALER=1 when the cluster autoscales GPU workers)")
    if tive.num_workers > cpus:
        raise ValueError(f"tive.num_workers={tive.num_workers} needs {tive.num_workers} CPUs but the cluster has "
                         f"{cpus}: lower tive.num_workers")


def completed_log(lora: Location) -> dict | None:
    """The training log of a complete warm-up in ``lora``, or None."""
    path = lora / TRAINING_LOG_FILE
    if not (lora / ADAPTER_DIR).exists() or not path.exists():
        return None
    record = path.read_json()
    return record if record.get("complete") else None


def adapter_sha256(adapter: Location) -> str:
    """Checksum of the adapter directory (file names and bytes)."""
    files = adapter.list(recursive=True)
    prefix = adapter.path.rstrip("/") + "/"
    return files_sha256([(f.path[len(prefix):], f.read_bytes()) for f in files])


def result_from_log(record: dict, lora: Location) -> dict:
    keys = ("samples", "warmup_rows", "dropped", "steps", "epochs", "first_loss", "final_loss", "last_step_loss",
            "epoch_loss", "seconds", "train_seconds", "num_workers", "use_gpu", "adapter_sha256")
    return {**{k: record.get(k) for k in keys}, "adapter_dir": str(lora / ADAPTER_DIR)}


def _publish(checkpoint: Path, lora: Location, cfg: RunConfig, seconds: float, use_gpu: bool) -> dict:
    """Copy the final checkpoint into ``lora/`` (any filesystem); training_log.json last, marked complete."""
    for path in sorted(checkpoint.rglob("*")):
        rel = path.relative_to(checkpoint).as_posix()
        if path.is_file() and rel != TRAINING_LOG_FILE:
            (lora / rel).write_bytes(path.read_bytes())
    record = json.loads((checkpoint / TRAINING_LOG_FILE).read_text())
    record.update({"complete": True, "seconds": round(seconds, 3), "use_gpu": use_gpu,
                   "num_workers": cfg.tive.num_workers, "adapter_sha256": adapter_sha256(lora / ADAPTER_DIR),
                   "config": {"model": cfg.model.model_dump(mode="json"), "tive": cfg.tive.model_dump(mode="json"),
                              "seed": cfg.seed}})
    (lora / TRAINING_LOG_FILE).write_json(record)
    return record


# -- worker ------------------------------------------------------------------------------------------------
def load_warmup_rows(samples_dir: str, row_ids: np.ndarray) -> dict[str, np.ndarray]:
    """``row_id`` / ``conversations`` / ``image_path`` columns of the rows ``row_ids``, in row-id order."""
    wanted = pa.array(np.asarray(row_ids, dtype=np.int64))
    parts = []
    for f in Location.parse(samples_dir).list(".parquet"):
        columns = [schema.ROW_ID, schema.CONVERSATIONS, schema.IMAGE_PATH]
        if schema.IMAGES in pq.ParquetFile(f.open_input()).schema_arrow.names:
            columns.append(schema.IMAGES)  # per-row image lists, embedded bytes included
        table = f.read_parquet(columns)
        parts.append(table.filter(pc.is_in(table.column(schema.ROW_ID), value_set=wanted)))
    table = pa.concat_tables(parts, promote_options="default").sort_by(schema.ROW_ID)
    out = {}
    for name in table.column_names:
        if name == schema.IMAGES:
            out[name] = np.empty(table.num_rows, dtype=object)
            for i, images in enumerate(table.column(name).to_pylist()):
                out[name][i] = images
        else:
            out[name] = table.column(name).to_numpy(zero_copy_only=False)
    return out


def prepare_warmup_samples(model_cfg: ModelConfig, rows: dict[str, np.ndarray]) -> tuple[list, int]:
    """Preprocess ``rows`` in chunks; returns (PreparedSample list of the good rows, number dropped)."""
    from datasel_ray.features.extractor import Preprocessor, sample_from_row

    preprocessor = Preprocessor(model_cfg)
    samples, dropped = [], 0
    n = len(rows[schema.ROW_ID])
    for start in range(0, n, _PREPROCESS_CHUNK):
        prepared = preprocessor({k: v[start:start + _PREPROCESS_CHUNK] for k, v in rows.items()})
        for i, reason in enumerate(prepared[schema.ERROR_REASON]):
            if reason:
                dropped += 1
            else:
                samples.append(sample_from_row(prepared, i))
    return samples, dropped


def warmup_worker(config: dict, ctx) -> None:
    """Ray Train worker body (``ctx``: :class:`~datasel_ray.pipeline.train_adapter.WorkerContext`).

    Seeds torch with ``config["seed"]``, preprocesses the warm-up rows, loads the reference model on
    ``ctx.device``, attaches LoRA, trains, and reports after each epoch (rank 0 with a checkpoint directory).
    """
    import torch

    from datasel_ray.models.vlm import ReferenceVLM
    from datasel_ray.pipeline.progress import Progress
    from datasel_ray.training.lora import attach_lora, save_checkpoint, train_lora, trainable_names

    model_cfg = ModelConfig.model_validate(config["model"])
    tive = TiveConfig.model_validate(config["tive"])
    seed = int(config["seed"])
    torch.manual_seed(seed)
    started = time.monotonic()
    rows = load_warmup_rows(config["samples_dir"], np.asarray(config["row_ids"], dtype=np.int64))
    samples, dropped = prepare_warmup_samples(model_cfg, rows)
    if not samples:
        raise RuntimeError(f"none of the {len(rows[schema.ROW_ID])} warm-up rows survived preprocessing")
    vlm = ReferenceVLM.load(model_cfg, device=ctx.device)
    model = attach_lora(vlm.model, tive.lora, seed, train_projector=tive.train_projector)
    names = trainable_names(model)
    forward = ctx.prepare_model(model)
    lead = ctx.rank == 0
    progress = None
    if lead:
        per_rank = -(-len(samples) // ctx.world_size)
        progress = Progress("warmup", per_rank * tive.epochs, Location.parse(config["progress_file"]),
                            quiet=config.get("quiet", False))

    def on_step(epoch: int, step: int, loss: float, n: int) -> None:
        if lead:
            progress.update(n)
            log.info("warmup epoch %d step %d loss %.4f", epoch + 1, step, loss)

    def on_epoch(epoch: int, train_log, optimizer) -> None:
        metrics = {"epoch": epoch + 1, "steps": train_log.steps, "loss": train_log.epoch_loss[-1]}
        if not lead:
            ctx.report(metrics, None)
            return
        record = {"samples": len(samples), "warmup_rows": len(rows[schema.ROW_ID]), "dropped": dropped,
                  "steps": train_log.steps, "epochs": epoch + 1, "step_loss": train_log.step_loss,
                  "epoch_loss": train_log.epoch_loss,
                  "first_loss": train_log.step_loss[0] if train_log.steps else None,
                  "final_loss": train_log.epoch_loss[-1] if train_log.steps else None,
                  "last_step_loss": train_log.step_loss[-1] if train_log.steps else None, "samples_seen": train_log.samples_seen,
                  "train_seconds": round(time.monotonic() - started, 3), "world_size": ctx.world_size,
                  "seed": seed, "trainable_params": int(sum(p.numel() for p in model.parameters()
                                                            if p.requires_grad)),
                  "complete": False}
        with tempfile.TemporaryDirectory(prefix="datasel-ckpt-") as tmp:
            save_checkpoint(model, optimizer, names, tmp, record)
            ctx.report(metrics, tmp)

    train_lora(model, samples, vlm.processor.pad_token_id, learning_rate=tive.learning_rate, epochs=tive.epochs,
               batch_size=tive.warmup_batch_size, seed=seed, device=ctx.device, forward_model=forward,
               rank=ctx.rank, world_size=ctx.world_size, on_step=on_step, on_epoch=on_epoch,
               schedule=tive.lr_schedule, warmup_ratio=tive.warmup_ratio,
               accumulation_steps=tive.accumulation_steps())
    if progress is not None:
        progress.finish()
