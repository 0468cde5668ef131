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
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
TAG = "loopback_node_"  # a custom resource that names each node in Ray's own state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            # presents the token (a real cluster's nodes get it the same way, see README).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            # A lost node is declared dead after 5 missed 1 s health checks, not 5 x 3 s.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "5",
        }
        self.nodes: list[Node] = []
        # Short: Ray's socket paths under it must stay within the 107-byte AF_UNIX limit.
        self.temp_root = Path(tempfile.mkdtemp(prefix="r18c-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()

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
        node.node_id = self._wait_for_node(node)
        return node

    def start_head(self, cpus: int = 0, resources: dict[str, float] | None = None) -> Node:
        return self._start(
            "head",
            [
                "--head",
                *("--port", str(self.gcs_port)),
                *("--dashboard-host", "127.0.0.1"),
                *("--dashboard-port", str(self.dashboard_port)),
                *("--include-dashboard", "true"),
            ],
            cpus,
            resources or {},
        )

    def add_node(self, name: str, cpus: int, resources: dict[str, float] | None = None) -> Node:
        return self._start(name, ["--address", self.address], cpus, resources or {})

    def alive_nodes(self) -> dict[str, str]:
        """node id -> our node name, of the nodes the GCS holds alive (`ray list nodes`)."""
        out = subprocess.run(
            [RAY, "list", "nodes", "--address", self.address, "--format", "json", "--detail"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0 or not out.stdout.lstrip().startswith("["):
            return {}  # the GCS is not up yet ("No resource in the cluster")
        alive = {}
        for n in json.loads(out.stdout):
            if n["state"] == "ALIVE":
                total = n.get("resources_total", {})
                names = [r[len(TAG) :] for r in total if r.startswith(TAG)]
                alive[n["node_id"]] = names[0] if names else "?"
        return alive

    def _wait_for_node(self, node: Node, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start {node.name} exited:\n{node.log.read_text()}")
            for node_id, name in self.alive_nodes().items():
                if name == node.name:
                    return node_id
            time.sleep(1)
        raise TimeoutError(f"node {node.name} did not join:\n{node.log.read_text()}")

    def kill(self, node: Node) -> list[int]:
        """SIGKILL the node's raylet, its workers and its `ray start`: a machine lost."""
        procs = node.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
                node.killed.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        node.proc.wait(timeout=30)
        return node.killed

    def wait_until_dead(self, node: Node, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while node.node_id in self.alive_nodes():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the GCS still holds {node.name} alive")
            time.sleep(1)

    def shutdown(self) -> None:
        # Worker nodes first, then the head: SIGTERM is what `ray stop` sends each process.
        for node in reversed(self.nodes):
            procs = node.processes()
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(procs, timeout=20)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
        shutil.rmtree(self.temp_root, ignore_errors=True)
