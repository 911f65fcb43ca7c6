"""The one module that imports Ray. Stages are plain classes; this adapter maps them onto Ray Data.

Ray Data's compute arguments for ``map_batches`` moved between releases (``compute=ActorPoolStrategy`` →
``concurrency=`` → back); Ray is pinned (2.60) and the call lives only in :func:`map_actor_stage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Callable, Iterator

import ray
import ray.data

from datasel_ray import console
from datasel_ray.config import RayConfig

# ``ray job submit`` passes the job's config (runtime_env included) to the driver in this variable.
RAY_JOB_CONFIG_JSON_ENV_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None, env: dict[str, str] | None = None) -> None:
    """Connect to the cluster named by ``cfg.address`` or RAY_ADDRESS, else start a local Ray. ``env``:
    variables every worker of this driver gets (the object-store options of the ``storage`` section) through
    the runtime environment. Under ``ray job submit`` Ray merges this with the job's runtime environment and
    refuses a field or variable set by both: the job's own hook and variables win, and only the rest is added."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    console.install()  # before ray.init: its token-auth notice is logged while it starts
    quiet = console.ray_init_kwargs()
    job_env = _submitted_job_runtime_env()
    runtime_env = quiet.pop("runtime_env", {})
    if "worker_process_setup_hook" in job_env:
        runtime_env.pop("worker_process_setup_hook", None)
    env = {k: v for k, v in (env or {}).items() if k not in (job_env.get("env_vars") or {})}
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    if runtime_env:
        quiet["runtime_env"] = runtime_env
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True, **quiet)
    console.install()  # again: ray.init configured the "ray" logger and its children
    global _dead_at_connect
    _dead_at_connect = {n["NodeID"] for n in ray.nodes() if not n.get("Alive")}
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _submitted_job_runtime_env() -> dict:
    """The runtime environment ``ray job submit`` gave this driver (``{}`` outside a submitted job)."""
    import json

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}) if raw.strip().startswith("{") else {}


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of each alive node, e.g. ``[{"CPU": 16, "GPU": 8}, ...]``."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


ASSUME_AUTOSCALER_ENV = "DATASEL_ASSUME_AUTOSCALER"


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type an autoscaler can still launch (``max_count`` -1 or above ``min_count``),
    from the cluster config the autoscaler publishes in the GCS (KubeRay, the cluster launcher, Ray's fake
    multi-node provider); [] on a fixed cluster or a local Ray."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if not config or not config.node_group_configs:
        return []
    return [dict(group.resources) for group in config.node_group_configs
            if group.resources and group.max_count != 0 and (group.max_count == -1 or group.max_count > group.min_count)]


def monitor_autoscales() -> bool:
    """True when the cluster's autoscaler monitor (Ray's v1 autoscaler: the cluster launcher, KubeRay's in-tree
    autoscaler, the fake multi-node provider) runs with an autoscaling config. Its report in the GCS (what
    ``ray status`` prints) names node types by that config (``ray.worker.gpu``); the read-only monitor of a fixed
    cluster names one type per node, ``node_<node id>``. This report carries no node resources: a request is
    then trusted to fit a node type."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return False
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return False
    mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def has_autoscaler() -> bool:
    """True when the cluster can add nodes (then current node sizes do not bound a request): an autoscaler has
    published node types it can launch (:func:`autoscaler_node_types`), the autoscaler monitor runs with an
    autoscaling config (:func:`monitor_autoscales`), or ``DATASEL_ASSUME_AUTOSCALER`` is set (an autoscaler Ray
    cannot see)."""
    return bool(os.environ.get(ASSUME_AUTOSCALER_ENV)) or bool(autoscaler_node_types()) or monitor_autoscales()


def fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    """True when a node with ``resources`` can hold the resource ``bundle``."""
    return all(resources.get(k, 0.0) >= v for k, v in bundle.items() if v > 0)


def can_launch(bundle: dict[str, float]) -> bool:
    """True when an autoscaler can launch a node type that holds ``bundle``: one of the published node types
    fits it, or an autoscaler whose node types Ray does not publish is there (the monitor's, or assumed by
    the environment)."""
    types = autoscaler_node_types()
    if types:
        return any(fits(bundle, t) for t in types)
    return bool(os.environ.get(ASSUME_AUTOSCALER_ENV)) or monitor_autoscales()


_dead_at_connect: set[str] | None = None


def cluster_diagnosis():
    """The cluster's view of waiting work (:class:`~datasel_ray.pipeline.failures.ClusterDiagnosis`): pending
    resource requests of tasks and actors (from the GCS, as ``ray status`` shows them), free and total resources,
    nodes alive and lost since this driver connected, and whether an autoscaler can add a node for every
    pending shape."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    from datasel_ray.pipeline.failures import ClusterDiagnosis

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    pending = [(dict(r.bundle), int(r.count)) for demand in status.resource_demands.ray_task_actor_demand
               for r in demand.bundles_by_count]
    pending += [(dict(r.bundle), int(r.count)) for demand in status.resource_demands.placement_group_demand
                for r in demand.bundles_by_count]
    nodes = ray.nodes()
    dead = {n["NodeID"] for n in nodes if not n.get("Alive")}
    return ClusterDiagnosis(
        pending=pending, free=status.available_resources(), total=status.total_resources(),
        nodes_alive=sum(1 for n in nodes if n.get("Alive")),
        nodes_lost=len(dead - (_dead_at_connect or set())),
        can_scale=bool(pending) and all(can_launch(b) for b, _ in pending))


