"""Frozen run state the online scorer answers from: sufficient statistics, not pool vectors.

:class:`RunStats` loads, for every method of the registry that answers online (``scored``) and that the run
selected with, the state its class's ``load`` returns (each method's state and the meaning of its answer are
documented beside its fit, in :mod:`datasel_ray.pipeline.fit`); a replica holds a few scalars per pool row and
reads cluster members through a bounded :class:`~datasel_ray.pipeline.fit.state.MemberCache`. Every formula is
the method module's (:mod:`datasel_ray.methods`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from datasel_ray import schema
from datasel_ray.config import RunConfig
from datasel_ray.io import layout
from datasel_ray.io.rundir import RunDir
from datasel_ray.methods.registry import MethodState, registry
from datasel_ray.pipeline.fit.state import POOL_MATCH_TOLERANCE, MemberCache, read_columns

__all__ = ["MemberCache", "POOL_MATCH_TOLERANCE", "RunStats"]


@dataclass
class RunStats:
    """Everything a scorer needs from ``stats/`` and ``selections/`` of one run (no model).

    states: method name -> its frozen state (:class:`~datasel_ray.methods.registry.MethodState`), in registry
    order; needs_gradients: whether a loaded method reads the TIVE gradients (the scorer then loads the run's
    warm-up adapter)."""

    run_id: str
    config: RunConfig
    manifest: dict
    tasks: list[str]
    states: dict[str, MethodState] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    cache: MemberCache = field(default_factory=MemberCache)
    needs_gradients: bool = False
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
        tasks = sorted(read_columns(stats / layout.TASKS, [schema.TASK])[schema.TASK].astype(str).tolist())
        out = cls(run_id=str(manifest.get("run_id", "")), config=cfg, manifest=manifest, tasks=tasks,
                  cache=MemberCache(cache_bytes))
        for method, method_class in registry().items():
            if not method_class.scored:
                continue
            summary_loc = layout.selection_dir(run_dir, method) / layout.SUMMARY
            fitted = layout.method_stats(run_dir, method).exists() or not method_class.fits
            if not summary_loc.exists() or not fitted:
                continue
            summary = summary_loc.read_json()
            out.budgets[method] = int(summary.get("budget_rows", 0))
            out.states[method] = method_class.load(run_dir, cfg, summary, out.cache)
            out.needs_gradients = out.needs_gradients or method_class.needs_tive
        from datasel_ray.scoring.duplicates import DuplicateIndex

        out.duplicates = DuplicateIndex.load(run_dir, cfg, out.cache)
        return out

    def score_new(self, features: Mapping[str, Any], sample: Any) -> dict[str, dict]:
        """Per loaded method (registry order), its state's ``score_new(features, sample)``: ``features`` maps
        the ``features/`` columns to one sample's values, ``sample`` is its validated request sample."""
        return {method: state.score_new(features, sample) for method, state in self.states.items()}
