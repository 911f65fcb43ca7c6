"""Frozen run state the online scorer answers from: sufficient statistics, not pool vectors.

A replica holds, per method, what the batch run fitted (centroids, per-cluster summaries, thresholds, sorted
per-task score arrays in float64 — a few scalars per pool row) and reads a cluster's members from the run
directory only when a score needs them, through a bounded :class:`MemberCache`. Every formula is the method
module's (:mod:`datasel_ray.methods`); this module only loads state and looks things up.

What the answers mean, per method (also in the README and the HTTP response schema):

* **COINCIDE** — the sample's cluster is its nearest centroid in the run's clustering space (projection + unit
  norm, as the batch assignment). A pool row (a member within :data:`POOL_MATCH_TOLERANCE` of the sample) gets
  the batch decision. A new sample would be selected if its cluster was taken whole, or, when the cluster has a
  quota ``q > 0``, if greedy MMD over the members plus the sample picks it among ``q`` prototypes
  (:func:`~datasel_ray.methods.coincide.would_select_new`).
* **DataTailor** — U, R, within-task percentile ranks and the combined score against the nearest Ward cluster of
  the sample's task; a pool row gets the batch decision and its batch values; a new sample would be selected
  when its score reaches the task's lowest selected score.
* **TIVE** — selection is a seeded draw, so the answer is the inclusion probability under the run's draw
  (:func:`~datasel_ray.methods.tive.inclusion_probability`), not a boolean.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import Location
from datasel_ray.methods import coincide, datatailor, tive
from datasel_ray.methods.registry import get_method, scored_methods
from datasel_ray.pipeline.feature_store import column_to_numpy

__all__ = ["CoincideState", "DataTailorState", "MemberCache", "POOL_MATCH_TOLERANCE", "RunStats", "TiveState"]

#: a sample within this distance of a pool member is that member re-extracted (1 - cosine for COINCIDE's unit
#: vectors; relative Euclidean distance for DataTailor's last-token states): well above the fp16 rounding of a
#: re-extraction, well below the distance of an injected near-duplicate.
POOL_MATCH_TOLERANCE = 1e-4


def _columns(loc: Location, names: list[str] | None = None) -> dict[str, np.ndarray]:
    t = loc.read_parquet(names)
    return {name: column_to_numpy(t.column(name)) for name in t.column_names}


def _percentile(sorted_pool: np.ndarray, value: float) -> float:
    """Share of a task's pool values below ``value`` (NaN sorts last, as in the batch ranks), in [0, 1]."""
    n = len(sorted_pool)
    return float(np.searchsorted(sorted_pool, value, side="left") / n) if n else 0.0


class MemberCache:
    """Bounded LRU cache of cluster member blocks read from ``stats/<method>/members/`` row ranges.

    ``max_bytes`` bounds the bytes held over all cached clusters (a cluster larger than the bound is read, used
    and not kept), so a replica's memory does not depend on the vectors' width. Thread-safe."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._sizes: dict[tuple, tuple[int, int]] = {}
        self._bytes = 0
        self._rows = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: Location, offset: int, size: int, columns: list[str]) -> dict[str, np.ndarray]:
        key = (str(path), int(offset), int(size), tuple(columns))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        table = path.read_parquet_rows(int(offset), int(size), columns)
        block = {name: column_to_numpy(table.column(name)) for name in columns}
        nbytes = sum(a.nbytes for a in block.values())
        with self._lock:
            self.misses += 1
            if nbytes <= self.max_bytes and key not in self._items:
                self._items[key] = block
                self._sizes[key] = (nbytes, int(size))
                self._bytes += nbytes
                self._rows += int(size)
                while self._bytes > self.max_bytes:
                    old, _ = self._items.popitem(last=False)
                    b, r = self._sizes.pop(old)
                    self._bytes -= b
                    self._rows -= r
        return block

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self._bytes


def _selected_lookup(run_dir: RunDir, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted pool row ids and whether the run selected each (int64[N], bool[N])."""
    s = _columns(layout.selection_dir(run_dir, method) / layout.SCORES, [schema.ROW_ID, layout.SELECTED])
    order = np.argsort(s[schema.ROW_ID], kind="stable")
    return s[schema.ROW_ID][order], s[layout.SELECTED][order]