def from_rows(rows: list[dict]) -> "ray.data.Dataset":
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def _run_stage(batch: dict, stage_cls: type, kwargs: dict) -> dict:
    key = (stage_cls, repr(sorted(kwargs.items())))
    cache = _run_stage.__dict__.setdefault("cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = stage_cls(**kwargs)
    return cache[key](batch)


def map_task_stage(ds: "ray.data.Dataset", stage_cls: type, kwargs: dict, *, batch_size: int = 1,
                   num_cpus: float = 1.0, max_retries: int = 3) -> "ray.data.Dataset":
    """Run a stateless stage as Ray tasks (one stage instance cached per worker process)."""
    with _retry_args_allowed():
        return ds.map_batches(_run_stage, fn_kwargs={"stage_cls": stage_cls, "kwargs": kwargs},
                              batch_size=batch_size, num_cpus=num_cpus, max_retries=max_retries,
                              batch_format="numpy")


@contextlib.contextmanager
def _retry_args_allowed():
    """Ray 2.60 warns on retry/restart arguments passed through ``**ray_remote_args``; they are still the
    documented way to set them for Ray Data operators."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        yield


def map_actor_stage(ds: "ray.data.Dataset", stage_cls: type, kwargs: dict, *, batch_size: int, min_actors: int,
                    max_actors: int, num_gpus: float, num_cpus: float, max_restarts: int,
                    max_task_retries: int) -> "ray.data.Dataset":
    """Run a stage with ``setup()`` weights on an autoscaling actor pool (min..max actors)."""
    with _retry_args_allowed():
        return ds.map_batches(
            stage_cls,
            fn_constructor_kwargs=kwargs,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
            num_gpus=num_gpus or None,
            num_cpus=num_cpus,
            batch_format="numpy",
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
        )


def iter_result_rows(ds: "ray.data.Dataset") -> Iterator[dict[str, Any]]:
    """Stream a (small) result dataset's rows to the driver as they are produced."""
    yield from ds.iter_rows()


def _aggregations(aggregations: dict[str, list[str]]) -> list:
    from ray.data import aggregate as agg

    ops = {"sum": agg.Sum, "mean": agg.Mean, "std": agg.Std, "min": agg.Min, "max": agg.Max}
    aggs = [agg.Count()]
    for column, names in aggregations.items():
        for name in names:
            if name != "count":
                aggs.append(ops[name](on=column, alias_name=f"{name}_{column}"))
    return aggs


def groupby_aggregate_files(files: list[str], columns: list[str], key: str, aggregations: dict[str, list[str]],
                            files_per_block: int = 32):
    """Per-key statistics with Ray Data ``groupby(...).aggregate(...)`` over ``columns`` of parquet ``files``,
    read in Ray Data tasks of ``files_per_block`` files each (not by the driver); returns a pyarrow Table.
    ``aggregations`` maps a column to any of ``count``, ``sum``, ``mean``, ``std``, ``min``, ``max``.

    The files are read by this module's own map tasks rather than ``ray.data.read_parquet``: its V2 datasource
    (Ray 2.60's default) keeps state per file in its read worker and V1 reads every file's footer in the driver,
    so either's memory grows with the number of feature shards even when only scalar columns are read."""
    groups = [files[i:i + files_per_block] for i in range(0, len(files), files_per_block)]
    ds = ray.data.from_items([{"files": g} for g in groups], override_num_blocks=max(1, len(groups)))
    ds = ds.map_batches(_read_parquet_columns, fn_kwargs={"columns": columns}, batch_size=1, batch_format="pyarrow")
    return _to_table(ds.groupby(key).aggregate(*_aggregations(aggregations)))


def _read_parquet_columns(batch, columns: list[str]):
    """Map task of :func:`groupby_aggregate_files`: ``columns`` of the batch's parquet files, as one table."""
    import pyarrow as pa

    from datasel_ray.io.storage import Location

    return pa.concat_tables([Location.parse(path).read_parquet(columns)
                             for paths in batch.column("files").to_pylist() for path in paths])


def _to_table(ds: "ray.data.Dataset"):
    import pyarrow as pa

    tables = [ray.get(ref) for ref in ds.to_arrow_refs()]
    return pa.concat_tables(tables) if tables else None


class RayExecutor:
    """Partition tasks as Ray tasks (``num_cpus`` each, retried on worker loss), at most ``max_in_flight`` at once
    (default: twice the cluster's CPUs, so an autoscaling cluster grows with the queue). Results come back in item
    order; see :mod:`datasel_ray.pipeline.executor`."""

    name = "ray"

    def __init__(self, num_cpus: float = 1.0, max_in_flight: int | None = None, max_retries: int = 3):
        self.num_cpus = num_cpus
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries

    def map(self, fn: Callable, items, progress=None) -> list:
        items = list(items)
        if not items:
            return []
        limit = self.max_in_flight or max(2, int(2 * ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries)(fn)
        results: list = [None] * len(items)
        pending: dict = {}
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < limit:
                pending[remote.remote(items[next_item])] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                if progress is not None:
                    progress.update(1)
        return results

