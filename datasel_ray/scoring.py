"""Scoring of new samples against the frozen statistics of a finished run (DESIGN.md, ``serve``).

One :class:`Scorer` serves both paths: :func:`score_pool_samples` (batch, in-process) and the Ray Serve app in
``serve/app.py`` (which only parses HTTP and forwards to the same methods). A scorer loads once:

* the reference model (and the TIVE LoRA adapter when the run used TIVE) through the extraction stages
  :class:`~datasel_ray.features.extractor.Preprocessor` / :class:`~datasel_ray.features.extractor.FeatureExtractor`,
  so a new sample's features are computed exactly as the extract phase computes them;
* ``stats/`` (clusters, centroids, faiss index, task tables) and the fitted thresholds of each
  ``selections/<method>/summary.json``.

Per sample it returns the task (given, or inferred with the pool's task rules) and, per method that the run
selected with:

* **COINCIDE** — nearest centroid by cosine (faiss), the cluster's transferability S, density D and selection
  probability P (Eq. 5-6), the L2 distance between the sample's unit vector and the unit centroid
  (``sqrt(2 - 2 cos)``), and ``would_select``. Rule (COINCIDE picks prototypes by greedy MMD, which a single
  new sample cannot be run through without the cluster's member vectors): the sample would be selected when
  its cluster received a quota (``q_c = round(selected_fraction_c · |C|) > 0``) and fewer than ``q_c`` pool
  members of the cluster are closer to the centroid than the sample (``centrality_rank < q_c``). It is an
  approximation of the greedy MMD order (the first MMD prototypes are the most central members);
  ``cluster_selected_fraction`` is returned as the cluster's selection rate.
* **DataTailor** — informativeness I (Eq. 2); uniqueness U (Eq. 3) and representativeness R (Eq. 5) against
  the nearest Ward-cluster mean of the sample's task; within-task percentile ranks of I, U, R against the pool's
  values, the combined ``score = (r·rk(I) + rk(U) + rk(R)) / (r + 2)`` (Eq. 6, code form, r = max(1, turns)),
  its percentile within the task, and ``would_select = score >= task_score_threshold`` (the lowest selected
  score of the task in the run).
* **TIVE** — instance value ``I = ĝ · mean_{j∈t} ĝ_j`` against the stored task-mean gradient (Eq. 3), the task
  value v_t (Eq. 4), ``would_select = I >= task_score_threshold`` and the task's selection rate
  ``task_selected_fraction`` (with the reference softmax at λ = 1000 the within-task draw is near uniform, so
  the rate is the better guide there).

Input problems raise :class:`SampleError` with the field, a reason code from :class:`datasel_ray.schema.Reason`
(or ``too_many_samples`` / ``image_too_large`` / ``unknown_task``) and an HTTP status; validation reuses the
ingest :class:`~datasel_ray.io.validation.RecordValidator`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datasel_ray import schema
from datasel_ray.config import ModelConfig, RunConfig
from datasel_ray.io.pool import RawRecord
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.tasks import TaskResolver
from datasel_ray.io.validation import (
    ASSISTANT_ROLES,
    HUMAN_ROLES,
    Limits,
    RecordValidator,
    normalize_placeholders,
)
from datasel_ray.schema import Reason

__all__ = [
    "SCORED_METHODS",
    "RunStats",
    "SampleError",
    "Scorer",
    "ScoringLimits",
    "ValidatedSample",
    "score_pool_samples",
]

SCORED_METHODS = ("coincide", "datatailor", "tive")
TOO_MANY_SAMPLES = "too_many_samples"
IMAGE_TOO_LARGE = "image_too_large"


# ---------------------------------------------------------------------------------------------- input errors
class SampleError(ValueError):
    """A request or sample the scorer refuses. ``field`` is a dotted path such as ``samples[2].image``."""

    def __init__(self, field_name: str, reason: str, message: str, status: int = 422):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.reason = reason
        self.status = status

    def to_dict(self) -> dict:
        """JSON body of the error response."""
        return {"status": self.status, "field": self.field, "reason": self.reason, "message": str(self)}

    def within(self, prefix: str) -> SampleError:
        """The same error with ``prefix`` prepended to its field (``samples[3]`` + ``image``)."""
        joined = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        message = str(self).split(": ", 1)[1] if self.field else str(self)
        return SampleError(joined, self.reason, message, self.status)


@dataclass
class ScoringLimits:
    """Request limits. Images are checked in bytes (encoded) and in pixels (before decoding the raster)."""

    max_samples: int = 64
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096


@dataclass
class ValidatedSample:
    """One accepted sample, tokenised and ready for the model pass.

    ``image_ref``: the resolved image path, ``"base64"``, or ``""`` (text-only); ``prepared``: the
    :class:`~datasel_ray.models.vlm.PreparedSample` from the model's processor.
    """

    index: int
    sample_id: str
    task: str
    task_source: str
    n_turns: int
    conversations: list[dict]
    image_ref: str
    prepared: Any = None


# ---------------------------------------------------------------------------------------------- frozen stats
def _column(table, name: str) -> np.ndarray:
    from datasel_ray.pipeline.feature_store import column_to_numpy

    return column_to_numpy(table.column(name))


def _unit(x: np.ndarray) -> np.ndarray:
    """float64 copy with unit-L2 rows; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _percentile(sorted_pool: np.ndarray, value: float) -> float:
    """Percentile rank of ``value`` among a task's pool values, in [0, 1]: the share of pool values below it.

    Equals :func:`datasel_ray.methods.datatailor.percentile_rank` of a pool member scored against its own task
    (when its value is not tied with another member's)."""
    n = len(sorted_pool)
    return float(np.searchsorted(sorted_pool, value, side="left") / n) if n else 0.0