def _was_selected(ids: np.ndarray, selected: np.ndarray, row_id: int) -> bool:
    i = int(np.searchsorted(ids, row_id))
    return bool(i < len(ids) and ids[i] == row_id and selected[i])


@dataclass
class CoincideState:
    """COINCIDE state: clustering-space centroids (+ projection), per-cluster S/D/P/size/quota, member files."""

    stats: Location
    centroids: np.ndarray  # float32 [K, d'] unit, clustering space
    projection: tuple[np.ndarray, np.ndarray] | None
    clusters: dict[str, np.ndarray]
    quota: np.ndarray  # int64 [K]
    whole: np.ndarray  # bool [K]
    sigma: float
    pool_ids: np.ndarray
    pool_selected: np.ndarray
    cache: MemberCache = field(default_factory=MemberCache)

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> CoincideState:
        from datasel_ray.pipeline.fit.coincide import load_clusters, load_projection

        stats = layout.method_stats(run_dir, "coincide")
        q = _columns(layout.selection_dir(run_dir, "coincide") / layout.QUOTAS)
        ids, sel = _selected_lookup(run_dir, "coincide")
        return cls(stats=stats, centroids=(stats / layout.CENTROIDS).read_npy().astype(np.float32),
                   projection=load_projection(stats), clusters=load_clusters(stats), quota=q["quota"],
                   whole=q["whole"].astype(bool), sigma=float(cfg.coincide.sigma), pool_ids=ids, pool_selected=sel,
                   cache=cache)

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid (as the batch assignment) and its cosine, for float[B, F] coincide vectors."""
        from datasel_ray.clustering import assign_nearest
        from datasel_ray.pipeline.fit.coincide import clustering_space

        unit = clustering_space(np.asarray(vectors), self.projection)
        labels = assign_nearest(unit, self.centroids)
        return labels, np.einsum("bd,bd->b", unit, self.centroids[labels])

    def score_new(self, vector: np.ndarray) -> dict:
        """COINCIDE fields of one sample (``vector``: its coincide vector, float[F], fp16 as extracted)."""
        labels, cos = self.assign(np.asarray(vector)[None])
        c = int(labels[0])
        cl = self.clusters
        size = int(cl[layout.SIZE][c])
        members = self.cache.get(layout.members_file(self.stats, cl[layout.BUCKET][c]), cl[layout.OFFSET][c], size,
                                 [schema.ROW_ID, layout.VECTOR])
        x = np.asarray(vector, dtype=np.float64)
        match = coincide.match_member(x, members[layout.VECTOR], POOL_MATCH_TOLERANCE)
        if match is not None:
            row_id = int(members[schema.ROW_ID][match])
            would, rule = _was_selected(self.pool_ids, self.pool_selected, row_id), "pool_row"
        else:
            row_id = None
            would = coincide.would_select_new(x, members[layout.VECTOR], int(self.quota[c]), bool(self.whole[c]),
                                              self.sigma)
            rule = "whole_cluster" if self.whole[c] else "no_quota" if self.quota[c] == 0 else "greedy_mmd"
        return {"cluster": c, "transferability": float(cl["transferability"][c]),
                "density": float(cl["density"][c]), "probability": float(cl["probability"][c]),
                "distance": float(np.sqrt(max(0.0, 2.0 - 2.0 * float(cos[0])))), "cluster_size": size,
                "cluster_quota": int(self.quota[c]),
                "cluster_selected_fraction": float(self.quota[c] / max(size, 1)), "pool_row_id": row_id,
                "rule": rule, "would_select": bool(would)}


@dataclass
class DataTailorState:
    """DataTailor state: Ward-cluster means, association and pair sums; per-task sorted pool values; member files."""

    stats: Location
    means: np.ndarray  # float32 [K, d]
    clusters: dict[str, np.ndarray]
    pool: dict[str, dict[str, np.ndarray]]  # task -> component -> sorted pool values (float64)
    thresholds: dict[str, float | None]
    uniqueness_mode: str
    representativeness_mode: str
    pool_ids: np.ndarray
    pool_selected: np.ndarray
    pool_values: dict[str, np.ndarray]  # row-id order: uniqueness, representativeness, score
    cache: MemberCache = field(default_factory=MemberCache)

    COMPONENTS = ("informativeness", "uniqueness", "representativeness", "score")

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> DataTailorState:
        stats = layout.method_stats(run_dir, "datatailor")
        scores = _columns(layout.selection_dir(run_dir, "datatailor") / layout.SCORES,
                          [schema.ROW_ID, schema.TASK, layout.SELECTED, *cls.COMPONENTS])
        order = np.argsort(scores[schema.ROW_ID], kind="stable")
        tasks = scores[schema.TASK].astype(str)
        pool = {str(t): {name: np.sort(scores[name][tasks == t].astype(np.float64)) for name in cls.COMPONENTS}
                for t in np.unique(tasks)}
        return cls(stats=stats, means=(stats / layout.MEANS).read_npy(), clusters=_columns(stats / layout.CLUSTERS),
                   pool=pool, thresholds=dict(summary.get("task_score_threshold", {})),
                   uniqueness_mode=cfg.datatailor.uniqueness,
                   representativeness_mode=cfg.datatailor.representativeness,
                   pool_ids=scores[schema.ROW_ID][order], pool_selected=scores[layout.SELECTED][order],
                   pool_values={k: scores[k][order].astype(np.float64) for k in cls.COMPONENTS}, cache=cache)

    def _members(self, c: int) -> dict[str, np.ndarray]:
        cl = self.clusters
        return self.cache.get(layout.members_file(self.stats, cl[layout.BUCKET][c]), cl[layout.OFFSET][c],
                              int(cl[layout.SIZE][c]), [schema.ROW_ID, layout.VECTOR, schema.INFORMATIVENESS])

    def score_new(self, h: np.ndarray, informativeness: float, n_turns: int, task: str) -> dict:
        """DataTailor fields of one sample (``h``: last-token state, float[d], fp16 as extracted)."""
        h = np.asarray(h, dtype=np.float64)
        candidates = np.flatnonzero(self.clusters[schema.TASK].astype(str) == task)
        dist = np.linalg.norm(self.means[candidates].astype(np.float64) - h, axis=1)
        near = candidates[np.argsort(dist, kind="stable")[:3]]
        scale = max(float(np.linalg.norm(h)), 1e-12)
        for c in near:  # a pool row may sit nearer another cluster's mean than its own Ward cluster's
            m = self._members(int(c))
            d = np.linalg.norm(m[layout.VECTOR].astype(np.float64) - h, axis=1)
            j = int(np.argmin(d))
            if d[j] / scale <= POOL_MATCH_TOLERANCE:
                row_id = int(m[schema.ROW_ID][j])
                i = int(np.searchsorted(self.pool_ids, row_id))
                vals = {k: float(v[i]) for k, v in self.pool_values.items()}
                return self._result(int(c), float(np.linalg.norm(self.means[c] - h)), informativeness, vals, task,
                                    row_id, bool(self.pool_selected[i]), "pool_row")
        c = int(near[0])
        m = self._members(c)
        U = datatailor.uniqueness_new(h, m[layout.VECTOR], m[schema.INFORMATIVENESS],
                                      float(self.clusters["pair_sum"][c]), self.uniqueness_mode)
        R = float(datatailor.representativeness_value(self.clusters["association"][c], informativeness,
                                                      self.clusters["v_sum"][c], self.representativeness_mode))
        pool = self.pool[task]
        ranks = {k: _percentile(pool[k], v) for k, v in (("informativeness", informativeness), ("uniqueness", U),
                                                         ("representativeness", R))}
        score = float(datatailor.combined_score(ranks["informativeness"], ranks["uniqueness"],
                                                ranks["representativeness"], n_turns))
        threshold = self.thresholds.get(task)
        vals = {"informativeness": float(informativeness), "uniqueness": U, "representativeness": R, "score": score}
        return self._result(c, float(dist[np.searchsorted(candidates, c)]), informativeness, vals, task, None,
                            bool(threshold is not None and score >= threshold), "score_threshold")

    def _result(self, c: int, dist: float, informativeness: float, vals: dict, task: str, row_id, would: bool,
                rule: str) -> dict:
        pool = self.pool[task]
        ranks = {f"rank_{k}": _percentile(pool[k], vals[k]) for k in ("informativeness", "uniqueness",
                                                                       "representativeness")}
        u = vals["uniqueness"]
        return {"cluster": c, "distance": dist, "informativeness": float(informativeness),
                "uniqueness": None if not np.isfinite(u) else u, "representativeness": vals["representativeness"],
                **ranks, "score": vals["score"], "score_percentile": _percentile(pool["score"], vals["score"]),
                "threshold": self.thresholds.get(task), "pool_row_id": row_id, "rule": rule, "would_select": would}


@dataclass
class TiveState:
    """TIVE state: task values, task-mean normalised gradients and the run's per-task draw thresholds."""

    task_index: dict[str, int]
    task_value: np.ndarray  # float64 [T]
    mean_grad: np.ndarray  # float32 [T, k]
    kappa: dict[str, float | None]
    draw_all: set[str]
    selected_fraction: dict[str, float]
    temperature: float
    sampling: str

    @classmethod
    def load(cls, run_dir: RunDir, cfg: RunConfig, summary: dict, cache: MemberCache) -> TiveState:
        stats = layout.method_stats(run_dir, "tive")
        table = _columns(stats / layout.TASKS)
        names = table[schema.TASK].astype(str).tolist()
        return cls(task_index={t: i for i, t in enumerate(names)}, task_value=table["task_value"].astype(np.float64),
                   mean_grad=(stats / layout.TASK_MEAN_GRAD).read_npy(),
                   kappa=dict(summary.get("task_draw_threshold", {})), draw_all=set(summary.get("task_draw_all", [])),
                   selected_fraction=dict(summary.get("task_selected_fraction", {})),
                   temperature=float(summary.get("temperature", cfg.tive.temperature)),
                   sampling=str(summary.get("sampling", cfg.tive.sampling)))

    def score_new(self, grad_proj: np.ndarray, task: str) -> dict:
        """TIVE fields of one sample: instance value (Eq. 3), task value (Eq. 4), inclusion probability."""
        t = self.task_index[task]
        value = float(tive.instance_values_against(np.asarray(grad_proj)[None], np.array([t]), self.mean_grad)[0])
        k = self.kappa.get(task)
        kappa = float("-inf") if task in self.draw_all else (float("inf") if k is None else float(k))
        prob = float(tive.inclusion_probability(np.array([value]), kappa, self.temperature, self.sampling)[0])
        return {"instance_value": value, "task_value": float(self.task_value[t]), "inclusion_probability": prob,
                "task_selected_fraction": self.selected_fraction.get(task)}


