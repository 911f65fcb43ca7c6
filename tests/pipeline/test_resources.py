"""Extraction resources against fixed and autoscaling clusters (the cluster's view mocked; no Ray)."""

from __future__ import annotations

import pytest

from datasel_ray.config import RunConfig
from datasel_ray.pipeline import extract, ray_adapter


def _cluster(monkeypatch, nodes, node_types, assume=False):
    monkeypatch.setattr(ray_adapter, "cluster_nodes", lambda: nodes)
    monkeypatch.setattr(ray_adapter, "autoscaler_node_types", lambda: node_types)
    if assume:
        monkeypatch.setenv(ray_adapter.ASSUME_AUTOSCALER_ENV, "1")
    else:
        monkeypatch.delenv(ray_adapter.ASSUME_AUTOSCALER_ENV, raising=False)


def test_scale_from_zero_is_accepted_without_an_environment_variable(monkeypatch):
    # a KubeRay / launcher cluster whose workers start at zero: the head has 0 CPUs
    _cluster(monkeypatch, [{"CPU": 0.0}], [{"CPU": 2.0}])
    cfg = RunConfig()
    assert ray_adapter.has_autoscaler()
    extract.validate_resources(cfg, extract.resolve_num_gpus(cfg))


def test_gpu_workers_that_start_at_zero_get_gpu_actors(monkeypatch):
    _cluster(monkeypatch, [{"CPU": 8.0}], [{"CPU": 16.0, "GPU": 1.0}])
    cfg = RunConfig()
    assert extract.resolve_num_gpus(cfg) == 1.0
    assert not extract.preprocess_in_actor(cfg, 1.0)  # GPU actors keep separate preprocessing tasks
    assert extract.preprocess_in_actor(cfg, 0.0)
    cfg.extract.preprocess = "tasks"
    assert not extract.preprocess_in_actor(cfg, 0.0)


def test_a_request_no_node_type_can_hold_is_refused(monkeypatch):
    _cluster(monkeypatch, [{"CPU": 0.0}], [{"CPU": 2.0}])
    cfg = RunConfig.model_validate({"extract": {"num_cpus_per_actor": 4}})
    with pytest.raises(ValueError, match=r"node type the autoscaler can launch \(\{'CPU': 2.0\}\)"):
        extract.validate_resources(cfg, 0.0)


def test_a_fixed_cluster_refuses_what_its_largest_node_cannot_hold(monkeypatch):
    _cluster(monkeypatch, [{"CPU": 0.0}, {"CPU": 2.0}], [])
    assert not ray_adapter.has_autoscaler()
    with pytest.raises(ValueError, match="largest node of the cluster has 2 CPUs and no autoscaler"):
        extract.validate_resources(RunConfig.model_validate({"extract": {"num_cpus_per_actor": 3}}), 0.0)
    with pytest.raises(ValueError, match="0 GPUs and no autoscaler can add one"):
        extract.validate_resources(RunConfig(), 1.0)
    # an autoscaler Ray cannot see (DATASEL_ASSUME_AUTOSCALER) still lifts the refusal
    _cluster(monkeypatch, [{"CPU": 0.0}, {"CPU": 2.0}], [], assume=True)
    extract.validate_resources(RunConfig(), 1.0)


def test_fits():
    assert ray_adapter.fits({"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0})
    assert not ray_adapter.fits({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0})


def _init_kwargs(monkeypatch, job_runtime_env: dict | None, env: dict) -> dict:
    import json

    seen = {}
    monkeypatch.setattr(ray_adapter.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_adapter.ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray_adapter.ray, "nodes", lambda: [])
    if job_runtime_env is None:
        monkeypatch.delenv(ray_adapter.RAY_JOB_CONFIG_JSON_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ray_adapter.RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps({"runtime_env": job_runtime_env}))
    monkeypatch.setattr(ray_adapter.console, "is_verbose", lambda: False)
    ray_adapter.ensure_ray(env=env)
    return seen


def test_storage_variables_reach_workers_and_never_clash_with_a_submitted_job(monkeypatch):
    env = {"AWS_ENDPOINT_URL": "http://s3.internal:9000", "AWS_REGION": "eu-west-1"}
    local = _init_kwargs(monkeypatch, None, env)
    assert local["runtime_env"]["env_vars"] == env
    assert "worker_process_setup_hook" in local["runtime_env"]
    # a job that sets the endpoint itself and its own hook: Ray refuses a field or variable set twice
    job = _init_kwargs(monkeypatch, {"env_vars": {"AWS_ENDPOINT_URL": "http://other:9000"},
                                     "worker_process_setup_hook": "x.y"}, env)
    assert job["runtime_env"] == {"env_vars": {"AWS_REGION": "eu-west-1"}}
    # everything already set by the job: no runtime_env argument at all
    assert "runtime_env" not in _init_kwargs(monkeypatch, {"env_vars": env, "worker_process_setup_hook": "x.y"}, env)