@dataclass
class CoincideStats:
    """COINCIDE clusters of the run: faiss index over unit centroids, S/D/P per cluster, selected fractions,
    and per cluster the sorted cosines of its pool members to the centroid (for the centrality rank)."""

    index: Any
    unit_centroids: np.ndarray  # float64 [K, F]
    transferability: np.ndarray
    density: np.ndarray
    probability: np.ndarray
    size: np.ndarray  # int64 [K]
    selected_fraction: np.ndarray  # float64 [K]
    member_cosines: list[np.ndarray]  # per cluster, float64 ascending

    @classmethod
    def load(cls, run_dir: RunDir, summary: dict) -> CoincideStats:
        import faiss

        from datasel_ray.pipeline.feature_store import load_features

        stats = run_dir / "stats"
        clusters = (stats / "coincide_clusters.parquet").read_parquet()
        index = faiss.deserialize_index(np.frombuffer((stats / "coincide_centroids.faiss").read_bytes(),
                                                      dtype=np.uint8))
        unit_centroids = _unit((stats / "coincide_centroids.npy").read_npy())
        k = unit_centroids.shape[0]
        assignments = (stats / "coincide_assignments.parquet").read_parquet()
        cluster_of = dict(zip(_column(assignments, schema.ROW_ID).tolist(), _column(assignments, "cluster").tolist()))
        feats = load_features(run_dir, [schema.COINCIDE_VECTOR])
        labels = np.array([cluster_of[r] for r in feats[schema.ROW_ID].tolist()], dtype=np.int64)
        cosines = np.einsum("nf,nf->n", _unit(feats[schema.COINCIDE_VECTOR].astype(np.float32)),
                            unit_centroids[labels])
        members = [np.sort(-cosines[labels == c]) for c in range(k)]  # ascending by "distance" (-cos)
        return cls(index=index, unit_centroids=unit_centroids,
                   transferability=_column(clusters, "transferability").astype(np.float64),
                   density=_column(clusters, "density").astype(np.float64),
                   probability=_column(clusters, "probability").astype(np.float64),
                   size=_column(clusters, "size").astype(np.int64),
                   selected_fraction=np.asarray(summary["cluster_selected_fraction"], dtype=np.float64),
                   member_cosines=members)

    def score(self, vectors: np.ndarray) -> list[dict]:
        """COINCIDE fields for float[B, F] coincide vectors (as stored: fp16)."""
        unit = _unit(np.asarray(vectors, dtype=np.float32))
        _, nearest = self.index.search(np.ascontiguousarray(unit, dtype=np.float32), 1)
        out = []
        for u, c in zip(unit, nearest[:, 0].tolist()):
            cos = float(u @ self.unit_centroids[c])
            quota = int(round(self.selected_fraction[c] * self.size[c]))
            rank = int(np.searchsorted(self.member_cosines[c], -cos, side="left"))
            out.append({
                "cluster": int(c),
                "transferability": float(self.transferability[c]),
                "density": float(self.density[c]),
                "probability": float(self.probability[c]),
                "distance": float(np.sqrt(max(0.0, 2.0 - 2.0 * cos))),
                "cluster_size": int(self.size[c]),
                "cluster_selected_fraction": float(self.selected_fraction[c]),
                "centrality_rank": rank,
                "would_select": bool(quota > 0 and rank < quota),
            })
        return out


