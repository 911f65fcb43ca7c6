"""Extract phase: ``samples/`` → ``features/`` (one parquet shard per sample shard) on a Ray actor pool.

The unit of work is a *shard*: ``extract.shard_rows`` consecutive rows of one samples file. Ray Data carries
one row per shard through two stages:

1. :class:`ShardPreprocessStage` (CPU tasks): reads the shard's samples, decodes images, applies the chat
   template, tokenises and truncates (:class:`~datasel_ray.features.extractor.Preprocessor`), and packs the
   result into one payload. With ``extract.preprocess`` resolved to ``actor`` (the default for CPU actors, see
   :func:`preprocess_in_actor`) the actor does this itself and no task waits for a CPU an actor holds.
2. :class:`ShardExtractStage` (an autoscaling actor pool, ``num_gpus`` per actor): runs the reference model in
   micro-batches of ``extract.batch_size`` rows in row order, and writes ``features/<shard>.parquet`` plus
   ``quarantine/extract/<shard>.parquet`` atomically.

Because a shard is always processed as the same micro-batches in the same order, its features are
bit-identical whether it runs in an uninterrupted job or in a resumed one; a re-run skips shards whose
feature file exists (so a killed job, worker or driver loses at most the shards in flight).
"""

from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasel_ray import schema
from datasel_ray.config import ModelConfig, RunConfig, TiveConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.io.validation import quarantine_row
from datasel_ray.pipeline import ray_adapter
from datasel_ray.pipeline.failures import FailureBudget
from datasel_ray.pipeline.feature_store import vector_column
from datasel_ray.pipeline.ingest import QUARANTINE_SCHEMA
from datasel_ray.pipeline.memory import release_free_memory
from datasel_ray.pipeline.progress import Progress

SAMPLE_COLUMNS = [schema.ROW_ID, schema.TASK, schema.N_TURNS, schema.CONVERSATIONS, schema.IMAGE_PATH,
                  schema.RAW, schema.SOURCE_FILE, schema.SOURCE_INDEX]
PASSTHROUGH_COLUMNS = [schema.TASK, schema.N_TURNS]
_STATUS_COLUMNS = (schema.ERROR_REASON, schema.ERROR_MESSAGE)


def image_lists(samples_file: Location, offset: int, count: int) -> np.ndarray | None:
    """The ``images`` column (object [count] of per-row lists of ``{ref, uri, data}`` dicts) of rows
    ``[offset, offset + count)`` of a samples file, or None when the file has no such column."""
    if schema.IMAGES not in pq.ParquetFile(samples_file.open_input()).schema_arrow.names:
        return None
    column = samples_file.read_parquet_rows(offset, count, [schema.IMAGES]).column(schema.IMAGES)
    out = np.empty(len(column), dtype=object)
    for i, images in enumerate(column.to_pylist()):
        out[i] = images
    return out


def plan_shards(run_dir: RunDir, shard_rows: int) -> list[dict]:
    """Shards of every samples file, in row order: ``{shard_id, samples_file, offset, count}``."""
    shards = []
    for f in (run_dir / "samples").list(".parquet"):
        n = pq.ParquetFile(f.open_input()).metadata.num_rows
        stem = f.name[: -len(".parquet")]
        for offset in range(0, n, shard_rows):
            shards.append({"shard_id": f"{stem}-{offset // shard_rows:05d}", "samples_file": str(f),
                           "offset": offset, "count": min(shard_rows, n - offset)})
    return shards


def feature_shard_path(run_dir: RunDir, shard_id: str) -> Location:
    return run_dir / "features" / f"{shard_id}.parquet"


