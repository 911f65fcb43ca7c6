"""Registry of selection methods: name -> description, feature columns needed and implementing module."""

from __future__ import annotations

from dataclasses import dataclass

from datasel_ray import schema

__all__ = ["METHOD_REGISTRY", "MethodSpec", "get_method"]


@dataclass(frozen=True)
class MethodSpec:
    """name; description; columns: feature/sample columns the select phase must load; module: implementation."""

    name: str
    description: str
    columns: tuple[str, ...]
    module: str


METHOD_REGISTRY: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("answer_loss", "Rank by mean answer-token loss of the reference model (highest first).",
                   (schema.ANSWER_LOSS,), "datasel_ray.methods.baselines"),
        MethodSpec("coincide", "COINCIDE: spherical k-means, transferability/density cluster quotas, greedy MMD.",
                   (schema.COINCIDE_VECTOR,), "datasel_ray.methods.coincide"),
        MethodSpec("datatailor", "DataTailor: informativeness, uniqueness, representativeness; per-task budgets.",
                   (schema.LAST_TOKEN, schema.INFORMATIVENESS, schema.TAU, schema.N_TURNS, schema.TASK),
                   "datasel_ray.methods.datatailor"),
        MethodSpec("random", "Uniform random subset.", (), "datasel_ray.methods.baselines"),
        MethodSpec("random_per_task", "Random subset keeping the pool's task mix.", (schema.TASK,),
                   "datasel_ray.methods.baselines"),
        MethodSpec("tive", "TIVE: task value from gradient norms, instance value from projected LoRA gradients.",
                   (schema.GRAD_PROJ, schema.GRAD_NORM, schema.TASK), "datasel_ray.methods.tive"),
    )
}


def get_method(name: str) -> MethodSpec:
    """Return the :class:`MethodSpec` of ``name``; ValueError listing the choices otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method '{name}'. Choose from: {', '.join(sorted(METHOD_REGISTRY))}") from None