def uniqueness_against_cluster(x: np.ndarray, members: np.ndarray, member_informativeness: np.ndarray,
                               pair_distance_sum: float, mode: str = "reference") -> float:
    """DataTailor uniqueness U (Eq. 3) of a new point ``x`` (float[d]) against the members of cluster C.

    ``mode="reference"`` (code): ``U = Σ_{j∈C} d(x, h_j) V_j / ((1/|C|) Σ_{j,k∈C} d_jk)`` with
    ``pair_distance_sum = Σ_{j,k∈C} d_jk`` (ordered pairs). ``mode="paper"``: ``U = Σ_{j∈C} d(x, h_j) V_j /
    Σ_{k∈C} V_k``. A zero denominator gives 0, as in :func:`datasel_ray.methods.datatailor.uniqueness`; for a
    member ``x = h_i`` both forms equal that function's value (d_ii = 0).
    """
    d = np.linalg.norm(np.asarray(members, dtype=np.float64) - np.asarray(x, dtype=np.float64), axis=1)
    v = np.asarray(member_informativeness, dtype=np.float64)
    num = float(d @ v)
    if mode == "reference":
        avg = pair_distance_sum / len(v) if len(v) else 0.0
        return num / avg if avg > 0 else 0.0
    if mode != "paper":
        raise ValueError(f"uniqueness mode must be 'reference' or 'paper', got {mode!r}")
    vs = float(v.sum())
    return num / vs if vs > 0 else 0.0


def _pair_distance_sum(h: np.ndarray, block: int = 1024) -> float:
    """Σ_{j,k} ||h_j − h_k|| over ordered pairs, in row blocks (never |C| x |C| at once for large clusters)."""
    from scipy.spatial.distance import cdist

    total = 0.0
    for s in range(0, len(h), block):
        total += float(cdist(h[s:s + block], h).sum())
    return total


@dataclass
class DataTailorStats:
    """DataTailor clusters of the run and the pool's per-task score distributions."""

    means: np.ndarray  # float64 [K, d]
    cluster_task: np.ndarray  # object [K]
    association: np.ndarray  # float64 [K]
    members: list[np.ndarray]  # per cluster float64 [|C|, d] last-token states
    member_informativeness: list[np.ndarray]
    pair_sums: np.ndarray  # float64 [K]
    pool: dict[str, dict[str, np.ndarray]]  # task -> component -> sorted pool values
    thresholds: dict[str, float | None]
    uniqueness_mode: str
    representativeness_mode: str

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict) -> DataTailorStats:
        from datasel_ray.pipeline.feature_store import load_features

        stats = run_dir / "stats"
        clusters = (stats / "datatailor_clusters.parquet").read_parquet()
        k = clusters.num_rows
        assignments = (stats / "datatailor_assignments.parquet").read_parquet()
        cluster_of = dict(zip(_column(assignments, schema.ROW_ID).tolist(), _column(assignments, "cluster").tolist()))
        feats = load_features(run_dir, [schema.LAST_TOKEN, schema.INFORMATIVENESS])
        labels = np.array([cluster_of[r] for r in feats[schema.ROW_ID].tolist()], dtype=np.int64)
        h = feats[schema.LAST_TOKEN].astype(np.float64)
        v = feats[schema.INFORMATIVENESS].astype(np.float64)
        members = [h[labels == c] for c in range(k)]
        scores = (run_dir / "selections" / "datatailor" / "scores.parquet").read_parquet()
        tasks = _column(scores, schema.TASK).astype(str)
        pool = {}
        for task in np.unique(tasks):
            rows = tasks == task
            pool[str(task)] = {name: np.sort(_column(scores, name)[rows].astype(np.float64))
                               for name in ("informativeness", "uniqueness", "representativeness", "score")}
        return cls(means=(stats / "datatailor_means.npy").read_npy().astype(np.float64),
                   cluster_task=_column(clusters, schema.TASK).astype(str),
                   association=_column(clusters, "association").astype(np.float64),
                   members=members, member_informativeness=[v[labels == c] for c in range(k)],
                   pair_sums=np.array([_pair_distance_sum(m) for m in members]), pool=pool,
                   thresholds=dict(summary.get("task_score_threshold", {})),
                   uniqueness_mode=cfg.datatailor.uniqueness, representativeness_mode=cfg.datatailor.representativeness)

    def nearest_cluster(self, h: np.ndarray, task: str) -> tuple[int, float]:
        """The Ward cluster of ``task`` whose mean is nearest to ``h`` (Euclidean) and that distance."""
        candidates = np.flatnonzero(self.cluster_task == task)
        d = np.linalg.norm(self.means[candidates] - h, axis=1)
        best = int(np.argmin(d))
        return int(candidates[best]), float(d[best])

    def score_one(self, h: np.ndarray, informativeness: float, n_turns: int, task: str) -> dict:
        """DataTailor fields of one sample (``h``: last-token state as stored, fp16)."""
        h = np.asarray(h, dtype=np.float64)
        c, dist = self.nearest_cluster(h, task)
        v_c = self.member_informativeness[c]
        U = uniqueness_against_cluster(h, self.members[c], v_c, float(self.pair_sums[c]), self.uniqueness_mode)
        R = float(self.association[c]) * informativeness  # Eq. 5, reference R = A_c · V_inf
        if self.representativeness_mode == "paper":
            total = float(v_c.sum())
            R = R / total if total > 0 else 0.0
        pool = self.pool[task]
        ranks = {"informativeness": _percentile(pool["informativeness"], informativeness),
                 "uniqueness": _percentile(pool["uniqueness"], U),
                 "representativeness": _percentile(pool["representativeness"], R)}
        r = max(1.0, float(n_turns))
        score = (r * ranks["informativeness"] + ranks["uniqueness"] + ranks["representativeness"]) / (r + 2.0)
        threshold = self.thresholds.get(task)
        return {
            "cluster": c, "distance": dist, "informativeness": float(informativeness), "uniqueness": U,
            "representativeness": R, **{f"rank_{k}": val for k, val in ranks.items()}, "score": float(score),
            "score_percentile": _percentile(pool["score"], score), "threshold": threshold,
            "would_select": bool(threshold is not None and score >= threshold),
        }


