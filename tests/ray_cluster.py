"""A real multi-node Ray cluster on loopback for tests: `ray start --head` plus `ray start
--address` nodes, each its own raylet with its own declared resources, token authentication on.

Every node runs under `ray start --block`, so the test owns its process tree: a node is killed
by the process ids of its raylet and workers (as a lost machine would be), and the cluster is
shut down without `ray stop`, which would stop every other Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from resnet18_dist.launching.ray_cluster import PRIVATE_RAY_ENV, PRIVATE_RAY_TRAIN_ENV

RAY = str(Path(sys.executable).with_name("ray"))
TAG = "loopback_node_"  # a custom resource that names each node in Ray's own state


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this test session. The kernel may give
    a port that was free a moment ago twice in a row (each probe socket is closed before
    `ray start` binds the port); one node's six ports, or two nodes', must all differ, or
    `ray start` exits ("trying to use a port number ... used by other components")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    node_id: str = ""
    killed: list[int] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """`ray start --block`, its raylet (and GCS / dashboard on the head) and the raylet's
        workers: every process of this node."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


class LoopbackCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            # Ray 2.60's head turns token authentication on; every node, driver and CLI call
            # presents the token (a real cluster's nodes get it the same way, see docs/cluster.md).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            # A lost node is declared dead after 4 missed 0.5 s health checks (2 s), not Ray's
            # 5 x 3 s. A killed raylet refuses the connection at once; a live one, however
            # busy, still has Ray's 10 s per check to answer.
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "4",
            # What the launcher sets for a private Ray (launching/ray_cluster.py), which a
            # `ray start` cluster does not get from it: no idle workers started in advance, and
            # Ray Train's controller notices a failed, finished or resizable worker group
            # within 0.2 s instead of 2 s (propagated from the driver to the controller).
            **PRIVATE_RAY_ENV,
            **PRIVATE_RAY_TRAIN_ENV,
            # A worker group that cannot be placed is given up after 10 s, not 60, and placed
            # again (a retry that max_failures does not count): after a node is lost, Ray
            # Train first asks for the group it had, from a view of the cluster refreshed
            # every 20 s.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
        }
        self._auth = {"Authorization": f"Bearer {token.read_text()}"}
        self.nodes: list[Node] = []
        # Short: Ray's socket paths under it must stay within the 107-byte AF_UNIX limit.
        self.temp_root = Path(tempfile.mkdtemp(prefix="r18c-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        # Ray's State API calls that name no address (Ray Train V2's placement-group cleaner
        # makes them on the nodes) go to this cluster's dashboard, not to "the" Ray found by
        # listing GCS processes, which fails while any other Ray runs on this machine (what the
        # launcher does for its private Ray, launching/ray_cluster._own_state_api).
        self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], cpus: int, resources: dict[str, float]) -> Node:
        log = self.tmp / f"{name}.log"
        ports = [
            *("--node-manager-port", str(free_port())),
            *("--object-manager-port", str(free_port())),
            *("--runtime-env-agent-port", str(free_port())),
            *("--dashboard-agent-grpc-port", str(free_port())),
            *("--dashboard-agent-listen-port", str(free_port())),
            *("--metrics-export-port", str(free_port())),
        ]
        cmd = [
            RAY,
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--num-gpus",
            "0",
            "--resources",
            json.dumps({**resources, f"{TAG}{name}": 1}),
            "--object-store-memory",
            str(150 * 1024**2),
            "--disable-usage-stats",
            # Each node its own session directory, as on separate machines: nodes sharing one
            # would share runtime_resources/, and one node's runtime-env agent deletes the
            # job's working_dir package that another node's driver is running from.
            *("--temp-dir", str(self.temp_root / name)),
            *ports,
            *args,
        ]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def start_head(self, cpus: int = 0, resources: dict[str, float] | None = None) -> Node:
        return self._start_head(lambda: [], cpus, resources or {})

    def _start_head(
        self, extra: Callable[[], list[str]], cpus: int, resources: dict[str, float]
    ) -> Node:
        """`ray start --head`, once more on fresh ports if it exits before its raylet joins.
        Seen once in CI (the autoscaling head): `ray start` gave up after 30 s with "The
        current node timed out during startup"; a port probed free and then taken by another
        process before the raylet bound it is one cause a second try on new ports avoids.
        ``extra`` is called per try, after the ports are chosen (a config naming them)."""
        for attempt in (1, 2):
            node = self._start(
                "head",
                [
                    "--head",
                    *("--port", str(self.gcs_port)),
                    *("--dashboard-host", "127.0.0.1"),
                    *("--dashboard-port", str(self.dashboard_port)),
                    *("--include-dashboard", "true"),
                    *extra(),
                ],
                cpus,
                resources,
            )
            try:
                return self._started(node)
            except RuntimeError as err:
                if attempt == 2:
                    raise
                print(f"retrying on new ports: {err}", file=sys.stderr)  # shown if a test fails
                # Whatever of it still runs: its GCS, raylet and dashboard were started in the
                # session of `ray start` (start_new_session), which has exited and been reaped.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                self.nodes.remove(node)
                self.gcs_port, self.dashboard_port = free_port(), free_port()
                self.env["RAY_API_SERVER_ADDRESS"] = self.dashboard
        raise AssertionError("unreachable")

    def start_autoscaling_head(self, node_types: dict[str, dict], cpus: int = 0) -> Node:
        """A head whose autoscaler (v2, as cluster/ configures it) starts worker nodes of
        ``node_types`` ({name: {"resources": {...}, "max_workers": N}}, none at first) for
        demand, with Ray's fake multi-node provider: each "node" a raylet on this machine. What
        `ray.cluster_utils.AutoscalingCluster` sets up, without its `ray stop --force` (which
        stops every Ray on the machine) and its defaults file (not in Ray's wheel: the provider
        is named as an external module instead, which needs none)."""
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        config = {
            "cluster_name": "loopback-autoscaling",
            "max_workers": sum(t["max_workers"] for t in node_types.values()),
            "provider": {
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider."
                "FakeMultiNodeProvider",
                "gcs_address": self.address,
                "head_node_id": FAKE_HEAD_NODE_ID,
                "launch_multiple": True,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {
                    "resources": {"CPU": cpus},
                    "node_config": {},
                    "max_workers": 0,
                },
                **{
                    name: {"node_config": {}, "min_workers": 0, **t}
                    for name, t in node_types.items()
                },
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 10,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        path = self.tmp / "autoscaling.json"  # JSON is YAML

        def write_config() -> list[str]:
            config["provider"]["gcs_address"] = self.address  # this try's port
            path.write_text(json.dumps(config))
            return [f"--autoscaling-config={path}"]

        self.env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_enable_autoscaler_v2="1",
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
        )
        try:
            return self._start_head(write_config, cpus, {})
        finally:
            # Drivers and the nodes the autoscaler starts are not the head: they keep their own.
            for name in ("RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING"):
                self.env.pop(name)

    def add_node(self, name: str, cpus: int, resources: dict[str, float] | None = None) -> Node:
        return self.add_nodes([name], cpus, resources)[0]

    def add_nodes(
        self, names: list[str], cpus: int, resources: dict[str, float] | None = None
    ) -> list[Node]:
        """Worker nodes started together (as an autoscaler would), back once all have joined."""
        nodes = [self._start(n, ["--address", self.address], cpus, resources or {}) for n in names]
        return [self._started(n) for n in nodes]

    def _started(self, node: Node) -> Node:
        node.node_id = self._wait_for_node(node)
        return node

    def state(self, kind: str, *filters: tuple[str, str, str]) -> list[dict]:
        """Ray's State API (`ray list KIND --detail`) over HTTP from this process: polling it
        costs no start of the `ray` CLI, seconds of CPU each on a 2-core machine."""
        params: dict[str, object] = {"limit": 1000, "detail": "true", "timeout": 30}
        for key, i in (("filter_keys", 0), ("filter_predicates", 1), ("filter_values", 2)):
            params[key] = [f[i] for f in filters]
        r = requests.get(
            f"{self.dashboard}/api/v0/{kind}", params=params, headers=self._auth, timeout=60
        )
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, str]:
        """node id -> our node name, of the nodes the GCS holds alive."""
        alive = {}
        for n in self.state("nodes"):
            if n["state"] == "ALIVE":
                total = n.get("resources_total", {})
                names = [r[len(TAG) :] for r in total if r.startswith(TAG)]
                alive[n["node_id"]] = names[0] if names else "?"
        return alive

    def _alive_nodes_or_none(self) -> dict[str, str] | None:
        """None while the head's dashboard does not answer (starting, or too busy)."""
        try:
            return self.alive_nodes()
        except (requests.RequestException, ValueError, KeyError):
            return None

    def _wait_for_node(self, node: Node, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start {node.name} exited:\n{node.log.read_text()}{self._logs(node)}"
                )
            for node_id, name in (self._alive_nodes_or_none() or {}).items():
                if name == node.name:
                    return node_id
            time.sleep(0.25)
        raise TimeoutError(f"node {node.name} did not join:\n{node.log.read_text()}")

    def _logs(self, node: Node, lines: int = 15) -> str:
        """The last lines of the node's raylet and GCS logs (removed with the cluster)."""
        logs = self.temp_root / node.name / "session_latest" / "logs"
        tails = []
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
            if (f := logs / name).is_file() and (text := f.read_text(errors="replace").strip()):
                tails.append(f"--- {name}:\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n" + "\n".join(tails) if tails else ""

    def kill(self, node: Node) -> list[int]:
        """SIGKILL the node's raylet, its workers and its `ray start`: a machine lost."""
        procs = node.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
                node.killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        node.proc.wait(timeout=30)
        _wait_gone(procs, timeout=30)
        return node.killed

    def wait_until_dead(self, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while (alive := self._alive_nodes_or_none()) is None or node.node_id in alive:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the GCS still holds {node.name} alive")
            time.sleep(0.25)

    def shutdown(self) -> None:
        # The worker nodes together, then the head: SIGTERM is what `ray stop` sends each
        # process. `ray start --block`, the GCS and the autoscaler monitor outlive it (20 s
        # and more were measured): whatever is still running after 3 s is killed, as nothing
        # of a throwaway cluster needs saving.
        workers = [n for n in self.nodes if n.name != "head"]
        for group in (workers, [n for n in self.nodes if n.name == "head"]):
            procs = [p for node in group for p in node.processes()]
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            for p in _wait_gone(procs, timeout=3):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            for node in group:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
        shutil.rmtree(self.temp_root, ignore_errors=True)


def registered_epoch(run_dir: Path) -> int:
    """The newest epoch whose checkpoint Ray Train has registered (asynchronously, after the
    workers' report; a file on disk alone is not enough): what a restarted worker group
    restores. 0 before the first."""
    try:
        return registered_in((run_dir / SNAPSHOT).read_text())
    except OSError:  # not written yet
        return 0


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's, in the run directory or prefix


def registered_in(snapshot: str | bytes) -> int:
    """registered_epoch() of a snapshot's text (read from a disk or a bucket)."""
    try:
        parsed = json.loads(snapshot)
    except ValueError:  # being replaced
        return 0
    names = [r["checkpoint_dir_name"] for r in parsed.get("checkpoint_results", [])]
    return max((int(n.removeprefix("checkpoint_epoch")) for n in names), default=0)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; those still running after ``timeout``. A zombie
    counts as gone: an orphaned Ray process is reaped by PID 1 whenever it gets to it, which
    psutil.wait_procs would wait out to the end of its timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def kill_with_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL a driver and the private Ray it started, as when the session or machine running
    it is lost. Everything is stopped (SIGSTOP) first: left alone, the Ray Train workers of a
    killed driver train on for a second or two before their raylet notices, and with a
    one-second epoch they would write checkpoints after the test has looked at what was saved
    (what made two CI runs end at the last epoch instead of mid-run)."""
    family = [psutil.Process(proc.pid)]
    with contextlib.suppress(psutil.NoSuchProcess):
        family += family[0].children(recursive=True)
    for signal_process in (psutil.Process.suspend, psutil.Process.kill):
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_process(p)
    proc.wait(timeout=60)
    _wait_gone(family, timeout=30)
