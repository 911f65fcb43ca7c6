"""Shared fixtures: one local Ray per session (num_cpus=2, dashboard off), one tiny model, one demo run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Built models (tiny, smol-llava) are cached here across test sessions: a build is keyed by its recipe's sha256
# fingerprint and renamed into place only when complete, so a cached one is always the one the recipe makes
# (smol-llava's build is ~11 min of a CI run otherwise). DATASEL_TEST_FRESH_HOME=1 builds into a new temp dir.
# Set before Ray starts so that workers inherit it.
if os.environ.get("DATASEL_TEST_FRESH_HOME"):
    os.environ.setdefault("DATASEL_HOME", tempfile.mkdtemp(prefix="datasel-home-"))
else:
    os.environ.setdefault("DATASEL_HOME", os.path.join(tempfile.gettempdir(), "datasel-test-home"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# The suite shares two CPUs with whatever else the machine runs: a Serve proxy that answers its ready or health
# check late is busy, not dead (with Serve's 5 s / 10 s defaults a loaded machine failed the Serve fixtures).
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from datasel_ray.config import RayConfig
    from datasel_ray.pipeline import ray_adapter

    if not ray.is_initialized():
        ray_adapter.ensure_ray(RayConfig(num_cpus=2))
    yield ray
    ray_adapter.shutdown_ray()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from datasel_ray.models.tiny import resolve_model_path

    return Path(resolve_model_path("tiny"))


@pytest.fixture(scope="session")
def demo_pool(tmp_path_factory):
    """A 500-row generated pool with every kind of bad row, near-duplicates and noise."""
    from datasel_ray.synthetic import SynthConfig, generate_pool

    return generate_pool(tmp_path_factory.mktemp("pool"), SynthConfig(num_samples=500, seed=7, bad_rate=0.04))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_pool, ray_local, tiny_model_dir):
    """ingest → extract → aggregate → select on ``demo_pool``; returns (config, results)."""
    from datasel_ray.demo import demo_config
    from datasel_ray.pipeline.runner import run_phases

    cfg = demo_config(tmp_path_factory.mktemp("demo"), demo_pool.pool_path, tive=False, seed=3)
    cfg.select.methods = ["coincide", "datatailor", "random", "random_per_task", "answer_loss"]
    results = run_phases(cfg, ["ingest", "extract", "aggregate", "select"], quiet=True)
    return cfg, results


def _cuda_skip_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return (f"needs a CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); run benchmarks/gpu_check.py on a GPU machine")


def pytest_collection_modifyitems(config, items):
    """A `gpu` test never runs on CPU: without a CUDA device it is skipped, with the reason."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _cuda_skip_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
