"""The shipped cluster and run configs parse, validate, and keep the settings that matter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from datasel_ray.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "cluster_configs"
RUN_CONFIGS = ("example_run.yaml", "local.yaml", "gpu_run.yaml")
KUBERAY = CONFIGS / "kuberay"


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} must hold a mapping"
    return data


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` and of its nested pydantic sections, as dotted paths."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths.extend(_field_paths(annotation, f"{path}."))
    return paths


def _has_path(data: dict, dotted: str) -> bool:
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["template"]["spec"]["containers"]


def _gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict) -> None:
    """Autoscaling on, a head group, a GPU worker group with a sane replica range, images everywhere."""
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    assert all(c.get("image") for c in _containers(head))
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpu_limit(c) >= 1 for c in _containers(g))]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in spec["workerGroupSpecs"]:
        assert "rayStartParams" in group
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert all(c.get("image") for c in _containers(group))
    for group in gpu_groups:
        for container in _containers(group):
            requests = container["resources"]["requests"].get("nvidia.com/gpu", 0)
            assert int(requests) == _gpu_limit(container)


# --- run configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_run_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)


def test_example_run_mentions_every_field():
    data = _load(CONFIGS / "example_run.yaml")
    missing = [path for path in _field_paths(RunConfig) if not _has_path(data, path)]
    assert not missing, f"example_run.yaml lacks: {missing}"


def test_example_run_holds_the_defaults():
    assert load_config(CONFIGS / "example_run.yaml") == RunConfig()


def test_example_run_comments_every_option():
    """Each option line carries a one-line comment."""
    for line in (CONFIGS / "example_run.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in stripped, f"uncommented option: {line!r}"


def test_local_config_is_cpu_only_with_the_tiny_model():
    cfg = load_config(CONFIGS / "local.yaml")
    assert cfg.model.name_or_path == "tiny"
    assert cfg.pool.path == "runs/pool/pool.json"
    assert cfg.ray.num_cpus == 2 and cfg.ray.address is None
    assert cfg.extract.num_gpus_per_actor == 0
    assert cfg.tive.use_gpu is False


def test_gpu_run_config():
    cfg = load_config(CONFIGS / "gpu_run.yaml")
    assert cfg.model.name_or_path == "llava-hf/llava-1.5-7b-hf"
    assert cfg.extract.num_gpus_per_actor == 1
    assert (cfg.extract.min_actors, cfg.extract.max_actors) == (1, 8)
    assert cfg.pool.path.startswith("s3://") and cfg.run_dir.startswith("s3://")
    assert cfg.tive.enabled and cfg.tive.proj_dim == 8192


# --- Ray cluster launcher ------------------------------------------------------------------------------------


def test_launcher_config_structure():
    cfg = _load(CONFIGS / "gpu_cluster.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert cfg["max_workers"] >= 1
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types, "no node type with resources.GPU >= 1"
    for name, node_type in types.items():
        if name == cfg["head_node_type"]:
            continue
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cfg["max_workers"]
    assert max(t["max_workers"] for t in gpu_types) >= load_config(CONFIGS / "gpu_run.yaml").extract.max_actors
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])
    assert "." in cfg["file_mounts"].values()


def test_launcher_installs_cuda_torch_then_the_package():
    commands = _load(CONFIGS / "gpu_cluster.yaml")["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
    assert "download.pytorch.org/whl/cu" in commands[torch_at]
    package_at = next(i for i, c in enumerate(commands) if "pip install" in c and "datasel-ray" in c)
    assert torch_at < package_at


def test_launcher_config_passes_ray_schema():
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(_load(CONFIGS / "gpu_cluster.yaml")))


# --- KubeRay ---------------------------------------------------------------------------------------------------


def test_raycluster():
    doc = _load(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_ray_cluster_spec(doc["spec"])


def test_rayjob():
    doc = _load(KUBERAY / "rayjob.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert "datasel run --config cluster_configs/gpu_run.yaml" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayservice():
    doc = _load(KUBERAY / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    apps = serve_config["applications"]
    app = next(a for a in apps if a["import_path"] == "serve.app:build_app")
    assert app["args"]["run_dir"]
    assert set(app["args"]) <= {"run_dir", "num_gpus", "max_batch_size", "batch_wait_timeout_s",
                                "autoscaling_config", "auth_token_env"}
    _check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])


def test_rayservice_serve_config_passes_serve_schema():
    schema = pytest.importorskip("ray.serve.schema")
    serve_config = yaml.safe_load(_load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.parse_obj(serve_config)


def test_rayservice_token_env_is_set_on_gpu_workers():
    doc = _load(KUBERAY / "rayservice.yaml")
    token_env = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]["auth_token_env"]
    for group in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for container in _containers(group):
            assert token_env in {e["name"] for e in container.get("env", [])}


def test_rayservice_args_validate_as_serve_options():
    serve_app = pytest.importorskip("serve.app")
    serve_config = yaml.safe_load(_load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    options = serve_app.ServeOptions.model_validate(serve_config["applications"][0]["args"])
    assert options.num_gpus == 1 and options.autoscaling_config["max_replicas"] >= 1
