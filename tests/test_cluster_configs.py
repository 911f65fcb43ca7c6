"""The shipped cluster and run configs parse, validate, and keep the settings that matter."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from datasel_ray.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
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
        path = f"{prefix}{field.alias or name}"  # the YAML key (pool.schema is the field pool.shape)
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


def test_launcher_runs_the_cluster_image():
    cfg = _load(CONFIGS / "gpu_cluster.yaml")
    assert _is_cluster_image(cfg["docker"]["image"])
    assert not any("torch==" in c for c in cfg["setup_commands"]), "torch comes from the image (Dockerfile)"
    assert any("pip install" in c and "--no-deps" in c and "~/datasel-ray" in c for c in cfg["setup_commands"])


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


# --- cluster image (Dockerfile) ----------------------------------------------------------------------------------


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    deps = _pyproject()["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(rf"{re.escape(name)}(?:\[[^\]]*\])?==(\S+)", d))]
    assert len(pins) == 1, f"pyproject.toml must pin {name}==X exactly once, found {pins}"
    return pins[0]


def _dockerfile() -> tuple[dict[str, str], list[str], str]:
    """``(ARG defaults, FROM lines, text)`` of the Dockerfile; continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    args = {}
    for line in lines:
        if line.split()[0].upper() == "ARG" and "=" in line:
            name, value = line.split(None, 1)[1].split("=", 1)
            assert name not in args, f"ARG {name} has two defaults"
            args[name] = value.strip()
    froms = [line for line in lines if line.split()[0].upper() == "FROM"]
    return args, froms, text


CLUSTER_IMAGE = f"datasel-ray:{_pyproject()['project']['version']}-cu128"


def _is_cluster_image(image: str) -> bool:
    """The image built from the Dockerfile, with or without the registry prefix the README's sed adds."""
    return image == CLUSTER_IMAGE or image.endswith(f"/{CLUSTER_IMAGE}")


def test_dockerfile_pins_agree_with_pyproject():
    specifiers = pytest.importorskip("packaging.specifiers")
    args, froms, _ = _dockerfile()
    assert args["RAY_VERSION"] == _pin("ray")
    assert args["TORCH_VERSION"] == _pin("torch")
    match = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert match, f"PYTHON_TAG must look like py311, got {args['PYTHON_TAG']!r}"
    python = f"3.{match.group(1)}"
    requires = specifiers.SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(f"{python}.0"), f"Python {python} is outside requires-python {requires}"
    assert f"PYTHON ?= python{python}" in (ROOT / "Makefile").read_text()


def test_dockerfile_builds_from_the_pinned_ray_image_for_either_variant():
    args, froms, text = _dockerfile()
    assert froms == ["FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"]
    assert args["VARIANT"] == "gpu" and args["CUDA"].startswith("cu")
    assert text.index("ARG RAY_VERSION=") < text.index("FROM ") < text.index("ARG TORCH_VERSION=")
    assert re.search(r"^ARG RAY_VERSION$", text, re.M) and re.search(r"^ARG VARIANT$", text, re.M), \
        "ARGs used after FROM must be declared again after it"
    run = text[text.index("RUN "):]
    assert 'gpu) index="${CUDA}"' in run and "cpu) index=cpu" in run
    assert 'torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${index}"' in run
    assert run.index("torch==${TORCH_VERSION}") < run.index("pip install --no-cache-dir -e .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_every_cluster_config_runs_the_cluster_image():
    for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml"):
        doc = _load(KUBERAY / name)
        spec = doc["spec"]["rayClusterSpec"] if "rayClusterSpec" in doc["spec"] else doc["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images = {c["image"] for g in groups for c in _containers(g)}
        assert len(images) == 1 and _is_cluster_image(images.pop()), name
        assert "Dockerfile" in (KUBERAY / name).read_text().split("apiVersion")[0], name
        assert spec["rayVersion"] == _pin("ray")
    readme = (ROOT / "README.md").read_text()
    assert "docker build" in readme and "--build-arg VARIANT=cpu" in readme and "docker push" in readme


def test_rayjob_head_pod_holds_the_driver_in_16_gib():
    doc = _load(KUBERAY / "rayjob.yaml")
    head = _containers(doc["spec"]["rayClusterSpec"]["headGroupSpec"])[0]
    assert head["resources"]["limits"]["memory"] == "16Gi"
    header = (KUBERAY / "rayjob.yaml").read_text().split("apiVersion")[0]
    assert "16 GiB" in header and "driver" in header


def test_dockerfile_copies_the_package_before_entering_it():
    _, _, text = _dockerfile()
    assert text.index("COPY --chown=ray . /home/ray/datasel-ray") < text.index("WORKDIR /home/ray/datasel-ray")
