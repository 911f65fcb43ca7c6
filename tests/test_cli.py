"""The command line: clear errors that name the field, and the phase commands on a tiny pool."""

from __future__ import annotations

import json

import pytest

from datasel_ray.cli import main


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if anything tries to start or join Ray (refusals come before the cluster)."""
    from datasel_ray.pipeline import ray_adapter

    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray_adapter, "ensure_ray", refuse)


def test_unknown_method_names_the_choices(tmp_path, capsys):
    code = main(["select", "--run-dir", str(tmp_path / "run"), "--method", "coincid"])
    err = capsys.readouterr().err
    assert code == 2
    assert "select.methods" in err and "Unknown method 'coincid'. Choose from: coincide, datatailor" in err


def test_bad_override_names_the_field(tmp_path, capsys):
    code = main(["extract", "--run-dir", str(tmp_path / "run"), "--set", "extract.batch_size=zero"])
    err = capsys.readouterr().err
    assert code == 2 and "extract.batch_size" in err


def test_missing_pool_is_refused_before_work(tmp_path, capsys, no_ray):
    code = main(["ingest", "--run-dir", str(tmp_path / "run"), "--pool", str(tmp_path / "missing.json")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_impossible_gpu_request_is_refused_before_work(tmp_path, capsys, ray_local, demo_pool):
    code = main(["run", "--run-dir", str(tmp_path / "run"), "--set", f"pool.path={demo_pool.pool_path}",
                 "--set", "extract.num_gpus_per_actor=4"])
    err = capsys.readouterr().err
    assert code == 2 and "extract.num_gpus_per_actor=4" in err and "largest node" in err
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.parametrize("setting,message", [("tive.use_gpu=true", "tive.use_gpu"),
                                             ("tive.num_workers=64", "tive.num_workers=64")])
def test_impossible_warmup_is_refused_before_work(tmp_path, capsys, ray_local, demo_pool, setting, message):
    code = main(["run", "--run-dir", str(tmp_path / "run"), "--set", f"pool.path={demo_pool.pool_path}",
                 "--set", "tive.enabled=true", "--set", setting])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "run" / "samples").exists()


def test_tive_without_warmup_phase_is_refused(tmp_path, capsys, no_ray, demo_pool):
    code = main(["run", "--run-dir", str(tmp_path / "run"), "--set", f"pool.path={demo_pool.pool_path}",
                 "--set", "tive.enabled=true", "--set", "phases=[ingest,extract]"])
    err = capsys.readouterr().err
    assert code == 2 and "phases" in err and "warmup" in err, err


def test_tive_method_without_tive_is_refused(tmp_path, capsys, no_ray, demo_pool):
    code = main(["run", "--run-dir", str(tmp_path / "run"), "--set", f"pool.path={demo_pool.pool_path}",
                 "--set", "select.methods=[tive]"])
    assert code == 2 and "tive.enabled" in capsys.readouterr().err


def test_synth_and_status(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "pool"), "--num-samples", "40", "--format", "jsonl"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 40 and info["pool"].endswith("pool.jsonl")
    assert main(["status", str(tmp_path / "nothing")]) == 0
    assert "no manifest.json" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["ingest", "extract", "aggregate", "select", "run", "demo", "serve", "report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: datasel" in capsys.readouterr().out