@dataclass
class TiveStats:
    """TIVE task table (task value v_t, task-mean normalised gradient) and the run's fitted thresholds."""

    task_index: dict[str, int]
    task_value: np.ndarray  # float64 [T]
    mean_grad: np.ndarray  # float64 [T, k]
    thresholds: dict[str, float | None]
    selected_fraction: dict[str, float]

    @classmethod
    def load(cls, run_dir: RunDir, summary: dict) -> TiveStats:
        stats = run_dir / "stats"
        table = (stats / "tive_tasks.parquet").read_parquet()
        names = _column(table, schema.TASK).astype(str).tolist()
        return cls(task_index={t: i for i, t in enumerate(names)},
                   task_value=_column(table, "task_value").astype(np.float64),
                   mean_grad=(stats / "tive_task_mean_grad.npy").read_npy().astype(np.float64),
                   thresholds=dict(summary.get("task_score_threshold", {})),
                   selected_fraction=dict(summary.get("task_selected_fraction", {})))

    def score_one(self, grad_proj: np.ndarray, task: str) -> dict:
        """TIVE fields of one sample: ``I = ĝ · mean_{j∈t} ĝ_j`` (the O(N) form of
        :func:`datasel_ray.methods.tive.instance_values`) and v_t."""
        t = self.task_index[task]
        value = float(_unit(grad_proj) @ self.mean_grad[t])
        threshold = self.thresholds.get(task)
        return {"instance_value": value, "task_value": float(self.task_value[t]), "threshold": threshold,
                "task_selected_fraction": self.selected_fraction.get(task),
                "would_select": bool(threshold is not None and value >= threshold)}


@dataclass
class RunStats:
    """Everything a scorer needs from ``stats/`` and ``selections/`` of one run (no model)."""

    run_id: str
    config: RunConfig
    manifest: dict
    tasks: list[str]
    coincide: CoincideStats | None = None
    datatailor: DataTailorStats | None = None
    tive: TiveStats | None = None
    budgets: dict[str, int] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [m for m in SCORED_METHODS if getattr(self, m) is not None]

    @classmethod
    def load(cls, run_dir: RunDir) -> RunStats:
        manifest = run_dir.load_manifest()
        if not manifest or "config" not in manifest:
            raise FileNotFoundError(f"{run_dir}: no manifest.json with a config (not a run directory)")
        cfg = RunConfig.model_validate(manifest["config"])
        stats = run_dir / "stats"
        if not (stats / "meta.json").exists():
            raise FileNotFoundError(f"{stats}/meta.json is missing: run the aggregate phase first")
        tasks = sorted(_column((stats / "tasks.parquet").read_parquet(), schema.TASK).astype(str).tolist())
        out = cls(run_id=str(manifest.get("run_id", "")), config=cfg, manifest=manifest, tasks=tasks)
        for method in SCORED_METHODS:
            summary_loc = run_dir / "selections" / method / "summary.json"
            if not summary_loc.exists():
                continue
            summary = summary_loc.read_json()
            out.budgets[method] = int(summary.get("budget_rows", 0))
            if method == "coincide":
                out.coincide = CoincideStats.load(run_dir, summary)
            elif method == "datatailor":
                out.datatailor = DataTailorStats.load(run_dir, cfg, summary)
            elif (stats / "tive_tasks.parquet").exists() and cfg.tive.enabled:
                out.tive = TiveStats.load(run_dir, summary)
        return out