class ShardPreprocessStage:
    """CPU stage: a batch of shard specs → the same shards with their preprocessed rows packed as bytes."""

    def __init__(self, model: dict):
        from datasel_ray.features.extractor import Preprocessor

        self.preprocessor = Preprocessor(ModelConfig.model_validate(model))

    def prepare(self, samples_file: str, offset: int, count: int) -> dict:
        """``{"samples": the shard's sample columns, "prepared": the Preprocessor output}`` of one shard."""
        loc = Location.parse(samples_file)
        rows = loc.read_parquet_rows(offset, count, SAMPLE_COLUMNS)
        columns = {name: rows.column(name).to_numpy(zero_copy_only=False) for name in SAMPLE_COLUMNS}
        inputs = {k: columns[k] for k in (schema.ROW_ID, schema.CONVERSATIONS, schema.IMAGE_PATH)}
        images = image_lists(loc, offset, count)
        if images is not None:  # samples written before the images column read their image_path alone
            inputs[schema.IMAGES] = images
        prepared = self.preprocessor(inputs)
        return {"samples": columns, "prepared": prepared}

    def __call__(self, batch: dict) -> dict:
        payloads = [pickle.dumps(self.prepare(str(batch["samples_file"][i]), int(batch["offset"][i]),
                                              int(batch["count"][i])), protocol=5)
                    for i in range(len(batch["shard_id"]))]
        return {"shard_id": batch["shard_id"], "payload": np.array(payloads, dtype=object)}


class ShardExtractStage:
    """Model stage (one per actor): runs the reference model over a shard and writes its outputs."""

    def __init__(self, model: dict, run_dir: str, batch_size: int, tive: dict | None = None,
                 lora_dir: str | None = None, seed: int = 0, preprocess: bool = False):
        from datasel_ray.features.extractor import FeatureExtractor

        # preprocess: batches are shard specs (shard_id, samples_file, offset, count) prepared here, not payloads
        self.preprocess = ShardPreprocessStage(model) if preprocess else None
        self.extractor = FeatureExtractor(ModelConfig.model_validate(model))
        self.run_dir = RunDir(run_dir)
        self.batch_size = batch_size
        # load in the constructor: an actor then loads while the first shards are still being preprocessed
        self.extractor.setup()
        self.gradients = None
        if tive is not None and lora_dir:
            from datasel_ray.features.gradient_stage import GradientStage

            self.gradients = GradientStage(ModelConfig.model_validate(model), TiveConfig.model_validate(tive),
                                           lora_dir, seed, base=self.extractor.vlm)
            self.gradients.setup()

    def __call__(self, batch: dict) -> dict:
        rows, failed = [], []
        for i, shard_id in enumerate(batch["shard_id"]):
            if self.preprocess is not None:
                data = self.preprocess.prepare(str(batch["samples_file"][i]), int(batch["offset"][i]),
                                               int(batch["count"][i]))
            else:
                data = pickle.loads(batch["payload"][i])
            n_ok, n_bad = self.process(str(shard_id), data)
            rows.append(n_ok + n_bad)
            failed.append(n_bad)
            release_free_memory()  # an actor runs every shard: it keeps no shard's freed activation pages
        return {"shard_id": batch["shard_id"], "rows": np.array(rows), "failed": np.array(failed)}

    def process(self, shard_id: str, data: dict) -> tuple[int, int]:
        samples, prepared = data["samples"], data["prepared"]
        n = len(samples[schema.ROW_ID])
        parts = []
        for start in range(0, n, self.batch_size):
            part = {k: v[start:start + self.batch_size] for k, v in prepared.items()}
            out = self.extractor(part)
            if self.gradients is not None:
                out = self.gradients.add_gradients(part, out)
            parts.append(out)
        features = {k: _concat([p[k] for p in parts]) for k in parts[0]}
        ok = features[schema.ERROR_REASON] == ""
        table = features_table(features, samples, ok)
        bad = [quarantine_row(int(samples[schema.ROW_ID][i]), str(samples[schema.SOURCE_FILE][i]),
                              int(samples[schema.SOURCE_INDEX][i]), "extract", str(features[schema.ERROR_REASON][i]),
                              str(features[schema.ERROR_MESSAGE][i]), str(samples[schema.RAW][i]))
               for i in np.flatnonzero(~ok)]
        (self.run_dir / "quarantine" / "extract" / f"{shard_id}.parquet").write_parquet(
            pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA))
        metadata = {HOOKS_METADATA_KEY: json.dumps(self.extractor.vlm.hook_points(), sort_keys=True)}
        if self.gradients is not None:
            metadata[PROJECTOR_METADATA_KEY] = json.dumps(self.gradients.projector_fingerprint(), sort_keys=True)
        table = table.replace_schema_metadata(metadata)
        (self.run_dir / "features" / f"{shard_id}.parquet").write_parquet(table)
        return int(ok.sum()), int((~ok).sum())


