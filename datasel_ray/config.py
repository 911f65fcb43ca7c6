"""Typed configuration for every phase. YAML only fills these models; errors name the field.

One :class:`RunConfig` describes a whole run. Each phase reads its own section; the run manifest stores
the sections that determine a phase's outputs so that a re-run with a different value is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from datasel_ray.methods.registry import method_names

PHASES = ("ingest", "warmup", "extract", "dedup", "aggregate", "select", "report")
TINY_MODEL = "tiny"


def _check_choices(values: list[str], choices: tuple[str, ...], what: str) -> list[str]:
    for name in values:
        if name not in choices:
            raise ValueError(f"Unknown {what} '{name}'. Choose from: {', '.join(choices)}")
    return values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PoolConfig(_Section):
    """Where the pool lives and how rows are validated at ingest."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    path: str = Field("", description="Pool file, directory of pool files, or glob; local path or filesystem URI.")
    format: Literal["auto", "json", "jsonl", "parquet"] = "auto"
    image_root: str = Field("", description="Root that relative image paths resolve under; default: the pool's folder.")
    task_field: str = "task"
    task_map: dict[str, str] | str | None = Field(
        None, description="Image-path prefix -> task rules (dict or YAML file), tried before the built-in LLaVA rules.")
    task_recipe: Literal["prefix", "llava_665k"] = Field(
        "prefix", description="How tasks are inferred for rows without a task field. prefix: image-folder rules "
        "(all COCO-image sources are one task, 'coco'). llava_665k: the 12 source blocks by index on "
        "llava_v1_5_mix665k.json itself, image folder plus LLaVA-1.5's response-format prompts on other pools "
        "(see datasel_ray/io/tasks.py).")
    default_task: str | None = Field("other", description="Task for rows no rule matches; null quarantines them.")
    max_turns: int = Field(64, ge=1, description="Rows with more human/gpt turns are quarantined as too_long.")
    max_chars: int = Field(32768, ge=1, description="Rows with more characters of text are quarantined as too_long.")
    check_images: bool = Field(True, description="Decode-check every image at ingest (catches corrupt files early).")
    records_per_block: int = Field(2000, ge=1, description="Records per read task when splitting pool files.")
    shape: Literal["auto", "llava", "texts", "messages"] = Field(
        "auto", alias="schema", description="How a record is written (datasel_ray/io/shapes.py): llava "
        "(conversations + image/images), texts (the_cauldron / FineVision), messages (role/content chat rows); "
        "auto: detected from the first records of each pool file. YAML key: schema.")
    source_fields: list[str] = Field(
        ["data_source", "source"], description="Row fields holding the pool's own source label; the first "
        "non-empty one is the task (after task_field, before any image-folder rule). [] turns it off.")
    io_threads: int = Field(16, ge=1, description="Records an ingest task validates at once: image checks are "
                            "reads (a round trip each on object storage) and decodes, which release the GIL.")
    executor: Literal["auto", "local", "ray"] = Field(
        "auto", description="Where ingest validates its blocks. ray: one Ray task per block; local: one after the "
        "other in this process (no Ray started); auto: local when the pool is a single block, else ray. The "
        "outputs are the same either way.")


