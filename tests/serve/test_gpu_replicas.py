"""GPU serve replicas: the deployment options built from the shipped serve config with ``num_gpus: 1``."""

from __future__ import annotations

from pathlib import Path

import pytest

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve" / "serve_config.yaml"


@pytest.mark.gpu
def test_gpu_replicas_request_one_gpu_each_and_fit_this_machine(tmp_path):
    import torch

    from serve.app import ScoringService, ServeOptions, deployment_options, load_options

    args = load_options(str(tmp_path / "run"), str(SERVE_CONFIG))
    options = ServeOptions.model_validate({**args, "num_gpus": 1})
    built = deployment_options(options)
    assert built["ray_actor_options"] == {"num_gpus": 1.0, "num_cpus": options.num_cpus}
    assert built["autoscaling_config"] == args["autoscaling_config"]
    deployment = ScoringService.options(**built)
    assert deployment.ray_actor_options["num_gpus"] == 1.0
    assert torch.cuda.device_count() >= built["ray_actor_options"]["num_gpus"]  # a replica can be placed here