PROJECTOR_METADATA_KEY = "datasel.projector"
# the modules the features were hooked at (ReferenceVLM.hook_points), named in the extract manifest entry
HOOKS_METADATA_KEY = "datasel.hooks"


def feature_hook_points(run_dir: RunDir) -> dict | None:
    """The hook points recorded in the first feature shard's footer (None without shards or record)."""
    for f in (run_dir / "features").list(".parquet"):
        with f.open_input() as handle:
            value = (pq.ParquetFile(handle).metadata.metadata or {}).get(HOOKS_METADATA_KEY.encode())
        return None if value is None else json.loads(value.decode())
    return None


def feature_shards_summary(run_dir: RunDir) -> tuple[int, dict | None]:
    """(rows in ``features/``, the TIVE projection every shard was written with or None without TIVE), from one
    read of each shard's footer. Raises RuntimeError when shards disagree on the projection (e.g. a resumed run
    moved between CPU and GPU actors, whose generators give different matrices): their gradients cannot be
    compared."""
    rows = 0
    seen: dict[str, list[str]] = {}
    for f in (run_dir / "features").list(".parquet"):
        with f.open_input() as handle:
            footer = pq.ParquetFile(handle).metadata
        rows += footer.num_rows
        value = (footer.metadata or {}).get(PROJECTOR_METADATA_KEY.encode())
        if value is not None:
            seen.setdefault(value.decode(), []).append(f.name)
    if len(seen) > 1:
        detail = "; ".join(f"{len(names)} shard(s) like {names[0]}: {fp}" for fp, names in seen.items())
        raise RuntimeError(f"features/ in {run_dir} mixes TIVE projections ({detail}): re-run extract with "
                           f"--force on one device kind")
    return rows, json.loads(next(iter(seen))) if seen else None


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays[0].dtype == object:
        return np.array([x for a in arrays for x in a], dtype=object)
    return np.concatenate(arrays)


def features_table(features: dict, samples: dict, keep: np.ndarray) -> pa.Table:
    """The features/ parquet table of the rows in ``keep``; vectors as fixed-size lists."""
    columns: dict[str, pa.Array] = {}
    for name in PASSTHROUGH_COLUMNS:
        columns[name] = pa.array(samples[name][keep])
    for name, values in features.items():
        if name in _STATUS_COLUMNS:
            continue
        values = values[keep]
        if values.ndim == 2:
            columns[name] = vector_column(values)
        else:
            columns[name] = pa.array(values)
    ordered = {schema.ROW_ID: columns.pop(schema.ROW_ID)}
    ordered.update(columns)
    return pa.table(ordered)


def resolve_num_gpus(cfg: RunConfig) -> float:
    """GPUs per extraction actor: the configured value, else 1 when a node of the cluster has a GPU or an
    autoscaler can launch one (a cluster whose GPU workers start at zero), else 0."""
    if cfg.extract.num_gpus_per_actor is not None:
        return cfg.extract.num_gpus_per_actor
    nodes = ray_adapter.cluster_nodes() + ray_adapter.autoscaler_node_types()
    return 1.0 if any(n.get("GPU", 0) >= 1 for n in nodes) else 0.0


def preprocess_in_actor(cfg: RunConfig, num_gpus: float) -> bool:
    """``extract.preprocess``: True runs image decode and tokenisation inside the model actors. ``auto``: inside
    when the actors use no GPU. CPU actors then never wait on preprocessing tasks that need the CPU an actor
    holds (a node lost from a small cluster left exactly that: an actor holding the last CPU, a preprocessing
    task waiting for it); GPU actors keep separate CPU tasks so that the GPU is fed while the next shard is
    prepared."""
    if cfg.extract.preprocess == "auto":
        return num_gpus == 0
    return cfg.extract.preprocess == "actor"