class StorageConfig(_Section):
    """Object-store options for ``s3://`` and ``gs://`` paths (pool, images, run directory). Each set option
    stands for environment variables (:func:`datasel_ray.io.storage.storage_environment`); unset ones leave the
    process's environment in charge."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint such as http://127.0.0.1:9000 (its scheme picks http or https); "
        "sets AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3. Default: AWS S3.")
    region: str | None = Field(
        None, description="S3 region; sets AWS_REGION and AWS_DEFAULT_REGION. Default: from the environment, else "
        "us-east-1 with an endpoint_url, else the bucket's own region (looked up once per process).")
    anonymous: bool = Field(
        False, description="Unsigned requests (public S3 and GCS buckets); sets DATASEL_STORAGE_ANONYMOUS=1.")


REFERENCE_MAX_LENGTH = 2048


class SharedModel(_Section):
    """The run's model copy (:mod:`datasel_ray.models.shared_copy`): set by the driver at run start."""

    uri: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelConfig(_Section):
    """The reference model. ``tiny`` builds (once) and loads the offline tiny LLaVA; ``smol-llava`` the offline
    real one (:data:`datasel_ray.models.loading.BUILT_MODELS`); anything else is an HF checkpoint.

    Preprocessing follows the three reference repositories (LLaVA's ``train.py`` as used by COINCIDE, DataTailor
    and TIVE) for real checkpoints, with a switch back to this project's earlier behaviour each:

    - ``pad_to_square``: ``expand2square``, each image padded to a square with the processor's mean colour
      before the processor (the references' ``image_aspect_ratio="pad"``); ``false``: the processor's own
      resize / crop only. Default (``null``): on for real checkpoints whose processor makes one tile per image,
      off for ``tiny`` and for any-resolution processors (LLaVA-NeXT ``image_sizes``, Qwen2-VL).
    - ``image_first``: ``<image>`` moved to the front of the first human turn, as the references'
      ``preprocess_multimodal`` (placeholder removed, turn stripped, ``"<image>\\n"`` prepended); ``false``: kept
      where the row writes it. Default (``null``): on for real checkpoints, off for ``tiny``.
    - ``max_length``: samples cut to ``min(max_length, the model's own limit)`` tokens; default 2048, the
      references' ``model_max_length``; ``null``: the model's own limit.
    """

    name_or_path: str = TINY_MODEL
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int | None = Field(
        REFERENCE_MAX_LENGTH, ge=8, description="Token context: min(max_length, the model's limit); null: the "
        "model's limit. 2048 is the references' model_max_length.")
    pad_to_square: bool | None = Field(
        None, description="Pad images to a square with the processor's mean colour before the processor "
        "(LLaVA expand2square); null: on for real checkpoints, off for tiny.")
    image_first: bool | None = Field(
        None, description="Move <image> to the front of the first human turn (LLaVA preprocess_multimodal); "
        "null: on for real checkpoints, off for tiny.")
    coincide_layers: list[int] | None = Field(
        None, description="0-based decoder layers hooked for COINCIDE; default: ~5 evenly spaced layers.")
    image_size: int | None = Field(None, ge=8, description="Resize images to this square size before the processor.")
    trust_remote_code: bool = False
    max_padding: float | None = Field(
        0.25, ge=0, description="Split each model batch into passes of similar length so that pad tokens stay "
        "below this share of real tokens; null: one padded pass per batch.")
    store: str | None = Field(
        None, description="Where the run's model copy is published, content-addressed by sha256 (a URI such as "
        "s3://bucket/models, shared by runs); default: <run_dir>/model when run_dir is on object storage, the "
        "local model folder when it is local.")
    shared: SharedModel | None = Field(
        None, description="Set by the driver at run start: the copy every worker and serve replica loads and "
        "checks by sha256. Leave unset.")

    @property
    def is_reference_checkpoint(self) -> bool:
        """True for every model but the test-only ``tiny`` one: the references' preprocessing applies."""
        return self.name_or_path != TINY_MODEL

    def resolved_pad_to_square(self) -> bool:
        return self.is_reference_checkpoint if self.pad_to_square is None else self.pad_to_square

    def resolved_image_first(self) -> bool:
        return self.is_reference_checkpoint if self.image_first is None else self.image_first


