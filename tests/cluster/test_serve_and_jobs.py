"""A finished run on object storage, served and re-run on the multi-node cluster (#23, item 5, last two bullets).

One module cluster (``multinode_cluster``: a 0-CPU head, two worker nodes of 2 logical CPUs with their own
DATASEL_HOME, the head with a dashboard for the Jobs API) and one ``datasel run`` with pool, images and run
directory on the session's S3 server, driven from outside the cluster (``cluster_run``, module scope; named apart
from conftest's one-node ``reference_run``):

* the scoring app (``serve/app.py``) for that ``s3://runs/...``, started by a driver of the cluster with one HTTP
  proxy, on the head (``proxy_location: HeadOnly``; with Serve's default every replica node gets a proxy too),
  answers ``POST /score`` with the scores of the in-process :class:`Scorer` on the same run, field by field; its
  replicas run on worker nodes, which fetch the run's model copy (``models/<sha256>``) and never build one;
* ``datasel run`` of the same config, submitted with the Jobs API (``JobSubmissionClient``, a ``working_dir``
  runtime environment) to the head, succeeds and selects the same ids as ``cluster_run``. This test replaces
  the single-node ``tests/pipeline/test_job_submission.py`` (every check of that one is made here too).

``cluster_run``'s driver uses the session's DATASEL_HOME, where ``tiny_model_dir`` holds the tiny model built
once per session (a build takes ~95 s here); the job's driver runs on the head, whose DATASEL_HOME gets a copy of
that build beforehand, as a head image with the model baked in would have. Worker nodes never get one.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cluster_helpers import REPO, manifest, read_selections, run_datasel, run_driver

pytestmark = pytest.mark.integration

# a dashboard (Jobs API) on the head; a runtime-env folder per node, as on separate machines (harness.Harness)
CLUSTER_OPTIONS = {"workers": 2, "cpus": 2, "dashboard": True, "own_runtime_env_dirs": True}
METHODS = ["coincide", "datatailor", "random"]
# the S3 server is the session's: prefixes of this module only
POOL_URI = "s3://pools/serve-jobs"
RUN_URI = "s3://runs/serve-jobs-ref"
JOB_RUN_URI = "s3://runs/serve-jobs-job"
MODEL_BUILD = "tiny-llava-v1"  # the folder a build of the tiny model makes under DATASEL_HOME
APP = "datasel"


def _config(pool_dir: str, run_dir: str, ray: dict) -> dict:
    """The config of ``test_object_storage_run``: demo config, tiny model, no TIVE, three methods."""
    from datasel_ray.demo import demo_config

    data = demo_config(Path("/unused"), Path("/unused/pool.json"), tive=False, seed=5).model_dump(mode="json")
    data["run_dir"] = run_dir
    data["pool"]["path"] = f"{pool_dir}/pool.json"
    data["pool"]["image_root"] = pool_dir
    data["extract"]["max_actors"] = 2
    data["model"]["name_or_path"] = "tiny"
    data["tive"]["enabled"] = False
    data["select"]["methods"] = METHODS
    data["ray"] = ray
    return data


class ClusterRun:
    """``cluster_run``: its pool (the local copy), config, manifest, selections and seconds."""

    def __init__(self, pool_info, config: dict, manifest: dict, selections: dict, seconds: float):
        self.pool_info = pool_info
        self.config = config
        self.manifest = manifest
        self.selections = selections
        self.seconds = seconds


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, s3_endpoint, multinode_cluster, tiny_model_dir) -> ClusterRun:
    """``datasel run`` of 300 generated rows with pool and run directory on S3, driven from outside the cluster."""
    from datasel_ray.synthetic import SynthConfig, generate_pool

    cluster = multinode_cluster
    tmp = tmp_path_factory.mktemp("serve-jobs")
    info = generate_pool(tmp / "pool", SynthConfig(num_samples=300, seed=11, bad_rate=0.04))
    s3_endpoint.upload_dir(info.image_root, POOL_URI)
    s3_endpoint.create_bucket("runs")
    data = _config(POOL_URI, RUN_URI, {"address": cluster.address, "num_cpus": None})
    cfg = tmp / "ref.yaml"
    cfg.write_text(yaml.safe_dump(data))
    # the driver resolves the model: the session's home holds the tiny build (tiny_model_dir); nodes keep theirs
    env = {**cluster.env, "DATASEL_HOME": str(Path(tiny_model_dir).parent)}
    result = run_datasel(cfg, env, timeout=420)
    print(f"datasel run (multi-node, S3): {result.seconds:.0f} s")
    assert result.rc == 0, result.tail()
    man = manifest(RUN_URI, s3_endpoint)
    for phase in data["phases"]:
        assert man["phases"][phase]["status"] == "done", (phase, man["phases"].get(phase))
    assert man.get("model_copy", {}).get("sha256"), man.get("model_copy")
    sel = read_selections(RUN_URI, s3_endpoint)
    assert sorted(sel) == sorted(METHODS) and all(sel[m].size > 0 for m in METHODS), {m: v.size for m, v in sel.items()}
    return ClusterRun(info, data, man, sel, result.seconds)


# --- Serve ---------------------------------------------------------------------------------------------------------

# A driver of the cluster: Serve with one HTTP proxy, on the head (proxy_location HeadOnly; a free port, retried if
# the proxy loses the race for it), the scoring app for the run; prints the port, the proxies and the replicas
# (node ids from the controller's instance details). The app outlives this driver (Serve's actors are detached).
_SERVE_START = """
import json, sys, ray
from ray import serve
from ray.serve.context import _get_global_client
from datasel_ray.ports import pick_unbound_ports
from serve.app import build_app

