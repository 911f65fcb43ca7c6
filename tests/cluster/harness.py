"""A multi-node Ray cluster on one machine, in a process of its own (``ray.cluster_utils.Cluster``).

The test session already runs one local Ray in-process; ``ray.init`` or ``Cluster`` in the pytest process
would collide with it. This script owns the cluster instead: a head node with 0 CPUs and ``--workers`` worker
nodes of ``--cpus`` logical CPUs, every node with its own ``DATASEL_HOME`` (set in ``os.environ`` before each
``add_node``: a node's worker processes inherit the raylet's environment), a temp dir and ports of its own,
no dashboard unless ``--dashboard-port`` asks for one (then the head also serves the Jobs API and the state API
on ``127.0.0.1:<port>``, ``-1`` for a free port picked here). Drivers in other processes join with
``RAY_ADDRESS=<address>``; jobs go to the ``dashboard_url`` the ready reply names.

Run it as ``python tests/cluster/harness.py --workdir DIR ...`` (or ``python -m tests.cluster.harness``) in a
new session (``start_new_session=True``: Ray's reaper kills the harness's process group if the harness dies).
Commands come one per line on stdin; each gets exactly one reply line on stdout, ``HARNESS <json>``:

``nodes``                the nodes this harness started: ``[{"index", "node_id", "num_cpus", "home", "alive"}]``
``remove I [graceful]``  kill worker node ``I`` (0-based, in start order; default not graceful, as a lost machine)
``add CPUS``             start one more worker node of ``CPUS`` logical CPUs with a new ``DATASEL_HOME``
``stop``                 ``cluster.shutdown()`` (only this cluster's processes), reply, exit 0

End of stdin (the test process went away) and SIGTERM stop the cluster too. Once the cluster is up the
harness writes ``DIR/address`` and replies ``{"ready": true, "address": ..., "dashboard_url": ..., "nodes": [...]}``
unprompted (``dashboard_url``: ``http://127.0.0.1:<port>``, or null without a dashboard).
Everything Ray or the harness logs goes to ``DIR/harness.log``; stdout carries nothing but replies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

PREFIX = "HARNESS "


class _Stop(Exception):
    pass


def _ports(count: int) -> list[int]:
    """Free ports outside the kernel's ephemeral range (Ray's own listeners bind port 0 at any moment)."""
    try:
        from datasel_ray.ports import pick_unbound_ports
    except ImportError:  # run from a checkout without the package installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from datasel_ray.ports import pick_unbound_ports
    return pick_unbound_ports(count)


class Harness:
    def __init__(self, workdir: Path, object_store_bytes: int, system_config: dict | None,
                 dashboard_port: int = 0, own_runtime_env_dirs: bool = False):
        self.workdir = workdir
        self.object_store_bytes = object_store_bytes
        self.system_config = system_config
        self.dashboard_port = dashboard_port  # 0: no dashboard; -1: one on a free port picked at start
        self.dashboard_url: str | None = None
        # Every node of this cluster shares one session dir. With this flag each node keeps its runtime
        # environments (a job's working_dir, py_modules) in a folder of its own, as separate machines do. With the
        # one shared folder, a job submitted with a working_dir had that folder (its driver's cwd) deleted under
        # it once the driver connected (getcwd: ENOENT; torch's MKL then aborts `import torch`: "Intel oneMKL
        # FATAL ERROR: Cannot load libtorch_cpu.so"); a `ray start --head` single node did not.
        self.own_runtime_env_dirs = own_runtime_env_dirs
        self.cluster = None
        self.workers: list[dict] = []  # {"index", "node", "node_id", "num_cpus", "home", "alive"}
        self.head_home = ""

    def _home(self, name: str) -> str:
        path = self.workdir / f"home-{name}"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["DATASEL_HOME"] = str(path)  # inherited by the raylet started next, and by its workers
        return str(path)

    def start(self, workers: int, cpus: float) -> None:
        from ray.cluster_utils import Cluster

        temp_dir = self.workdir / "ray"  # short: Unix socket paths under it are limited to 107 bytes
        temp_dir.mkdir(parents=True, exist_ok=True)
        gcs, agent, metrics, runtime_env, client, node_manager, object_manager = _ports(7)
        self.head_home = self._home("head")
        # No node_ip_address="127.0.0.1": a driver's ray.init rewrites a loopback address to the machine's IP
        # (services.resolve_ip_for_localhost), where a loopback-bound GCS never answers. Nodes use Ray's default IP.
        head_args = {
            "num_cpus": 0,
            "temp_dir": str(temp_dir),
            "include_dashboard": False,
            "gcs_server_port": gcs,
            "dashboard_agent_listen_port": agent,
            "metrics_export_port": metrics,
            "runtime_env_agent_port": runtime_env,
            "ray_client_server_port": client,
            "node_manager_port": node_manager,
            "object_manager_port": object_manager,
            "object_store_memory": self.object_store_bytes,
        }
        if self.system_config:
            head_args["_system_config"] = self.system_config
        if self.own_runtime_env_dirs:
            head_args["runtime_env_dir_name"] = "runtime_resources_head"
        if self.dashboard_port:
            # the dashboard (Jobs API, state API) on loopback, every one of its ports explicit: another Ray on
            # this machine (the test session's) may hold Ray's defaults
            dashboard, agent_grpc = _ports(2)
            port = dashboard if self.dashboard_port < 0 else self.dashboard_port
            head_args.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                             metrics_agent_port=agent_grpc)
            self.dashboard_url = f"http://127.0.0.1:{port}"
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        for _ in range(workers):
            self.add_worker(cpus)
        self.cluster.wait_for_nodes(timeout=120)

    def add_worker(self, cpus: float) -> dict:
        index = len(self.workers)
        home = self._home(f"w{index}")
        agent, metrics, runtime_env = _ports(3)
        extra = {"runtime_env_dir_name": f"runtime_resources_w{index}"} if self.own_runtime_env_dirs else {}
        node = self.cluster.add_node(num_cpus=cpus,
                                     object_store_memory=self.object_store_bytes,
                                     dashboard_agent_listen_port=agent, metrics_export_port=metrics,
                                     runtime_env_agent_port=runtime_env, **extra)
        entry = {"index": index, "node": node, "node_id": node.node_id, "num_cpus": cpus, "home": home,
                 "alive": True}
        self.workers.append(entry)
        return entry

    def remove_worker(self, index: int, graceful: bool = False) -> dict:
        if not 0 <= index < len(self.workers):
            raise ValueError(f"no worker node {index}: this harness started {len(self.workers)}")
        entry = self.workers[index]
        if not entry["alive"]:
            raise ValueError(f"worker node {index} was removed already")
        self.cluster.remove_node(entry["node"], allow_graceful=graceful)
        entry["alive"] = False
        return entry

    def nodes(self) -> list[dict]:
        head = self.cluster.head_node
        out = [{"index": None, "node_id": head.node_id if head else None, "num_cpus": 0, "home": self.head_home,
                "alive": head is not None}]
        out += [{k: v for k, v in w.items() if k != "node"} for w in self.workers]
        return out

    def shutdown(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            cluster.shutdown()


def _serve(harness: Harness, commands, reply) -> None:
    for line in commands:
        words = line.split()
        if not words:
            continue
        try:
            if words[0] == "stop":
                harness.shutdown()
                reply({"stopped": True})
                return
            if words[0] == "nodes":
                reply({"nodes": harness.nodes()})
            elif words[0] == "remove":
                entry = harness.remove_worker(int(words[1]), graceful=len(words) > 2 and words[2] == "graceful")
                reply({"removed": entry["index"], "node_id": entry["node_id"]})
            elif words[0] == "add":
                entry = harness.add_worker(float(words[1]))
                reply({"added": entry["index"], "node_id": entry["node_id"], "home": entry["home"]})
            else:
                reply({"error": f"unknown command {line.strip()!r}"})
        except Exception as err:  # one bad command does not take the cluster down
            traceback.print_exc()
            reply({"error": f"{type(err).__name__}: {err}"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="short folder (Ray's temp dir, node homes, log, address)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=2, help="logical CPUs of each worker node")
    parser.add_argument("--object-store-mb", type=int, default=200)
    parser.add_argument("--system-config", default="", help="JSON of Ray _system_config for the head")
    parser.add_argument("--dashboard-port", type=int, default=0,
                        help="start the head with a dashboard (Jobs API) on 127.0.0.1:PORT; -1: a free port; "
                             "0 (default): no dashboard")
    parser.add_argument("--own-runtime-env-dirs", action="store_true",
                        help="each node keeps its runtime environments (a job's working_dir) in a folder of its "
                             "own, as separate machines do (default: Ray's one folder in the shared session dir)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Replies get a private copy of stdout; fd 1 and 2 (inherited by every Ray process) go to the log, and
    # stdin becomes /dev/null for children, so no child can write into the reply stream or eat a command.
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    command_stream = os.fdopen(os.dup(0), "r")
    log = os.open(workdir / "harness.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)

    def reply(obj: dict) -> None:
        reply_stream.write(PREFIX + json.dumps(obj) + "\n")
        reply_stream.flush()

    def on_sigterm(signum, frame):
        raise _Stop()

    signal.signal(signal.SIGTERM, on_sigterm)
    os.environ.pop("RAY_ADDRESS", None)  # this process starts a cluster; it joins none
    os.environ["RAY_TMPDIR"] = str(workdir)  # ray_current_cluster goes to <workdir>/ray, not to /tmp/ray
    harness = Harness(workdir, args.object_store_mb * 1024 * 1024,
                      json.loads(args.system_config) if args.system_config else None, args.dashboard_port,
                      args.own_runtime_env_dirs)
    try:
        harness.start(args.workers, args.cpus)
        (workdir / "address").write_text(harness.cluster.address)
        reply({"ready": True, "address": harness.cluster.address, "dashboard_url": harness.dashboard_url,
               "nodes": harness.nodes()})
        _serve(harness, command_stream, reply)
        return 0
    except _Stop:
        return 0
    except Exception as err:
        traceback.print_exc()
        try:
            reply({"error": f"{type(err).__name__}: {err}"})
        except OSError:
            pass
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        harness.shutdown()


# --- the test side: start the harness in a subprocess and talk to it -------------------------------------------

HARNESS_FILE = Path(__file__).resolve()


class ClusterHandle:
    """A running harness process. ``address``: the GCS address drivers join; ``dashboard_url``: the head's
    dashboard / Jobs API (None unless started with one); ``workdir``: its folder; ``nodes``: as the harness last
    reported them; ``env``: the environment a driver subprocess needs (set by the
    caller, see ``tests/cluster/conftest.py``)."""

    def __init__(self, proc, workdir: Path, reply_timeout: float):
        import queue
        import threading

        self.proc = proc
        self.workdir = workdir
        self.reply_timeout = reply_timeout
        self.address = ""
        self.dashboard_url: str | None = None
        self.nodes: list[dict] = []
        self.env: dict[str, str] = {}
        self._replies: "queue.Queue[dict | None]" = queue.Queue()
        self._seen: dict[int, object] = {}  # psutil.Process of every process seen under the harness
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self._replies.put(json.loads(line[len(PREFIX):]))
        self._replies.put(None)  # the harness exited

    def _reply(self, timeout: float | None = None) -> dict:
        import queue

        try:
            reply = self._replies.get(timeout=timeout or self.reply_timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply from the cluster harness in {timeout or self.reply_timeout:.0f} s; "
                               f"log: {self.log_tail()}") from None
        if reply is None:
            raise RuntimeError(f"the cluster harness exited (rc={self.proc.poll()}); log: {self.log_tail()}")
        if "error" in reply:
            raise RuntimeError(f"cluster harness: {reply['error']}; log: {self.log_tail()}")
        return reply

    def command(self, line: str, timeout: float | None = None) -> dict:
        self._remember_processes()
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.workdir / "harness.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float) -> None:
        reply = self._reply(timeout)
        self.address, self.nodes = reply["address"], reply["nodes"]
        self.dashboard_url = reply.get("dashboard_url")

    @property
    def workers(self) -> list[dict]:
        return [n for n in self.nodes if n["index"] is not None]

    def alive_workers(self) -> list[dict]:
        return [n for n in self.workers if n["alive"]]

    def refresh(self) -> list[dict]:
        self.nodes = self.command("nodes")["nodes"]
        return self.nodes

    def remove_worker(self, index: int, graceful: bool = False) -> str:
        """Kill worker node ``index`` (start order, 0-based); returns its node id. Not graceful by default."""
        reply = self.command(f"remove {int(index)}" + (" graceful" if graceful else ""))
        self.refresh()
        return reply["node_id"]

    def add_worker(self, num_cpus: float) -> dict:
        """Start one more worker node (its own DATASEL_HOME); returns its entry of ``nodes``."""
        reply = self.command(f"add {num_cpus}")
        self.refresh()
        return self.workers[reply["added"]]

    def _remember_processes(self) -> None:
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def stop(self, timeout: float = 60) -> None:
        """``cluster.shutdown()`` in the harness; then SIGTERM/SIGKILL of the harness's own process group, and a
        kill, by process id, of any process seen under the harness that is still running. Idempotent."""
        import signal
        import subprocess

        import psutil

        self._remember_processes()
        if self.proc.poll() is None:
            try:
                self.command("stop", timeout=timeout)
            except (OSError, RuntimeError, TimeoutError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                    try:
                        os.killpg(self.proc.pid, sig)  # the harness leads its own session and group
                        self.proc.wait(timeout=wait)
                        break
                    except (ProcessLookupError, subprocess.TimeoutExpired):
                        continue
        for proc in self._seen.values():
            try:
                if proc.is_running():  # same pid and start time: never a recycled pid
                    proc.kill()
            except psutil.Error:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def start_cluster(workdir: Path, env: dict[str, str], workers: int = 2, cpus: float = 2,
                  object_store_mb: int = 200, system_config: dict | None = None,
                  ready_timeout: float = 180, dashboard: bool | int = False,
                  own_runtime_env_dirs: bool = False) -> ClusterHandle:
    """Start the harness (``python harness.py``) in a new session with ``env`` (RAY_ADDRESS removed) and wait
    until its nodes are up. ``workdir`` must be short (Ray's Unix sockets live under it). ``dashboard``: True
    starts the head with a dashboard (Jobs API) on a free port of 127.0.0.1, a number on that port; the handle's
    ``dashboard_url`` names it. ``own_runtime_env_dirs``: a runtime-environment folder per node (needed by jobs
    with a ``working_dir``: see :class:`Harness`)."""
    import subprocess

    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, str(HARNESS_FILE), "--workdir", str(workdir), "--workers", str(workers),
           "--cpus", str(cpus), "--object-store-mb", str(object_store_mb)]
    if system_config:
        cmd += ["--system-config", json.dumps(system_config)]
    if dashboard:
        cmd += ["--dashboard-port", str(-1 if dashboard is True else int(dashboard))]
    if own_runtime_env_dirs:
        cmd.append("--own-runtime-env-dirs")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    with open(Path(workdir) / "harness.log", "ab") as log:  # also catches errors before the harness redirects
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, bufsize=1, start_new_session=True)
    handle = ClusterHandle(proc, Path(workdir), reply_timeout=120)
    try:
        handle.wait_ready(ready_timeout)
    except BaseException:
        handle.stop(timeout=30)
        raise
    return handle


# --------------------------------------------------------------------------------------------- autoscaling head

_WORKER_NODES = """
import json, ray
ray.init(logging_level="ERROR")  # RAY_ADDRESS names the cluster
print(json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]))
"""


def autoscaler_config(gcs_address: str, worker_cpus: float, max_workers: int, idle_timeout_s: float) -> dict:
    """Ray's fake multi-node example config with a 0-CPU head and one worker type of ``worker_cpus`` CPUs from
    zero to ``max_workers`` nodes. The provider's ``gcs_address`` names the head's port (its default, 6379, may
    be another Ray's)."""
    return {
        "cluster_name": "datasel-fake-multinode",
        "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": {"CPU": worker_cpus, "object_store_memory": 200_000_000},
                               "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


class AutoscalingHead:
    """A ``ray start --head --autoscaling-config`` with Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``),
    in a process group of its own with its own ports and temp dir.

    ``ray.cluster_utils.AutoscalingCluster.start()`` runs ``ray stop --force``, which ends every Ray process of the
    machine (a test session's own Ray included); this head is stopped by its own group and the processes under
    its temp dir instead. The provider starts worker nodes inside the head's monitor process: they inherit its
    environment (one DATASEL_HOME for all of them). ``driver_env``: what a driver needs to join."""

    def __init__(self, workdir: Path, env: dict[str, str], worker_cpus: float = 2, max_workers: int = 3,
                 idle_timeout_s: float = 15, ready_timeout: float = 90):
        import subprocess
        import time

        import ray._private.services

        self.workdir = str(workdir)
        Path(workdir).mkdir(parents=True, exist_ok=True)
        gcs_port, *ports = _ports(8)
        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{gcs_port}"
        config = Path(workdir) / "autoscaler.json"
        config.write_text(json.dumps(autoscaler_config(self.address, worker_cpus, max_workers, idle_timeout_s)))
        flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                 "--ray-client-server-port")
        head_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "DATASEL_ASSUME_AUTOSCALER")}
        head_env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"})
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", f"--autoscaling-config={config}", "--num-cpus=0",
               f"--port={gcs_port}", f"--temp-dir={workdir}", "--include-dashboard=false",
               "--object-store-memory=200000000", *(f"{flag}={port}" for flag, port in zip(flags, ports))]
        self._log = open(Path(workdir) / "head.log", "wb")
        self.proc = subprocess.Popen(cmd, env=head_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.driver_env = {k: v for k, v in env.items() if k != "DATASEL_ASSUME_AUTOSCALER"}
        self.driver_env.update({"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "disabled"})
        deadline = time.monotonic() + ready_timeout
        try:
            while self.worker_nodes() is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"autoscaling head did not start: {self.log_tail()}")
                time.sleep(2)
        except BaseException:
            self.stop()
            raise

    def worker_nodes(self) -> list[str] | None:
        """Ids of the alive nodes with CPUs (the launched workers); None when no driver could connect."""
        import subprocess

        try:
            out = subprocess.run([sys.executable, "-c", _WORKER_NODES], env=self.driver_env, capture_output=True,
                                 text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
        return json.loads(lines[-1]) if out.returncode == 0 and lines else None

    def watch_workers(self, timeline: list, stop, interval: float = 1.0) -> None:
        """Append ``(time.time(), alive worker nodes)`` to ``timeline`` every ``interval`` s until ``stop`` is set
        (one driver connected throughout; run it in a thread)."""
        import subprocess

        code = ("import json, sys, time, ray\nray.init(logging_level='ERROR')\nwhile True:\n"
                "    alive = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU', 0) > 0]\n"
                f"    print(json.dumps([time.time(), len(alive)]), flush=True)\n    time.sleep({interval})\n")
        watcher = subprocess.Popen([sys.executable, "-c", code], env=self.driver_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        try:
            for line in watcher.stdout:
                if stop.is_set():
                    break
                if line.startswith("["):
                    timeline.append(tuple(json.loads(line)))
        finally:
            watcher.kill()
            watcher.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (Path(self.workdir) / "head.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGKILL the head's process group, then any process still naming its temp dir. Idempotent."""
        import signal

        import psutil

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if self.workdir in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                continue
        self._log.close()


def start_autoscaling_head(workdir: Path, env: dict[str, str], worker_cpus: float = 2, max_workers: int = 3,
                           idle_timeout_s: float = 15) -> AutoscalingHead:
    """An :class:`AutoscalingHead` once a driver can join it."""
    return AutoscalingHead(workdir, env, worker_cpus, max_workers, idle_timeout_s)


if __name__ == "__main__":
    sys.exit(main())