class ExtractConfig(_Section):
    """The model pass over the pool (Ray Data actor pool)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_keys(cls, data):
        """``preprocess_batch_size`` never sized anything (a preprocessing task takes one shard of
        ``shard_rows``); configs and manifests that carry it still load."""
        if isinstance(data, dict) and "preprocess_batch_size" in data:
            data = {k: v for k, v in data.items() if k != "preprocess_batch_size"}
        return data

    batch_size: int = Field(8, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_gpus_per_actor: float | None = Field(None, ge=0, description="Default: 1 when a GPU is visible, else 0.")
    num_cpus_per_actor: float = Field(1.0, gt=0)
    max_restarts: int = Field(3, ge=0, description="Actor restarts after a worker dies.")
    max_task_retries: int = Field(
        -1, ge=-1, description="Retries of a shard whose actor died or became unreachable (a lost node); -1: "
        "while the actor restarts (bounded by max_restarts). A small number can be spent in the seconds before Ray "
        "declares a lost node dead.")
    shard_rows: int = Field(256, ge=1, description="Rows per written feature shard (resume granularity) and per "
                            "preprocessing task.")
    preprocess: Literal["auto", "tasks", "actor"] = Field(
        "auto", description="Where image decode and tokenisation run. tasks: separate Ray CPU tasks ahead of the "
        "model actors (keeps GPU actors fed); actor: inside each model actor (no task can then wait for a CPU an "
        "actor holds); auto: actor when the actors use no GPU, tasks otherwise.")

    @model_validator(mode="after")
    def _check_actor_range(self) -> "ExtractConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class CoincideConfig(_Section):
    """COINCIDE (Lee et al., 2024). Defaults follow the reference code (G-JWLee/COINCIDE_code)."""

    num_clusters: int | None = Field(None, ge=1, description="Default: max(1, round(N / 66)).")
    niter: int = Field(50, ge=1)
    seed: int | None = Field(None, description="k-means seed; default: derived from the run seed.")
    transferability: Literal["reference", "paper"] = "reference"
    cos_threshold: float = Field(0.9, description="Reference: ignore centroid pairs with cosine above this.")
    sigma: float = Field(1.0, gt=0)
    temperature: float = Field(0.1, gt=0)
    reduce_dim: int | None = Field(None, ge=2, description="Reduce vectors to this many dims before k-means.")
    reduce_method: Literal["random", "pca"] = Field(
        "random", description="random: seeded Gaussian projection (linear in d); pca: faiss PCA (O(d^3) to train).")
    train_sample: int | None = Field(
        None, ge=1, description="Train k-means on at most this many rows, then assign all (large pools).")


class DataTailorConfig(_Section):
    """DataTailor (Yu et al., 2025). Defaults follow the reference code (Yuqifan1117/DataTailor)."""

    cut: Literal["reference", "paper"] = "reference"
    cut_ratio: float = Field(0.1, gt=0, le=1)
    uniqueness: Literal["reference", "paper"] = "reference"
    representativeness: Literal["reference", "paper"] = "reference"
    dense_max_rows: int = Field(
        4000, ge=2, description="Tasks larger than this cluster without a dense N x N matrix.")
    precluster_size: int = Field(
        2000, ge=2, description="Large tasks: k-means pre-clusters, then Ward on their centroids.")
    precluster_train_rows: int | None = Field(
        65536, ge=2, description="Large tasks: the pre-cluster k-means trains on at most this many seeded rows "
        "of the task (null: all), then every row is assigned.")


# the language model is `language_model` in LLaVA / Qwen2-VL / LLaVA-OneVision and `text_model` in Idefics3 / SmolVLM
LM_ATTENTION_MODULES = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj)"
LM_LINEAR_MODULES = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# The TIVE warm-up recipes (TiveConfig.warmup_preset); a field set to a non-default value wins over its preset.
WARMUP_PRESETS: dict[str, dict] = {
    # this project's CPU recipe: constant lr 2e-4, batch 8, no accumulation, LoRA r8/alpha16 on the LM's
    # attention projections, projector frozen
    "cpu": {"learning_rate": 2e-4, "lr_schedule": "constant", "warmup_ratio": 0.0, "effective_batch_size": None,
            "train_projector": False, "lora": {"r": 8, "alpha": 16, "target_modules": LM_ATTENTION_MODULES}},
    # RUCAIBox/TIVE finetune_lora.sh (LLaVA-1.5 LoRA): lr 2e-5, cosine with 3% warm-up, effective batch 128
    # (gradient accumulation over warmup_batch_size x workers), LoRA r128/alpha256 on every linear layer of the
    # LM, the multimodal projector trained
    "reference": {"learning_rate": 2e-5, "lr_schedule": "cosine", "warmup_ratio": 0.03, "effective_batch_size": 128,
                  "train_projector": True, "lora": {"r": 128, "alpha": 256, "target_modules": LM_LINEAR_MODULES}},
}


class LoraConfig(_Section):
    """LoRA adapter of the TIVE warm-up; fields left unset take the warm-up preset's values
    (:data:`WARMUP_PRESETS`: ``cpu`` r8/alpha16 on attention, ``reference`` r128/alpha256 on all LM linears)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str = LM_ATTENTION_MODULES