app_name, options = sys.argv[1], json.loads(sys.argv[2])
ray.init(logging_level="ERROR")  # RAY_ADDRESS names the cluster
for attempt in range(5):
    port = pick_unbound_ports(1, "127.0.0.1")[0]
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        break
    except Exception as err:
        serve.shutdown()
        if attempt == 4:
            raise
serve.run(build_app(options), name=app_name, route_prefix="/", blocking=False)  # returns once RUNNING
details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
deployments = details["applications"][app_name]["deployments"]
replicas = [{"node_id": r["node_id"], "state": str(r["state"]), "pid": r.get("pid")}
            for d in deployments.values() for r in d["replicas"]]
proxies = {node: str(p["status"]) for node, p in (details.get("proxies") or {}).items()}
status = serve.status().applications[app_name]
print(json.dumps({"port": port, "replicas": replicas, "proxies": proxies, "app_status": str(status.status),
                  "proxy_location": str(details.get("proxy_location"))}))
"""

# Shut Serve down from another driver; then nothing of Serve is left: no controller, no live Serve actor.
_SERVE_STOP = """
import json, ray
from ray import serve
from ray.util.state import list_actors
ray.init(logging_level="ERROR")
serve.shutdown()
try:
    ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    controller = True
except ValueError:
    controller = False
left = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if "Serve" in a.class_name or "Proxy" in a.class_name]
print(json.dumps({"controller": controller, "serve_actors": left}))
"""


def _last_json(result) -> dict:
    assert result.rc == 0, result.tail()
    return json.loads(result.stdout.strip().splitlines()[-1])


def _request_samples(info) -> list[dict]:
    """Good pool rows as a client sends them: four with an image path (relative to the pool's image root on S3),
    two text-only, and the first image row again with its image as base64 (and its task, as base64 needs)."""
    from datasel_ray.synthetic import load_ground_truth

    pool = json.loads(Path(info.pool_path).read_text())
    truth = load_ground_truth(info.ground_truth_path)
    good = [(r, t) for r, t in zip(pool, truth) if not t["bad_kind"]]
    with_image = [(r, t) for r, t in good if r.get("image")]
    text_only = [r for r, t in good if not r.get("image")]
    # images from four different task folders
    picked, folders = [], set()
    for r, t in with_image:
        folder = r["image"].split("/", 1)[0]
        if folder not in folders:
            folders.add(folder)
            picked.append((r, t))
        if len(picked) == 4:
            break
    assert len(picked) == 4 and len(text_only) >= 2
    first, first_truth = picked[0]
    encoded = base64.b64encode((Path(info.image_root) / first["image"]).read_bytes()).decode()
    b64 = {"id": f"{first['id']}-b64", "task": first_truth["task"], "image_base64": encoded,
           "conversations": first["conversations"]}
    return [r for r, _ in picked] + text_only[:2] + [b64]


def _assert_same_scores(served: list[dict], direct: list[dict]) -> None:
    """Field by field, as tests/serve/test_app.py compares served and batch scores."""
    assert len(served) == len(direct)
    for a, b in zip(served, direct):
        assert sorted(a) == sorted(b), (a.keys(), b.keys())
        for key in ("index", "id", "task", "task_source"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key, value in b["features"].items():
            if isinstance(value, float):
                assert a["features"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (b["id"], key)
            else:
                assert a["features"][key] == value, (b["id"], key)
        for method in ("coincide", "datatailor"):
            assert sorted(a[method]) == sorted(b[method]), (method, a[method].keys(), b[method].keys())
            for key, value in b[method].items():
                if isinstance(value, float):
                    assert a[method][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (b["id"], method, key)
                elif key == "centrality_rank":  # a rank among near-equal distances may move by one
                    assert abs(a[method][key] - value) <= 1, (b["id"], method, key)
                else:
                    assert a[method][key] == value, (b["id"], method, key)


def _node_models(home: str) -> list[str]:
    """Complete model copies under a node's DATASEL_HOME/models (temp folders of a download left out)."""
    models = Path(home) / "models"
    return sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) if models.is_dir() else []


