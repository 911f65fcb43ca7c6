"""One node on local disk against a head plus worker nodes on object storage, side by side in one run.

The same generated pool (``--rows``, tiny model, TIVE off) and the same total logical CPUs run:

(a) ``local``: ``datasel run`` with its own local Ray of ``workers x cpus`` CPUs, pool and run directory on
    local disk;
(b) ``multinode_s3``: a 0-CPU head plus ``--workers`` worker nodes of ``--cpus`` CPUs
    (``tests/cluster/harness.py``, each node with its own DATASEL_HOME), pool, images and run directory on moto's
    S3 server on 127.0.0.1, reached through a byte-counting TCP proxy;
(c) ``node_loss``: (b) again with worker 0 removed once two feature shards exist (a worker of the same size is
    added back at once), selections compared with (b);
(d) ``autoscaling`` (unless ``--skip-autoscaling``): Ray's fake multi-node provider behind a 0-CPU head, one
    worker type of ``--cpus`` CPUs from zero to 3 nodes: nodes launched, seconds from submit to the first node and
    to the first feature shard written while a second node is up, nodes left after the idle timeout.

Each run's driver gets a fresh DATASEL_HOME, so every run builds the tiny model once in its driver (the build is in
both (a) and (b)); worker nodes never build (counted: ``model_builds``). Per phase: seconds from the manifests,
and for (b) bytes sent to (``up``) and received from (``down``) the S3 server, attributed by the phases' start and
finish times (one-second resolution). On this 2-CPU machine logical CPUs exceed the physical ones: the ratio says
what the object-storage path and the multi-node machinery cost, never a multi-node speed-up.

    python benchmarks/bench_cluster.py [--rows 2000] [--workers 2] [--cpus 2] [--skip-autoscaling] [--no-save]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "cluster"))
sys.path.insert(0, str(HERE))

from cluster_helpers import (feature_shards, local_env, manifest, read_selections, run_datasel,  # noqa: E402
                             start_datasel, start_s3_server)
from harness import start_cluster  # noqa: E402
from record import emit_record  # noqa: E402

METHODS = ["coincide", "datatailor", "random"]
TINY_BUILD = "tiny-llava-v1"


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target``: counts bytes client->server (``up``: requests and uploads)
    and server->client (``down``: responses and downloads), and samples both every ``interval`` seconds."""

    def __init__(self, target: tuple[str, int], interval: float = 0.5):
        self.target = target
        self.up = self.down = 0
        self.lock = threading.Lock()
        self.samples: list[tuple[float, int, int]] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _sample(self, interval: float) -> None:
        while not self.stopped.wait(interval):
            with self.lock:
                self.samples.append((time.time(), self.up, self.down))

    def between(self, start: float, end: float) -> dict:
        """Bytes up / down from the last sample at or before ``start`` to the first at or after ``end``."""
        before = [s for s in self.samples if s[0] <= start] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= end] or self.samples[-1:]
        return {"up": after[0][1] - before[-1][1], "down": after[0][2] - before[-1][2]}

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


def _config(pool: str, run_dir: str, ray: dict) -> dict:
    from datasel_ray.demo import demo_config

    data = demo_config(Path("/unused"), Path("/unused/pool.json"), tive=False, seed=5).model_dump(mode="json")
    data["run_dir"] = run_dir
    data["pool"]["path"] = f"{pool}/pool.json"
    data["pool"]["image_root"] = pool
    data["extract"].update({"max_actors": 2, "shard_rows": 64})
    data["select"]["methods"] = METHODS
    data["ray"] = ray
    return data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _stamp(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def _phases(m: dict, proxy: CountingProxy | None = None) -> dict:
    out = {}
    for name, entry in m.get("phases", {}).items():
        row = {"seconds": entry.get("seconds"), "status": entry.get("status")}
        if proxy is not None and entry.get("started") and entry.get("finished"):
            # manifest times have one-second resolution: widen the window by a second at each end
            row["s3_bytes"] = proxy.between(_stamp(entry["started"]) - 1, _stamp(entry["finished"]) + 1)
        out[name] = row
    return out


def _builds(homes: list[str]) -> int:
    return sum(1 for h in homes if (Path(h) / TINY_BUILD).is_dir())


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[m], b[m]) for m in a)


