"""Serve's direct ingress (``datasel serve --direct-ingress``): replica addresses from the controller's target groups,
the guard against enabling it too late, and a replica answering ``POST /score`` on its own port with the scores of
the in-process scorer (a second local Ray in a subprocess: the variable must be set where Ray starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.app import APP_NAME, DIRECT_INGRESS_ENV, enable_direct_ingress, replica_urls

REPO = Path(__file__).resolve().parents[2]


def test_replica_urls_lists_the_apps_http_targets_only():
    details = {"target_groups": [
        {"protocol": "HTTP", "app_name": "", "route_prefix": "/", "targets": [{"ip": "10.0.0.1", "port": 8000}]},
        {"protocol": "HTTP", "app_name": APP_NAME, "route_prefix": "/",
         "targets": [{"ip": "10.0.0.2", "port": 30000}, {"ip": "10.0.0.3", "port": 30001}]},
        {"protocol": "gRPC", "app_name": APP_NAME, "route_prefix": "/", "targets": [{"ip": "10.0.0.2", "port": 40000}]},
        {"protocol": "HTTP", "app_name": "other", "route_prefix": "/o", "targets": [{"ip": "10.0.0.4", "port": 30002}]},
    ]}
    assert replica_urls(APP_NAME, details) == ["http://10.0.0.2:30000", "http://10.0.0.3:30001"]
    assert replica_urls(APP_NAME, {**details, "http_options": {"host": "0.0.0.0"}}) == \
        ["http://10.0.0.2:30000", "http://10.0.0.3:30001"]
    # replicas answer only on the address Serve binds when it names one
    assert replica_urls(APP_NAME, {**details, "http_options": {"host": "127.0.0.1"}}) == \
        ["http://127.0.0.1:30000", "http://127.0.0.1:30001"]
    assert replica_urls("missing", details) == []
    assert replica_urls(APP_NAME, {}) == []


def test_enabling_after_ray_started_is_refused(ray_local, monkeypatch):
    monkeypatch.delenv(DIRECT_INGRESS_ENV, raising=False)
    with pytest.raises(RuntimeError, match=DIRECT_INGRESS_ENV):
        enable_direct_ingress()
    assert DIRECT_INGRESS_ENV not in os.environ


SCRIPT = """
import json, sys
import httpx
from serve.app import APP_NAME, build_app, enable_direct_ingress, start_http, wait_for_replica_urls
enable_direct_ingress()
import ray
from ray import serve
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
try:
    proxy_port = start_http("127.0.0.1")
    serve.run(build_app({"run_dir": sys.argv[1], "max_batch_size": 4, "auth_token_env": None}), name=APP_NAME,
              route_prefix="/", blocking=False)
    urls = wait_for_replica_urls()
    r = httpx.post(urls[0] + "/score", json={"samples": json.loads(sys.argv[2])}, timeout=120)
    print("RESULT " + json.dumps({"urls": urls, "proxy_port": proxy_port, "status": r.status_code, "body": r.json()}))
finally:
    serve.shutdown()
    ray.shutdown()
"""


@pytest.mark.integration
def test_a_replica_scores_on_its_own_port_as_in_process(demo_run, records, tmp_path):
    from datasel_ray.scoring import Scorer

    cfg, _ = demo_run
    records = records[:3]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", DIRECT_INGRESS_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg.run_dir), json.dumps(records)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert len(got["urls"]) == 1 and not got["urls"][0].endswith(f":{got['proxy_port']}")
    assert got["status"] == 200, got["body"]
    expected = Scorer(cfg.run_dir).score_records(records)
    served = got["body"]["results"]
    assert [r["id"] for r in served] == [r["id"] for r in expected]
    for a, b in zip(served, expected):
        assert a["task"] == b["task"]
        for method in ("coincide", "datatailor"):
            assert a[method]["cluster"] == b[method]["cluster"]
            for key, value in b[method].items():
                if isinstance(value, float):
                    assert a[method][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (method, key)
                else:
                    assert a[method][key] == value, (method, key)
