"""The one module that imports ``ray.train``: runs a plain per-worker function under a Ray Train ``TorchTrainer``.

Ray 2.60 runs Ray Train V2 by default: ``ScalingConfig(trainer_resources=...)`` is refused there (the controller
reserves no CPU), ``RunConfig(storage_path=...)`` must be reachable from every worker (a local path on one node,
shared storage or a filesystem URI on a cluster), and ``Result.metrics`` stays None unless a report carried a
checkpoint (PITFALLS.md, "Ray Train"). The worker function never sees Ray: it gets a :class:`WorkerContext`
with its rank, device, a ``prepare_model`` (DDP when ``world_size > 1``) and a ``report`` callback.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
from ray.train import Checkpoint, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from datasel_ray import console

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a training worker needs from Ray Train, without importing it.

    rank / world_size: this worker's place; device: its torch device (``cuda:i`` with ``use_gpu``, else cpu);
    prepare_model(model) -> module to call (moved to the device, DDP-wrapped when world_size > 1);
    report(metrics, checkpoint_dir | None): every rank must call it the same number of times; only a report with
    a checkpoint directory keeps its metrics in the result.
    """

    rank: int
    world_size: int
    device: Any
    prepare_model: Callable
    report: Callable[[dict, str | None], None]


def _report(metrics: dict, checkpoint_dir: str | None) -> None:
    checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def _prepare_model(model):
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def _train_loop(config: dict) -> None:
    ctx = ray.train.get_context()
    worker = WorkerContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                           device=ray.train.torch.get_device(), prepare_model=_prepare_model, report=_report)
    config["worker_fn"](config["worker_config"], worker)


def fit_torch(worker_fn: Callable[[dict, WorkerContext], None], worker_config: dict, *, num_workers: int,
              use_gpu: bool, storage_path: str, name: str, dest_dir: str) -> dict:
    """Run ``worker_fn(worker_config, ctx)`` on ``num_workers`` Ray Train workers; copy the last checkpoint.

    ``worker_fn`` must be an importable module-level function. Each worker reserves 1 CPU (and 1 GPU with
    ``use_gpu``). The last reported checkpoint is copied into the local directory ``dest_dir``; returns the
    metrics reported with it. Raises RuntimeError when training failed or reported no checkpoint.
    """
    resources = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"worker_fn": worker_fn, "worker_config": worker_config},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_path, name=name,
                             logging_config=LoggingConfig(log_level=console.train_log_level())),
    )
    # Ray Train's fit() installs its own SIGINT handler in the main thread (abort the run, exit 0 on a finished
    # controller) and leaves it there: the phases after the warm-up need the one they had (Ctrl-C, StallWatch)
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.error is not None:
        raise RuntimeError(f"Ray Train run {name!r} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} reported no checkpoint")
    result.checkpoint.to_directory(dest_dir)
    return dict(result.metrics or {})