@dataclass
class RunStats:
    """Everything a scorer needs from ``stats/`` and ``selections/`` of one run (no model)."""

    run_id: str
    config: RunConfig
    manifest: dict
    tasks: list[str]
    states: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    cache: MemberCache = field(default_factory=MemberCache)
    duplicates: Any = None  # scoring.duplicates.DuplicateIndex of the run's dedup/, None without one

    @property
    def methods(self) -> list[str]:
        return list(self.states)

    @classmethod
    def load(cls, run_dir: RunDir, cache_bytes: int = 512 << 20) -> RunStats:
        manifest = run_dir.load_manifest()
        if not manifest or "config" not in manifest:
            raise FileNotFoundError(f"{run_dir}: no manifest.json with a config (not a run directory)")
        cfg = RunConfig.model_validate(manifest["config"])
        stats = run_dir / layout.STATS
        if not (stats / layout.META).exists():
            raise FileNotFoundError(f"{stats}/{layout.META} is missing: run the aggregate phase first")
        tasks = sorted(_columns(stats / layout.TASKS, [schema.TASK])[schema.TASK].astype(str).tolist())
        out = cls(run_id=str(manifest.get("run_id", "")), config=cfg, manifest=manifest, tasks=tasks,
                  cache=MemberCache(cache_bytes))
        for method in scored_methods():
            summary_loc = layout.selection_dir(run_dir, method) / layout.SUMMARY
            if not summary_loc.exists() or not layout.method_stats(run_dir, method).exists():
                continue
            summary = summary_loc.read_json()
            out.budgets[method] = int(summary.get("budget_rows", 0))
            out.states[method] = get_method(method).state_class().load(run_dir, cfg, summary, out.cache)
        from datasel_ray.scoring.duplicates import DuplicateIndex

        out.duplicates = DuplicateIndex.load(run_dir, cfg, out.cache)
        return out