def _assert_no_build_on_workers(cluster, sha: str) -> None:
    for node in cluster.workers:
        home = Path(node["home"])
        assert not (home / MODEL_BUILD).exists(), f"worker node {node['index']} built the model: {home / MODEL_BUILD}"
        assert _node_models(node["home"]) in ([], [sha]), (node["index"], _node_models(node["home"]), sha)


@pytest.mark.timeout(600)  # measured 160-250 s: ~30 s cluster + 80-180 s cluster_run (fixtures) + 40-70 s here
def test_serve_on_worker_nodes_reads_the_run_from_object_storage(cluster_run, multinode_cluster, s3_endpoint,
                                                                  monkeypatch, tmp_path):
    import httpx

    from datasel_ray.scoring import Scorer

    cluster = multinode_cluster
    started = time.monotonic()
    sha = cluster_run.manifest["model_copy"]["sha256"]
    head_id = next(n["node_id"] for n in cluster.nodes if n["index"] is None)
    worker_ids = {n["node_id"]: n for n in cluster.alive_workers()}
    assert cluster_run.manifest["config"]["model"]["shared"]["sha256"] == sha, cluster_run.manifest["config"]

    # the run's extraction actors loaded the model copy on the worker nodes and built nothing there
    _assert_no_build_on_workers(cluster, sha)
    # forget those copies: the replicas must fetch the run's copy themselves
    for node in cluster.workers:
        shutil.rmtree(Path(node["home"]) / "models", ignore_errors=True)

    options = {"run_dir": RUN_URI, "num_replicas": 2, "num_cpus": 1, "max_batch_size": 8}
    try:
        up = _last_json(run_driver(_SERVE_START, cluster.env, timeout=300, args=(APP, json.dumps(options))))
        print(f"serve up after {time.monotonic() - started:.0f} s: {up}")
        assert up["app_status"].endswith("RUNNING"), up
        assert list(up["proxies"]) == [head_id], f"one HTTP proxy, on the head {head_id}: {up['proxies']}"
        assert len(up["replicas"]) == 2 and all(r["state"].endswith("RUNNING") for r in up["replicas"]), up
        replica_nodes = {r["node_id"] for r in up["replicas"]}
        assert replica_nodes <= set(worker_ids), f"replicas on {replica_nodes}, worker nodes {set(worker_ids)}"

        samples = _request_samples(cluster_run.pool_info)
        with httpx.Client(base_url=f"http://127.0.0.1:{up['port']}", timeout=120) as client:
            deadline = time.monotonic() + 60
            while True:  # the proxy may still be coming up
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the Serve proxy on the head never answered /healthz"
                time.sleep(0.5)
            info = client.get("/info").json()
            r = client.post("/score", json={"samples": samples})
            assert r.status_code == 200, r.text
            served = r.json()
            # a bad request is refused by the replica, not lost between nodes
            bad = client.post("/score", json={"samples": [{"image": "gqa/no-such.png",
                                                           "conversations": samples[0]["conversations"]}]})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "samples[0].image", bad.text
        assert info["run_dir"] == RUN_URI and info["image_roots"] == [POOL_URI], info
        assert sorted(info["methods"]) == ["coincide", "datatailor"], info
        # the manifest's run id ("" while a fresh run's manifest lacks one: share_model writes it before init)
        assert served["run_id"] == info["run_id"] == cluster_run.manifest.get("run_id", "")
        results = served["results"]
        assert len(results) == len(samples)
        assert all(res["features"]["n_image_tokens"] > 0 for res in results[:4] + results[6:]), results
        assert all(res["features"]["n_image_tokens"] == 0 for res in results[4:6]), results

        # the batch path: the in-process scorer on the same run, in this process (S3 variables, a home of its own)
        for name, value in {**s3_endpoint.env, "DATASEL_HOME": str(tmp_path / "home-test")}.items():
            monkeypatch.setenv(name, value)
        direct = Scorer(RUN_URI).score_records(samples)
        _assert_same_scores(results, direct)
        # pool rows are recognised as the run's rows: the replicas computed the features extraction did
        assert all(res["datatailor"]["rule"] == "pool_row" for res in results), [
            (res["id"], res["datatailor"]["rule"]) for res in results]

        # replica nodes fetched the run's copy (sha256 checked), and no worker node holds a build
        for node_id in replica_nodes:
            assert _node_models(worker_ids[node_id]["home"]) == [sha], (node_id, worker_ids[node_id]["home"])
        _assert_no_build_on_workers(cluster, sha)
    finally:  # Serve's actors are detached: they would outlive this test
        stop = run_driver(_SERVE_STOP, cluster.env, timeout=120)
    stopped = _last_json(stop)
    assert stopped == {"controller": False, "serve_actors": []}, stopped
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{up['port']}/healthz", timeout=5)
    print(f"serve test: {time.monotonic() - started:.0f} s after cluster_run")