def validate_resources(cfg: RunConfig, num_gpus: float) -> None:
    """Refuse requests no node of the cluster can satisfy, before any work starts. With an autoscaler, a node
    type it can launch must fit one actor; without one, a node of the cluster must."""
    bundle = {"CPU": cfg.extract.num_cpus_per_actor, "GPU": num_gpus}
    if ray_adapter.has_autoscaler():
        if ray_adapter.can_launch(bundle) or any(ray_adapter.fits(bundle, n) for n in ray_adapter.cluster_nodes()):
            return
        types = ", ".join(str(t) for t in ray_adapter.autoscaler_node_types())
        raise ValueError(f"extract: one actor needs {{CPU: {bundle['CPU']:g}, GPU: {num_gpus:g}}} but neither a node "
                         f"of the cluster nor a node type the autoscaler can launch ({types}) holds that: lower "
                         f"extract.num_cpus_per_actor / num_gpus_per_actor or add a node type")
    nodes = ray_adapter.cluster_nodes()
    max_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    max_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if num_gpus > max_gpus:
        raise ValueError(f"extract.num_gpus_per_actor={num_gpus} but the largest node of the cluster has "
                         f"{max_gpus:g} GPUs and no autoscaler can add one: lower it, or add GPU nodes (set "
                         f"{ray_adapter.ASSUME_AUTOSCALER_ENV}=1 when an autoscaler Ray cannot see adds GPU workers)")
    if cfg.extract.num_cpus_per_actor > max_cpus:
        raise ValueError(f"extract.num_cpus_per_actor={cfg.extract.num_cpus_per_actor} but the largest node of "
                         f"the cluster has {max_cpus:g} CPUs and no autoscaler can add a larger one")


def run_extract(cfg: RunConfig, run_dir: RunDir, lora_dir: str | None = None, quiet: bool = False) -> dict:
    """Run the extract phase; returns ``{rows, features, failed, shards, seconds}``. Raises
    :class:`~datasel_ray.pipeline.failures.FailureBudgetExceeded` when more rows fail than ``failures`` allows."""
    started = time.monotonic()
    num_gpus = resolve_num_gpus(cfg)
    validate_resources(cfg, num_gpus)
    shards = plan_shards(run_dir, cfg.extract.shard_rows)
    if not shards:
        raise RuntimeError(f"No samples in {run_dir / 'samples'}: run the ingest phase first")
    total = sum(s["count"] for s in shards)
    pending = [s for s in shards if not feature_shard_path(run_dir, s["shard_id"]).exists()]
    done = total - sum(s["count"] for s in pending)
    progress = Progress("extract", total, run_dir / "progress.json", already_done=done, quiet=quiet)
    budget = FailureBudget("extract", cfg.failures, run_dir / "quarantine" / "extract", seen=done)
    in_actor = preprocess_in_actor(cfg, num_gpus)
    if pending:
        model = cfg.model.model_dump()
        ds = ray_adapter.from_rows(pending)
        if not in_actor:
            ds = ray_adapter.map_task_stage(ds, ShardPreprocessStage, {"model": model}, batch_size=1)
        tive = cfg.tive.model_dump() if cfg.tive.enabled else None
        ds = ray_adapter.map_actor_stage(
            ds, ShardExtractStage,
            {"model": model, "run_dir": str(run_dir), "batch_size": cfg.extract.batch_size, "tive": tive,
             "lora_dir": lora_dir, "seed": cfg.seed, "preprocess": in_actor},
            batch_size=1, min_actors=cfg.extract.min_actors, max_actors=cfg.extract.max_actors,
            num_gpus=num_gpus, num_cpus=cfg.extract.num_cpus_per_actor, max_restarts=cfg.extract.max_restarts,
            max_task_retries=cfg.extract.max_task_retries)
        for row in ray_adapter.iter_result_rows(ds):
            progress.update(int(row["rows"]))
            budget.update(int(row["rows"]), int(row["failed"]))
    progress.finish()
    n_features, projector = feature_shards_summary(run_dir)
    failed = sum(pq.ParquetFile(f.open_input()).metadata.num_rows
                 for f in (run_dir / "quarantine" / "extract").list(".parquet"))
    return {"rows": total, "features": n_features, "failed": failed, "shards": len(shards),
            "num_gpus_per_actor": num_gpus, "preprocess": "actor" if in_actor else "tasks", "projector": projector,
            "hooks": feature_hook_points(run_dir),
            "seconds": round(time.monotonic() - started, 3)}
