"""Runs the phases a config enables, in order, with manifest checks, timing and resumption.

``datasel run --config cfg.yaml`` and every single-phase command go through :func:`run_phases`, so a phase
behaves the same whether it runs alone, in a local run, or under ``ray job submit``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from datasel_ray.config import PHASES, RunConfig
from datasel_ray.io.rundir import RunDir
from datasel_ray.io.storage import apply_storage_options, worker_environment
from datasel_ray.methods.registry import get_method
from datasel_ray.models.shared_copy import share_model
from datasel_ray.pipeline import ray_adapter
from datasel_ray.pipeline.failures import StallWatch

log = logging.getLogger(__name__)


def _ingest(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.ingest import run_ingest

    return run_ingest(cfg, run_dir, quiet=quiet)


def _warmup(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.warmup import run_warmup

    return run_warmup(cfg, run_dir, quiet=quiet)


def _extract(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.extract import run_extract
    from datasel_ray.pipeline.warmup import adapter_dir_for_extract

    return run_extract(cfg, run_dir, lora_dir=adapter_dir_for_extract(cfg, run_dir), quiet=quiet)


def _dedup(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.dedup import run_dedup

    return run_dedup(cfg, run_dir, quiet=quiet)


def _aggregate(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.aggregate import run_aggregate

    return run_aggregate(cfg, run_dir, quiet=quiet)


def _select(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.pipeline.select import run_select

    return run_select(cfg, run_dir, quiet=quiet)


def _report(cfg: RunConfig, run_dir: RunDir, quiet: bool) -> dict:
    from datasel_ray.report import write_report

    return write_report(run_dir)


PHASE_FUNCS: dict[str, Callable[[RunConfig, RunDir, bool], dict]] = {
    "ingest": _ingest,
    "warmup": _warmup,
    "extract": _extract,
    "dedup": _dedup,
    "aggregate": _aggregate,
    "select": _select,
    "report": _report,
}
ALWAYS_RERUN = {"select", "report"}  # cheap, and depend on options outside the manifest fingerprint
MODEL_PHASES = {"warmup", "extract"}  # phases that load the reference model: the run's copy is shared first


RAY_PHASES = {"warmup", "extract"}  # phases that always run on Ray (Ray Train workers, Ray Data actors)
# ingest, aggregate and select start Ray themselves when their executor is Ray (pool.executor, aggregate.executor)


def preflight(cfg: RunConfig, phases: list[str]) -> None:
    """Refuse impossible or inconsistent requests before any work starts, from the config, the pool listing and
    the model's processor alone (no Ray: a refusal starts no cluster). Errors name the field."""
    from datasel_ray.io.pool import list_pool_files

    if "ingest" in phases:
        list_pool_files(cfg.pool.path, cfg.pool.format)
    needs_gradients = [m for m in cfg.select.methods if get_method(m).needs_tive]
    if needs_gradients and "select" in phases and not cfg.tive.enabled:
        names = ", ".join(repr(m) for m in needs_gradients)
        raise ValueError(f"select.methods includes {names}, which read the TIVE gradients, but tive.enabled is "
                         f"false: enable TIVE (warm-up and gradients) or remove {names} from select.methods")
    if cfg.select.dedup and ("aggregate" in phases or "select" in phases) and "dedup" not in phases \
            and RunDir(cfg.run_dir).phase_status("dedup") != "done":
        raise ValueError("select.dedup is true but phases has no 'dedup' and the run has no finished dedup phase: "
                         "add 'dedup' to phases (before 'aggregate') or set select.dedup=false")
    from datasel_ray.pipeline.warmup import adapter_location

    if "extract" in phases and cfg.tive.enabled and "warmup" not in phases \
            and not adapter_location(RunDir(cfg.run_dir)).exists():
        raise ValueError("tive.enabled is true but phases has no 'warmup' and the run has no warm-up adapter yet: "
                         "add 'warmup' to phases (before 'extract') or set tive.enabled=false")


def preflight_cluster(cfg: RunConfig, phases: list[str]) -> None:
    """Refuse resource requests no node of the connected cluster (or its autoscaler) can satisfy (needs Ray)."""
    from datasel_ray.pipeline.extract import resolve_num_gpus, validate_resources
    from datasel_ray.pipeline.warmup import validate_warmup_resources

    if "extract" in phases:
        validate_resources(cfg, resolve_num_gpus(cfg))
    if "warmup" in phases and cfg.tive.enabled:
        validate_warmup_resources(cfg.tive)


def run_phases(cfg: RunConfig, phases: list[str] | None = None, force: str | None = None,
               quiet: bool = False) -> dict[str, dict]:
    """Run ``phases`` (default: ``cfg.phases``) in pipeline order; returns each phase's result.

    ``force`` names a phase whose outputs (and those of every later phase) are deleted and recomputed.
    A phase recorded as done with the same fingerprint is skipped, except select and report.
    """
    wanted = phases if phases is not None else cfg.phases
    if "warmup" in wanted and not cfg.tive.enabled:
        wanted = [p for p in wanted if p != "warmup"]
    apply_storage_options(cfg.storage)
    preflight(cfg, wanted)  # refusals first: sharing the model may build it, Ray may start a cluster
    if RAY_PHASES & set(wanted):
        ray_adapter.ensure_ray(cfg.ray, env=worker_environment(cfg.storage))
        preflight_cluster(cfg, wanted)
    run_dir = RunDir(cfg.run_dir)
    if MODEL_PHASES & set(wanted):
        cfg = share_model(cfg, run_dir)
    run_dir.init(cfg)
    results: dict[str, dict] = {}
    for phase in PHASES:
        if phase not in wanted:
            continue
        if force == phase:
            run_dir.reset_phase(phase)
        run_dir.check_phase(cfg, phase)
        if run_dir.phase_status(phase) == "done" and phase not in ALWAYS_RERUN:
            results[phase] = {**run_dir.load_manifest()["phases"][phase].get("result", {}), "skipped": True}
            if not quiet:
                log.info("phase %s already done in %s: skipped", phase, run_dir)
            continue
        run_dir.start_phase(cfg, phase)
        started = time.monotonic()
        try:
            with StallWatch(phase, cfg.failures, ray_adapter.cluster_diagnosis, run_dir / "progress.json",
                            quiet=quiet):
                result = PHASE_FUNCS[phase](cfg, run_dir, quiet)
        except BaseException as err:
            try:
                run_dir.fail_phase(phase, time.monotonic() - started, err)
            except Exception as record_err:  # the phase's own error is the one to report
                log.warning("could not record the failure of %s in %s: %s", phase, run_dir, record_err)
            raise
        run_dir.finish_phase(phase, time.monotonic() - started, result=result)
        results[phase] = result
    return results
