"""The one list of selection methods: name, description, feature columns, and the modules implementing them.

Everything that names methods derives from :data:`METHOD_REGISTRY`: the config's choices
(``config.METHODS``), the aggregate and select phases (which call ``spec.pipeline``'s ``fit`` / ``select``),
the online scorer (methods with ``scored=True``, see :mod:`datasel_ray.scoring`), the report and the CLI.

The method contract (one module per method under :mod:`datasel_ray.methods` for the maths, one under
:mod:`datasel_ray.pipeline.fit` for running it over partitions):

* ``columns``: the feature columns the method reads;
* ``fit(ctx)``: budget-independent statistics from every partition, merged into ``stats/<name>/``
  (counts, sums, centroids, per-cluster summaries; see :mod:`datasel_ray.io.layout`);
* ``select(ctx, budget)``: a :class:`~datasel_ray.pipeline.fit.context.MethodSelection`;
* online scoring of one new sample against the frozen state: ``scoring.<Name>State.score_new``, which calls the
  method module's functions (no formula exists twice).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from datasel_ray import schema

__all__ = ["METHOD_REGISTRY", "MethodSpec", "fitted_methods", "get_method", "method_names", "scored_methods"]


@dataclass(frozen=True)
class MethodSpec:
    """name; description; columns: feature columns read; pipeline: module with ``fit``/``select``; state:
    ``module:Class`` of the frozen state the online scorer answers from (None: not scored online); needs_tive:
    whether it needs the TIVE warm-up and gradients."""

    name: str
    description: str
    columns: tuple[str, ...]
    pipeline: str
    state: str | None = None
    needs_tive: bool = False

    @property
    def scored(self) -> bool:
        return self.state is not None

    def state_class(self) -> type:
        module, _, cls = str(self.state).partition(":")
        return getattr(importlib.import_module(module), cls)

    def fit(self, ctx) -> dict:
        return importlib.import_module(self.pipeline).fit(ctx)

    def select(self, ctx, budget: int):
        module = importlib.import_module(self.pipeline)
        if hasattr(module, "select"):
            return module.select(ctx, budget)
        return module.select_baseline(ctx, self.name, budget)


_BASELINES = "datasel_ray.pipeline.fit.baselines"
_STATE = "datasel_ray.scoring.state:"

METHOD_REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("coincide", "COINCIDE: spherical k-means, transferability/density cluster quotas, greedy MMD.",
                   (schema.COINCIDE_VECTOR, schema.LAST_TOKEN), "datasel_ray.pipeline.fit.coincide", _STATE + "CoincideState"),
        MethodSpec("datatailor", "DataTailor: informativeness, uniqueness, representativeness; per-task budgets.",
                   (schema.LAST_TOKEN, schema.INFORMATIVENESS, schema.TAU, schema.N_TURNS),
                   "datasel_ray.pipeline.fit.datatailor", _STATE + "DataTailorState"),
        MethodSpec("tive", "TIVE: task value from gradient norms, instance value from projected LoRA gradients.",
                   (schema.GRAD_PROJ, schema.GRAD_NORM), "datasel_ray.pipeline.fit.tive", _STATE + "TiveState",
                   needs_tive=True),
        MethodSpec("random", "Uniform random subset.", (), _BASELINES),
        MethodSpec("random_per_task", "Random subset keeping the pool's task mix.", (), _BASELINES),
        MethodSpec("answer_loss", "Rank by mean answer-token loss of the reference model (highest first).",
                   (schema.ANSWER_LOSS,), _BASELINES),
    )
}


def method_names() -> tuple[str, ...]:
    return tuple(METHOD_REGISTRY)


def scored_methods() -> tuple[str, ...]:
    return tuple(name for name, spec in METHOD_REGISTRY.items() if spec.scored)


def fitted_methods(methods: list[str], tive_enabled: bool) -> list[str]:
    """Of ``methods``, those with budget-independent statistics to fit in the aggregate phase, in registry
    order (TIVE only when its gradients are extracted)."""
    wanted = set(methods)
    return [name for name, spec in METHOD_REGISTRY.items()
            if name in wanted and spec.scored and (tive_enabled or not spec.needs_tive)]


def get_method(name: str) -> MethodSpec:
    """Return the :class:`MethodSpec` of ``name``; ValueError listing the choices otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method '{name}'. Choose from: {', '.join(sorted(METHOD_REGISTRY))}") from None
