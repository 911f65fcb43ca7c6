"""Warm-up phase (TIVE §3.1): a LoRA adapter trained with Ray Train on a per-task sample of the pool."""

from __future__ import annotations

from datasel_ray.config import RunConfig
from datasel_ray.io.rundir import RunDir


def adapter_dir_for_extract(cfg: RunConfig, run_dir: RunDir) -> str | None:
    """The warm-up adapter that extraction loads for TIVE gradients, or None when TIVE is off."""
    if not cfg.tive.enabled:
        return None
    adapter = run_dir / "lora" / "adapter"
    if not adapter.exists():
        raise RuntimeError(f"TIVE is enabled but {adapter} does not exist: run the warmup phase first")
    return str(adapter)