# --- ray job submit ------------------------------------------------------------------------------------------------

def _submit_when_ready(client, **kwargs) -> str:
    """Submit once the head's job agent is up (a fresh head answers 500 'No available agent' for a while)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


@pytest.mark.timeout(600)  # measured ~70 s after the serve test; ~250 s when it runs alone (fixtures)
def test_run_submitted_as_a_ray_job_to_the_multinode_head(cluster_run, multinode_cluster, s3_endpoint,
                                                          tiny_model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster = multinode_cluster
    assert cluster.dashboard_url, "the module's cluster starts its head with a dashboard (CLUSTER_OPTIONS)"
    started = time.monotonic()
    head = next(n for n in cluster.nodes if n["index"] is None)
    # the job's driver runs on the head and resolves the model there: the head's home gets the session's build
    shutil.copytree(tiny_model_dir, Path(head["home"]) / MODEL_BUILD, dirs_exist_ok=True)

    # same config, another run directory, no ray.address: the job's driver joins the cluster it runs in (RAY_ADDRESS)
    data = {**cluster_run.config, "run_dir": JOB_RUN_URI, "ray": {"address": None, "num_cpus": None}}
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(data))

    client = JobSubmissionClient(cluster.dashboard_url)
    # the nodes' environment carries the S3 settings; the working_dir is uploaded once and unpacked on every node
    job_id = _submit_when_ready(
        client, entrypoint=f"{sys.executable} -m datasel_ray.cli run --config {cfg_path} --quiet",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", ".git", "runs", "benchmarks/results"]})
    deadline = time.monotonic() + 420
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        client.stop_job(job_id)
    print(f"job {job_id}: {status} after {time.monotonic() - started:.0f} s")
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    info = client.get_job_info(job_id)
    assert info.driver_node_id == head["node_id"], (info.driver_node_id, head["node_id"])

    man = manifest(JOB_RUN_URI, s3_endpoint)
    for phase in data["phases"]:
        assert man["phases"][phase]["status"] == "done", (phase, man["phases"].get(phase))
    assert man["model_copy"]["sha256"] == cluster_run.manifest["model_copy"]["sha256"], man["model_copy"]
    samples = man["phases"]["ingest"]["result"]["samples"]
    assert samples == cluster_run.manifest["phases"]["ingest"]["result"]["samples"]
    budget = round(data["select"]["budget"] * samples)
    selections = read_selections(JOB_RUN_URI, s3_endpoint)
    assert sorted(selections) == sorted(METHODS), list(selections)
    root = s3_endpoint.location(JOB_RUN_URI) / "selections"
    for method in METHODS:
        ids = selections[method]
        assert 0 < ids.size <= budget and np.all(np.diff(ids) > 0), (method, ids.size, budget)
        assert (root / method / "summary.json").read_json()["budget_rows"] == budget
        np.testing.assert_array_equal(ids, cluster_run.selections[method],
                                      err_msg=f"{method}: the submitted job selected other ids than datasel run")
    assert selections["random"].size == budget
    _assert_no_build_on_workers(cluster, man["model_copy"]["sha256"])