def run(args) -> dict:
    from datasel_ray.synthetic import SynthConfig, generate_pool

    work = Path(tempfile.mkdtemp(prefix="dsb", dir="/tmp"))
    total_cpus = args.workers * args.cpus
    metrics: dict = {}
    info = generate_pool(work / "pool", SynthConfig(num_samples=args.rows, seed=3, bad_rate=0.04))
    pool = str(info.pool_path.parent)

    # (a) one local node, local disk
    home_a = work / "home-local"
    result = run_datasel(_write(work / "local.yaml", _config(pool, str(work / "run-local"),
                                                             {"address": None, "num_cpus": total_cpus})),
                         local_env(home_a), timeout=args.timeout)
    assert result.rc == 0, result.tail()
    m_local = manifest(work / "run-local")
    metrics["local"] = {"wall_s": round(result.seconds, 1), "phases": _phases(m_local),
                        "model_builds": _builds([str(home_a)])}
    reference = read_selections(work / "run-local")

    s3 = start_s3_server(work / "moto.log")
    proxy = CountingProxy(("127.0.0.1", int(s3.url.rsplit(":", 1)[1])))
    env = {**os.environ, **s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    cluster = None
    try:
        s3.upload_dir(pool, "s3://pools/gen")
        s3.create_bucket("runs")
        cluster = start_cluster(work / "cluster", env, workers=args.workers, cpus=args.cpus)
        node_homes = [n["home"] for n in cluster.nodes]

        # (b) head + workers, object storage
        home_b = work / "home-driver-b"
        driver_env = {**env, "RAY_ADDRESS": cluster.address, "DATASEL_HOME": str(home_b)}
        ray = {"address": cluster.address, "num_cpus": None}
        result = run_datasel(_write(work / "s3.yaml", _config("s3://pools/gen", "s3://runs/b", ray)), driver_env,
                             timeout=args.timeout)
        assert result.rc == 0, result.tail()
        m_s3 = manifest("s3://runs/b", s3)
        wall_b = result.seconds
        selections_b = read_selections("s3://runs/b", s3)
        metrics["multinode_s3"] = {
            "wall_s": round(wall_b, 1), "phases": _phases(m_s3, proxy),
            "model_builds": _builds([str(home_b), *node_homes]),
            "model_builds_on_workers": _builds(node_homes),
            "selections_equal_local": _same(selections_b, reference)}
        metrics["ratio_end_to_end"] = round(wall_b / metrics["local"]["wall_s"], 3)
        metrics["ratio_phases"] = {p: round(m_s3["phases"][p]["seconds"] / m_local["phases"][p]["seconds"], 3)
                                   for p in m_s3["phases"] if p in m_local["phases"]}

        # (c) a worker node lost during extraction
        home_c = work / "home-driver-c"
        driver_env = {**driver_env, "DATASEL_HOME": str(home_c)}
        running = start_datasel(_write(work / "loss.yaml", _config("s3://pools/gen", "s3://runs/c", ray)),
                                driver_env)
        deadline = time.monotonic() + args.timeout
        while feature_shards("s3://runs/c", s3) < 2 and running.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        removed_at = time.monotonic()
        cluster.remove_worker(0)
        cluster.add_worker(args.cpus)
        result = running.wait(args.timeout)
        assert result.rc == 0, result.tail()
        metrics["node_loss"] = {"wall_s": round(result.seconds, 1),
                                "seconds_lost": round(result.seconds - wall_b, 1),
                                "removed_after_s": round(removed_at - (time.monotonic() - result.seconds), 1),
                                "selections_equal_uninterrupted": _same(read_selections("s3://runs/c", s3),
                                                                        selections_b)}
    finally:
        if cluster is not None:
            cluster.stop()
        proxy.close()
        s3.stop()

    if not args.skip_autoscaling:
        metrics["autoscaling"] = _autoscaling(work, pool, args, reference)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return metrics


def _autoscaling(work: Path, pool: str, args, reference: dict) -> dict:
    from harness import start_autoscaling_head

    head = start_autoscaling_head(work / "autoscale", {**local_env(work / "home-nodes-d")}, worker_cpus=args.cpus,
                                  max_workers=3, idle_timeout_s=15)
    try:
        env = {**local_env(work / "home-driver-d"), **head.driver_env}
        timeline: list[tuple[float, int]] = []
        stop = threading.Event()
        threading.Thread(target=head.watch_workers, args=(timeline, stop), daemon=True).start()
        data = _config(pool, str(work / "run-d"), {"address": head.address, "num_cpus": None})
        data["extract"].update({"min_actors": 3, "max_actors": 3})
        submitted = time.time()
        running = start_datasel(_write(work / "autoscale.yaml", data), env)
        first_shard_two_nodes = None
        while running.poll() is None:
            if first_shard_two_nodes is None and timeline and timeline[-1][1] >= 2 \
                    and feature_shards(work / "run-d") > 0:
                first_shard_two_nodes = time.time() - submitted
            time.sleep(0.5)
        result = running.wait(60)
        assert result.rc == 0, result.tail()
        idle_started = time.time()
        while time.time() - idle_started < 120 and (not timeline or timeline[-1][1] > 0):
            time.sleep(1)
        stop.set()
        counts = [n for _, n in timeline]
        return {"wall_s": round(result.seconds, 1), "peak_worker_nodes": max(counts, default=0),
                "first_node_after_submit_s": next((round(t - submitted, 1) for t, n in timeline if n >= 1), None),
                "second_node_after_submit_s": next((round(t - submitted, 1) for t, n in timeline if n >= 2), None),
                "first_feature_shard_with_two_nodes_s": first_shard_two_nodes,
                "worker_nodes_after_idle_timeout": timeline[-1][1] if timeline else None,
                "seconds_to_scale_back": round(time.time() - idle_started, 1),
                "selections_equal_local": _same(read_selections(work / "run-d"), reference)}
    finally:
        head.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--skip-autoscaling", action="store_true")
    parser.add_argument("--quick", action="store_true", help="600 rows, no autoscaling run")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.skip_autoscaling = 600, True
    params = {"rows": args.rows, "workers": args.workers, "cpus_per_worker": args.cpus,
              "total_logical_cpus": args.workers * args.cpus, "model": "tiny", "methods": METHODS,
              "target_ratio_end_to_end": 1.3}
    started = time.monotonic()
    try:
        metrics = run(args)
    except Exception as err:
        emit_record("bench_cluster", params, {"error": f"{type(err).__name__}: {err}"[:2000]},
                    save=not args.no_save)
        raise
    metrics["bench_seconds"] = round(time.monotonic() - started, 1)
    metrics["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    emit_record("bench_cluster", params, metrics, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