class TiveConfig(_Section):
    """TIVE (Liu et al., 2024) warm-up, gradients and selection. Defaults follow RUCAIBox/TIVE.

    ``warmup_preset`` picks the warm-up recipe (:data:`WARMUP_PRESETS`): ``reference`` is TIVE's (lr 2e-5,
    cosine with 3% warm-up, effective batch 128 by gradient accumulation, LoRA r128/alpha256 on all linear
    layers of the LM, projector trained); ``cpu`` is this project's CPU recipe (constant lr 2e-4, no
    accumulation, LoRA r8/alpha16 on the LM's attention projections, projector frozen); ``auto`` (default):
    ``reference`` for real checkpoints, ``cpu`` for ``tiny``. Recipe fields (``learning_rate``, ``lr_schedule``,
    ``warmup_ratio``, ``effective_batch_size``, ``train_projector``, ``lora.*``) set to a value other than their
    default override the preset; :meth:`resolved` gives the values the warm-up uses.
    """

    enabled: bool = True
    warmup_fraction: float = Field(0.08, gt=0, le=1)
    warmup_preset: Literal["auto", "reference", "cpu"] = "auto"
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of optimizer steps of linear lr warm-up.")
    effective_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step, reached by gradient accumulation over "
        "warmup_batch_size x num_workers; null: one batch per step.")
    train_projector: bool = Field(False, description="Train the multimodal projector with the LoRA adapter.")
    epochs: int = Field(1, ge=1)
    warmup_batch_size: int = Field(8, ge=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    proj_dim: int | None = Field(None, ge=1, description="Default: 8192 on GPU, 512 on CPU.")
    projection: Literal["rademacher", "sparse"] = "rademacher"
    gradient_type: Literal["sgd", "adam"] = "sgd"
    per_sample: Literal["auto", "vmap", "loop"] = "auto"
    task_value: Literal["norm", "sq_norm"] = "norm"
    overflow: Literal["cap", "oversample"] = "cap"
    temperature: float = Field(1000.0, gt=0, description="lambda of softmax(I / lambda); reference 1000.")
    sampling: Literal["softmax", "topk"] = "softmax"

    def preset_name(self, model: ModelConfig) -> str:
        """The concrete preset: ``warmup_preset``, or for ``auto`` ``reference`` / ``cpu`` by the model."""
        if self.warmup_preset != "auto":
            return self.warmup_preset
        return "reference" if model.is_reference_checkpoint else "cpu"

    def resolved(self, model: ModelConfig) -> "TiveConfig":
        """A copy with the preset's values in every recipe field left at its default value, and the concrete
        preset (so a config file that spells out the defaults, as ``example_run.yaml``, still gets the preset)."""
        preset = WARMUP_PRESETS[self.preset_name(model)]
        update = {k: v for k, v in preset.items()
                  if k != "lora" and getattr(self, k) == type(self).model_fields[k].default}
        lora = {k: v for k, v in preset["lora"].items()
                if getattr(self.lora, k) == type(self.lora).model_fields[k].default}
        update["lora"] = self.lora.model_copy(update=lora)
        update["warmup_preset"] = self.preset_name(model)
        return self.model_copy(update=update)

    def accumulation_steps(self) -> int:
        """Batches per optimizer step: ``ceil(effective_batch_size / (warmup_batch_size * num_workers))``, 1 when
        ``effective_batch_size`` is null."""
        if self.effective_batch_size is None:
            return 1
        return max(1, -(-self.effective_batch_size // (self.warmup_batch_size * self.num_workers)))


class SelectConfig(_Section):
    methods: list[str] = Field(default_factory=lambda: ["coincide", "datatailor", "random"])
    budget: float = Field(0.2, gt=0, description="Fraction of the pool (< 1) or a row count (>= 1).")
    dedup: bool = Field(
        False, description="Fit and select among the rows the dedup phase kept (dedup/kept/); the budget stays a "
        "share of the whole pool. Needs the dedup phase (run before aggregate).")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        return _check_choices(value, method_names(), "method")  # the live registry: registered methods too

    def budget_rows(self, pool_rows: int) -> int:
        """Return the budget as a row count for a pool of ``pool_rows`` rows (fraction < 1, else a count)."""
        from datasel_ray.methods.budget import resolve_budget

        return resolve_budget(self.budget, pool_rows)


class DedupConfig(_Section):
    """Near-duplicate removal (the ``dedup`` phase, :mod:`datasel_ray.pipeline.dedup`): an exact pass (image bytes
    + normalised turns) and a semantic pass with NeMo Curator's SemDeDup rule. ``eps``, ``ranking`` and
    ``num_clusters`` default to NeMo Curator's ``SemanticDeduplicationWorkflow`` (eps 0.01, which_to_keep "hard",
    n_clusters 100)."""

    exact: bool = Field(True, description="Drop rows whose image bytes and normalised turns equal an earlier row's.")
    semantic: bool = Field(True, description="Drop rows within cosine 1 - eps of an earlier-ranked row of their "
                           "k-means cluster (SemDeDup).")
    feature: Literal["coincide_vector", "coincide_visual", "last_token"] = Field(
        "coincide_visual", description="Vectors the semantic pass clusters and compares: a feature column, or "
        "coincide_visual (the image halves of coincide_vector; text-only rows are left to the exact pass). "
        "Default: the best pair F1 on the measured pool with the real model (README table).")
    eps: float = Field(0.01, gt=0, lt=1, description="A row is a near duplicate at cosine >= 1 - eps (NeMo: 0.01).")
    ranking: Literal["hard", "easy", "pool_order"] = Field(
        "hard", description="Which member of a group is kept: hard (NeMo default): farthest from the centroid; "
        "easy: closest; pool_order: lowest row id.")
    num_clusters: int = Field(
        100, ge=1, description="k-means clusters (NeMo: 100); used: min(num_clusters, max(1, N // 40)).")
    niter: int = Field(100, ge=1, description="k-means iterations (NeMo SemDedupConfig max_iter: 100).")
    train_sample: int | None = Field(
        16384, ge=1, description="Train k-means on at most this many seeded rows (about 160 per centroid at 100 "
        "clusters), then assign all; bounds the driver at train_sample x d floats (NeMo fits on every row); "
        "null: all.")
    seed: int | None = Field(None, description="k-means seed; default: derived from the run seed.")
    workspace_bytes: int = Field(
        64 << 20, ge=1 << 12, description="Bound on one cluster's pairwise-similarity block (cluster rows x "
        "block columns x 4 bytes).")


class AggregateConfig(_Section):
    """How aggregate and select run over the feature store. None of these change a result: partitioned and
    in-process runs of the same config and seed give identical statistics and selections."""

    executor: Literal["auto", "local", "ray"] = Field(
        "auto", description="ray: partition tasks on the cluster; local: in this process; auto: ray when the "
        "store is larger than one partition.")
    partition_bytes: int = Field(
        256 << 20, ge=1 << 16, description="Bound on the feature bytes one partition or bucket task holds.")
    driver_bytes: int = Field(
        4 << 30, ge=1 << 20, description="Bound on the vectors the driver may gather (COINCIDE's k-means "
        "training rows, DataTailor's pre-cluster training rows); above it the run is refused with the fix.")
    num_cpus_per_task: float = Field(1.0, gt=0)


class FailureConfig(_Section):
    """When a phase stops instead of going on: a failure budget on quarantined rows (as Ray Data's
    ``max_errored_blocks`` or Spark's task failure limits) and a stall timeout. A row's own fault (undecodable
    image, too long) quarantines it; an error that is not the row's fault (storage, packages, memory) stops the
    phase at once, whatever the budget."""

    max_quarantine_fraction: float = Field(
        0.05, ge=0, le=1, description="A phase that quarantines more than this share of the rows it has seen "
        "stops with the top reasons (ingest's duplicate_id and unsupported_video rows do not count: they are the pool's "
        "bookkeeping and a known gap, not failures).")
    min_rows: int = Field(
        500, ge=1, description="The budget is checked once a phase has seen this many rows (a few early bad rows "
        "do not stop it); smaller phases are never stopped by it.")
    stall_warning_s: float = Field(
        60.0, gt=0, description="Seconds without progress after which the progress line and `datasel status` "
        "say why: pending resource requests, free resources, nodes alive and lost.")
    stall_timeout_s: float | None = Field(
        900.0, gt=0, description="Seconds without progress, with work waiting for resources that no autoscaler "
        "can add, after which the phase stops with the stall message; null: wait forever.")

    @model_validator(mode="after")
    def _check_stall_times(self) -> "FailureConfig":
        if self.stall_timeout_s is not None and self.stall_timeout_s < self.stall_warning_s:
            raise ValueError(f"stall_timeout_s ({self.stall_timeout_s}) must be >= stall_warning_s "
                             f"({self.stall_warning_s})")
        return self


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray address; default: RAY_ADDRESS or a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray started by the CLI.")


class RunConfig(_Section):
    """A whole run: ``datasel run --config cfg.yaml``."""

    run_dir: str = "runs/demo"
    seed: int = 0
    phases: list[str] = Field(default_factory=lambda: list(PHASES),
                              description="Phases to run; warmup is skipped while tive.enabled is false.")
    pool: PoolConfig = PoolConfig()
    storage: StorageConfig = StorageConfig()
    model: ModelConfig = ModelConfig()
    extract: ExtractConfig = ExtractConfig()
    coincide: CoincideConfig = CoincideConfig()
    datatailor: DataTailorConfig = DataTailorConfig()
    tive: TiveConfig = TiveConfig(enabled=False)
    select: SelectConfig = SelectConfig()
    aggregate: AggregateConfig = AggregateConfig()
    dedup: DedupConfig = DedupConfig()
    ray: RayConfig = RayConfig()
    failures: FailureConfig = FailureConfig()

    @field_validator("phases")
    @classmethod
    def _known_phases(cls, value: list[str]) -> list[str]:
        return _check_choices(value, PHASES, "phase")


class ConfigError(ValueError):
    """A configuration problem, with a message that names the field."""


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"Invalid {source}:"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {field}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Read a YAML file (optional) and apply ``overrides`` (a nested dict); raise ConfigError on bad input."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = merge_dicts(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path) if path else "config")) from None


def merge_dicts(base: dict, extra: dict) -> dict:
    """Return ``base`` updated recursively with ``extra`` (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out