# ---------------------------------------------------------------------------------------------- validation
class SampleParser:
    """Turns request JSON into :class:`ValidatedSample` objects, or raises :class:`SampleError`.

    Image paths are accepted only under ``image_roots`` (each root gets an ingest
    :class:`~datasel_ray.io.validation.RecordValidator`; a relative path resolves under the first root that
    holds the file). ``image_base64`` images are decoded in memory and need an explicit ``task`` (they carry
    no path for the task rules).
    """

    def __init__(self, cfg: RunConfig, tasks: list[str], image_roots: list[str], limits: ScoringLimits):
        pool = cfg.pool
        self.resolver = TaskResolver(pool.task_map, pool.default_task, pool.task_field)
        record_limits = Limits(pool.max_turns, pool.max_chars, check_images=False)
        self.validators = [RecordValidator(root, self.resolver, record_limits) for root in image_roots]
        self.text_validator = RecordValidator(image_roots[0] if image_roots else "/", self.resolver, record_limits)
        self.image_roots = image_roots
        self.tasks = tasks
        self.limits = limits
        self.image_size = cfg.model.image_size

    def parse_payload(self, payload: Any) -> tuple[list[tuple[dict, str]], bool]:
        """Split a request body into ``[(sample_dict, field_prefix)]``; the flag is True for a ``samples`` list."""
        if not isinstance(payload, dict):
            raise SampleError("body", Reason.WRONG_TYPE,
                              f"expected a JSON object (one sample, or {{\"samples\": [...]}}), got "
                              f"{type(payload).__name__}")
        if "samples" not in payload:
            return [(payload, "")], False
        samples = payload["samples"]
        if not isinstance(samples, list):
            raise SampleError("samples", Reason.WRONG_TYPE, f"expected a list of samples, got {type(samples).__name__}")
        if not samples:
            raise SampleError("samples", Reason.MISSING_FIELD, "empty list: send at least one sample")
        if len(samples) > self.limits.max_samples:
            raise SampleError("samples", TOO_MANY_SAMPLES, f"{len(samples)} samples in one request, more than "
                              f"the limit of {self.limits.max_samples}", status=413)
        return [(s, f"samples[{i}]") for i, s in enumerate(samples)], True

    def validate(self, value: Any, index: int) -> tuple[ValidatedSample, Any]:
        """Validate one sample object; returns it with its decoded image (PIL, or None when text-only).

        Fields in errors are relative to the sample; the caller adds the ``samples[i]`` prefix."""
        if not isinstance(value, dict):
            raise SampleError("", Reason.WRONG_TYPE, f"expected a sample object, got {type(value).__name__}")
        self._check_optional_types(value)
        b64 = value.get("image_base64")
        if b64 is not None and value.get("image") is not None:
            raise SampleError("image_base64", Reason.WRONG_TYPE, "give either 'image' (a path) or 'image_base64', not both")
        if b64 is not None:
            return self._validate_base64(value, index, b64)
        row = self._validate_record(value, index)
        image_ref = row[schema.IMAGE_PATH]
        image = self._read_path_image(image_ref) if image_ref else None
        return self._accepted(value, index, row, image_ref, image)

    def _check_optional_types(self, value: dict) -> None:
        for name in ("task", "image", "image_base64"):
            if value.get(name) is not None and not isinstance(value[name], str):
                raise SampleError(name, Reason.WRONG_TYPE, f"expected a string, got {type(value[name]).__name__}")

    def _validate_record(self, value: dict, index: int, validators=None) -> dict:
        raw = RawRecord(record_index=index, text=json.dumps(value, default=str)[:2000], value=value)
        rejections = []
        for validator in validators or (self.validators if value.get("image") else [self.text_validator]):
            row, bad = validator.validate(raw, index, "request")
            if row is not None:
                return row
            rejections.append(bad)
        # a path outside every root is an escape only when no root accepted it; else report the nearer problem
        bad = next((r for r in rejections if r[schema.REASON] != Reason.IMAGE_PATH_ESCAPE), rejections[0])
        field_name, _, message = bad[schema.MESSAGE].partition(": ")  # ingest messages are "field: text"
        field_name = re.sub(r"\.(\d+)", r"[\1]", field_name)  # pydantic paths: conversations.0.value
        if field_name == "image" and bad[schema.REASON] == Reason.IMAGE_PATH_ESCAPE:
            message = f"path '{value.get('image')}' is outside the configured image roots"
        return self._raise(field_name, bad[schema.REASON], message)

    @staticmethod
    def _raise(field_name: str, reason: str, message: str):
        """A path outside the image roots is refused (403); every other record problem is unprocessable (422)."""
        raise SampleError(field_name, reason, message, status=403 if reason == Reason.IMAGE_PATH_ESCAPE else 422)

    def _validate_base64(self, value: dict, index: int, b64: str) -> tuple[ValidatedSample, Any]:
        if not (isinstance(value.get("task"), str) and value["task"].strip()):
            raise SampleError("task", Reason.MISSING_FIELD, "required with image_base64 (a base64 image has no "
                              "path for the task rules)")
        text_only = {k: v for k, v in value.items() if k not in ("image", "image_base64")}
        row = self._validate_record(text_only, index, [self.text_validator])
        max_chars = 4 * (self.limits.max_image_bytes // 3 + 1)
        if len(b64) > max_chars:
            raise SampleError("image_base64", IMAGE_TOO_LARGE, f"{len(b64)} base64 characters, more than the limit "
                              f"of {self.limits.max_image_bytes} bytes", status=413)
        try:
            data = base64.b64decode(b64.split(",", 1)[1] if b64.startswith("data:") else b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise SampleError("image_base64", Reason.IMAGE_CORRUPT, f"not valid base64: {err}") from None
        image = self._decode_image(data, "image_base64")
        return self._accepted(value, index, row, "base64", image)

    def _read_path_image(self, path: str):
        from datasel_ray.io.storage import Location

        loc = Location.parse(path)
        if loc.size() > self.limits.max_image_bytes:
            raise SampleError("image", IMAGE_TOO_LARGE, f"{loc.size()} bytes, more than the limit of "
                              f"{self.limits.max_image_bytes}", status=413)
        return self._decode_image(loc.read_bytes(), "image")

    def _decode_image(self, data: bytes, field_name: str):
        """Decode to RGB, resized like :func:`datasel_ray.features.extractor.load_image`; size checked first."""
        from PIL import Image

        if len(data) > self.limits.max_image_bytes:
            raise SampleError(field_name, IMAGE_TOO_LARGE, f"{len(data)} bytes, more than the limit of "
                              f"{self.limits.max_image_bytes}", status=413)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
        except Exception as err:  # PIL raises many types for undecodable data
            raise SampleError(field_name, Reason.IMAGE_CORRUPT, f"cannot decode image: {err}") from None
        if width * height > self.limits.max_image_pixels:
            raise SampleError(field_name, IMAGE_TOO_LARGE, f"{width}x{height} pixels, more than the limit of "
                              f"{self.limits.max_image_pixels}", status=413)
        try:
            image.load()
            image = image.convert("RGB")
        except Exception as err:  # truncated files fail here, not at open
            raise SampleError(field_name, Reason.IMAGE_CORRUPT, f"cannot decode image: {err}") from None
        if self.image_size is not None:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return image

    def _accepted(self, value: dict, index: int, row: dict, image_ref: str, image) -> tuple[ValidatedSample, Any]:
        task = row[schema.TASK]
        explicit = value.get(self.resolver.task_field)
        given = isinstance(explicit, str) and bool(explicit.strip())
        if task not in self.tasks:
            how = "is" if given else f"was inferred from image '{value.get('image') or ''}' as"
            raise SampleError(self.resolver.task_field, Reason.UNKNOWN_TASK,
                              f"the task {how} '{task}', which is not a task of this run; known tasks: "
                              f"{', '.join(self.tasks)}")
        conversations = json.loads(row[schema.CONVERSATIONS])
        if image_ref == "base64":  # validated as text-only above; the image placeholder goes back in
            conversations = normalize_placeholders(
                [{"from": _canonical(t["from"].lower()), "value": t["value"]} for t in value["conversations"]],
                has_image=True)
        sample = ValidatedSample(index=index, sample_id="" if value.get("id") is None else str(value["id"]),
                                 task=task, task_source="given" if given else "inferred",
                                 n_turns=int(row[schema.N_TURNS]), conversations=conversations, image_ref=image_ref)
        return sample, image


def _canonical(role: str) -> str:
    return "gpt" if role in ASSISTANT_ROLES else "human" if role in HUMAN_ROLES else "system"


# ---------------------------------------------------------------------------------------------- the scorer
class Scorer:
    """Reference model + frozen run statistics → per-sample scores (thread-safe for concurrent calls).

    Args:
        run_dir: a run directory with ``stats/`` and ``selections/`` (local path or filesystem URI).
        image_roots: folders that image paths may resolve under; default: the pool's image root.
        limits: :class:`ScoringLimits`.
        device: torch device for the model (default: cuda when available).
        reuse: a previous scorer whose loaded model is reused when the model (and adapter) are the same.
    """

    def __init__(self, run_dir: str, image_roots: list[str] | None = None, limits: ScoringLimits | None = None,
                 device=None, reuse: Scorer | None = None):
        from datasel_ray.pipeline.ingest import resolve_image_root

        self.run_dir = str(run_dir)
        self.stats = RunStats.load(RunDir(self.run_dir))
        cfg = self.stats.config
        self.limits = limits or ScoringLimits()
        self.image_roots = [str(r) for r in (image_roots or [resolve_image_root(cfg.pool)])]
        self.parser = SampleParser(cfg, self.stats.tasks, self.image_roots, self.limits)
        self.model_cfg: ModelConfig = cfg.model
        self.lora_dir = self._lora_dir()
        if reuse is not None and reuse.model_cfg == self.model_cfg and reuse.lora_dir == self.lora_dir:
            self.preprocessor, self.extractor, self.gradients = reuse.preprocessor, reuse.extractor, reuse.gradients
            self._model_lock = reuse._model_lock
        else:
            self._load_model(device)
        self._check_projector()

    def _check_projector(self) -> None:
        """TIVE instance values compare this scorer's projected gradients with the run's: the projection must be
        the one extraction used (CPU and CUDA generators give different matrices and default dimensions)."""
        if self.gradients is None:
            return
        recorded = self.stats.manifest.get("phases", {}).get("extract", {}).get("result", {}).get("projector")
        if recorded is None:
            return  # a run extracted before projections were recorded
        self.gradients.setup()
        mine = self.gradients.projector_fingerprint()
        if mine != recorded:
            diff = {k: (recorded.get(k), mine.get(k)) for k in sorted(set(recorded) | set(mine))
                    if recorded.get(k) != mine.get(k)}
            raise ValueError(f"tive: this scorer's gradient projection differs from the one {self.run_dir} was "
                             f"extracted with ((run, scorer) per field: {diff}); score on the same device kind "
                             f"as extraction (replica num_gpus) or re-extract")

    def _lora_dir(self) -> str | None:
        if self.stats.tive is None:
            return None
        from datasel_ray.pipeline.warmup import adapter_location

        adapter = adapter_location(RunDir(self.run_dir))
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter} is missing: the run used TIVE but has no warm-up adapter")
        return str(adapter)

    def _load_model(self, device) -> None:
        from datasel_ray.features.extractor import FeatureExtractor, Preprocessor

        self.preprocessor = Preprocessor(self.model_cfg)
        self.preprocessor.setup()
        self.extractor = FeatureExtractor(self.model_cfg, device=device)
        self.extractor.setup()
        self.gradients = None
        if self.lora_dir is not None:
            from datasel_ray.features.gradient_stage import GradientStage

            cfg = self.stats.config
            self.gradients = GradientStage(self.model_cfg, cfg.tive, self.lora_dir, cfg.seed,
                                           base=self.extractor.vlm)
        self._model_lock = threading.Lock()  # torch modules with hooks are not re-entrant

    # ---- info
    def info(self) -> dict:
        """Run id, model, scored methods, budgets, tasks, versions."""
        from datasel_ray import __version__

        manifest = self.stats.manifest
        return {"run_id": self.stats.run_id, "run_dir": self.run_dir, "model": manifest.get("model_id"),
                "model_revision": manifest.get("model_revision"), "methods": self.stats.methods,
                "budgets": self.stats.budgets, "tasks": self.stats.tasks, "tive": self.stats.tive is not None,
                "image_roots": self.image_roots, "limits": self.limits.__dict__,
                "versions": {"run": manifest.get("versions", {}), "datasel-ray": __version__},
                "feature_schema_version": manifest.get("feature_schema_version")}

    # ---- input
    def parse(self, payload: Any) -> list[ValidatedSample]:
        """Validate and tokenise a request body (one sample or ``{"samples": [...]}``); raise SampleError."""
        items, _ = self.parser.parse_payload(payload)
        out = []
        for i, (value, prefix) in enumerate(items):
            try:
                sample, image = self.parser.validate(value, i)
                sample.prepared = self._prepare(sample, image)
            except SampleError as err:
                raise err.within(prefix) from None
            out.append(sample)
        return out

    def _prepare(self, sample: ValidatedSample, image):
        from datasel_ray.models.vlm import ContextTooShortError

        try:
            return self.preprocessor.processor.prepare(sample.conversations, image)
        except ContextTooShortError as err:
            raise SampleError("conversations", Reason.TOO_LONG, str(err)) from None
        except Exception as err:  # the processor/template refuses this sample
            raise SampleError("conversations", Reason.EXTRACT_FAILED, f"{type(err).__name__}: {err}") from None

    # ---- scoring
    def score_records(self, records: list[dict] | dict) -> list[dict]:
        """Batch entry: validate + score records in LLaVA format; raises SampleError on the first bad one."""
        payload = {"samples": records} if isinstance(records, list) else records
        results = self.score_samples(self.parse(payload))
        for r in results:
            if isinstance(r, SampleError):
                raise r
        return results

    def score_samples(self, samples: list[ValidatedSample]) -> list[dict | SampleError]:
        """One model pass over validated samples; per sample a result dict, or a SampleError for a row the
        model failed on (the other rows are unaffected)."""
        if not samples:
            return []
        features = self.features(samples)
        out: list[dict | SampleError] = []
        for i, sample in enumerate(samples):
            reason = str(features[schema.ERROR_REASON][i])
            if reason:
                out.append(SampleError("", reason, str(features[schema.ERROR_MESSAGE][i])))
                continue
            out.append(self.score_features({k: v[i] for k, v in features.items()}, sample))
        return out

    def features(self, samples: list[ValidatedSample]) -> dict[str, np.ndarray]:
        """Feature columns of the extract phase (``features/`` schema, same dtypes) for ``samples``."""
        row_ids = np.arange(len(samples), dtype=np.int64)
        prepared = [s.prepared for s in samples]
        batch = self.preprocessor.columns(row_ids, prepared, [""] * len(samples), [""] * len(samples))
        with self._model_lock:
            out = self.extractor(batch)
            if self.gradients is not None:
                out = self.gradients.add_gradients(batch, out)
        return out

    def score_features(self, row: dict[str, Any], sample: ValidatedSample) -> dict:
        """Scores of one sample from its feature row (``features/`` columns) against the run's statistics."""
        result: dict[str, Any] = {
            "index": sample.index, "id": sample.sample_id, "task": sample.task, "task_source": sample.task_source,
            "features": {"n_turns": sample.n_turns, "n_image_tokens": int(row[schema.N_IMAGE_TOKENS]),
                         "n_text_tokens": int(row[schema.N_TEXT_TOKENS]),
                         "n_answer_tokens": int(row[schema.N_ANSWER_TOKENS]), "truncated": bool(row[schema.TRUNCATED]),
                         "tau": float(row[schema.TAU]), "answer_loss": _finite_or_none(row[schema.ANSWER_LOSS])},
        }
        if self.stats.coincide is not None:
            result["coincide"] = self.stats.coincide.score(np.asarray(row[schema.COINCIDE_VECTOR])[None])[0]
        if self.stats.datatailor is not None:
            result["datatailor"] = self.stats.datatailor.score_one(
                row[schema.LAST_TOKEN], float(row[schema.INFORMATIVENESS]), sample.n_turns, sample.task)
        if self.stats.tive is not None:
            result["tive"] = self.stats.tive.score_one(np.asarray(row[schema.GRAD_PROJ]), sample.task)
        return result


def _finite_or_none(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def score_pool_samples(run_dir: str | Path, samples: list[dict], image_roots: list[str] | None = None) -> list[dict]:
    """Score LLaVA-format ``samples`` against the run in ``run_dir`` (loads a :class:`Scorer` once per call).

    Raises :class:`SampleError` (field, reason, message) on the first invalid sample.
    """
    return Scorer(str(run_dir), image_roots=image_roots).score_records(samples)
