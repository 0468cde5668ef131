"""Training and sweeps on a cluster whose autoscaler adds nodes (issue 25): a head with no
CPUs and one node type scaled to zero, run by Ray's autoscaler v2 with its fake multi-node
provider on loopback (tests/ray_cluster.py). A job that needs that node type has it started and
finishes (with --use-gpu auto: there is no GPU node type, so on CPUs); one that no node type can
hold is refused at once; one whose nodes do not come in time is refused naming
--wait-for-resources. The jobs run in this order on one cluster, the first from zero nodes. A
sweep, first, on a cluster of its own from zero nodes, sizes its concurrency from the largest
cluster the autoscaler can make, not from the nodes up now."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO
from .ray_cluster import LoopbackCluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Two-CPU worker nodes, none at first, at most two: the largest cluster holds 4 CPUs.
NODE_TYPES = {"cpu2": {"resources": {"CPU": 2}, "max_workers": 2}}
# The sweep's cluster: up to three such nodes (6 CPUs).
SWEEP_NODE_TYPES = {"cpu2": {"resources": {"CPU": 2}, "max_workers": 3}}


@contextlib.contextmanager
def _autoscaling_cluster(tmp: Path, node_types: dict = NODE_TYPES) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(tmp)
    try:
        c.start_autoscaling_head(node_types, cpus=0)
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with _autoscaling_cluster(tmp_path_factory.mktemp("autoscaling")) as c:
        yield c


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory, small_digits: Path) -> Path:
    """A user's working directory on the head: a checkout's launch/ and a prepared dataset."""
    cwd = tmp_path_factory.mktemp("autoscaling-user")
    (cwd / "launch").symlink_to(REPO / "launch")
    (cwd / "data").mkdir()
    (cwd / "data" / "digits").symlink_to(small_digits)
    return cwd


def _train(cluster: LoopbackCluster, cwd: Path, *args: str, timeout: float = 600):
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "launch/train.py", "--data-dir", "data/digits", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cpu_nodes(cluster: LoopbackCluster) -> int:
    return sum(
        1
        for n in cluster.state("nodes")
        if n["state"] == "ALIVE" and n.get("resources_total", {}).get("CPU", 0) > 0
    )


def test_a_sweep_runs_as_many_trials_as_the_largest_cluster_holds(tmp_path: Path) -> None:
    """The plan of a sweep of 4 trials of 1 worker (2 CPUs each with its driver) on a cluster
    of no nodes whose type may have 3: it waits for one trial's node, then runs 3 at once, what
    the largest cluster holds (asked of the autoscaler), not the 1 (or 2, where the autoscaler
    started two nodes for the first request) that the live nodes hold. First in this module, so
    that its cluster never runs beside the jobs' cluster."""
    code = (
        "import ray\n"
        "from resnet18_dist.tuning.space import SweepConfig\n"
        "from resnet18_dist.tuning.sweep import plan_trials\n"
        "ray.init()\n"
        "cfg = SweepConfig.from_dict({'sweep': {'num_samples': 4}})\n"
        "print(plan_trials(cfg, use_gpu=False).describe())\n"
    )
    with _autoscaling_cluster(tmp_path, SWEEP_NODE_TYPES) as fresh:
        env = {**fresh.env, "RAY_ADDRESS": fresh.address, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    assert "waiting up to 600 s (--wait-for-resources)" in proc.stdout, out
    assert re.search(
        r"The cluster has (2|4) CPU\(s\) on its live nodes \((1|2) trial\(s\) at once\); its "
        r"autoscaler \(v2\) can add nodes for 3: running 3 at once\.",
        proc.stdout,
    ), out


def test_a_job_waits_for_the_autoscaler_to_add_a_node_and_finishes(
    cluster: LoopbackCluster, user_dir: Path
) -> None:
    assert _cpu_nodes(cluster) == 0  # scaled to zero: no CPU anywhere
    # Placement and waiting, not learning: one short epoch of a quarter-width ResNet18.
    proc = _train(
        cluster,
        user_dir,
        *("--num-workers", "2", "--epochs", "1", "--width", "0.25", "--name", "grown"),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (
        "The live nodes cannot hold 2 x {CPU: 1} (1 CPUs per worker, but no node of the cluster "
        "has more than 0); waiting up to 600 s (--wait-for-resources) for the cluster's "
        "autoscaler (v2) to add nodes" in out
    ), out[-4000:]
    assert "2 x {CPU: 1} placed after" in out, out[-4000:]
    assert "test report (80 images" in out, out[-3000:]
    assert (user_dir / "runs" / "grown" / "report.json").is_file()
    assert _cpu_nodes(cluster) >= 1


def test_a_worker_no_node_type_can_hold_is_refused_at_once(
    cluster: LoopbackCluster, user_dir: Path
) -> None:
    # The default wait is 600 s: the subprocess's 180 s limit fails the test if it is waited out.
    proc = _train(
        cluster, user_dir, "--cpus-per-worker", "4", "--epochs", "1", "--name", "x", timeout=180
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(
        r"--cpus-per-worker: 1 x \{CPU: 4\}: no node type of this cluster can hold it \(its "
        r"autoscaler reports the request infeasible; 4 CPUs per worker, but no node of the "
        r"cluster has more than [02]\)",
        proc.stderr,
    ), proc.stderr[-3000:]
    assert not (user_dir / "runs" / "x").exists()


def test_nodes_that_do_not_come_in_time_are_refused_naming_the_wait(
    cluster: LoopbackCluster, user_dir: Path
) -> None:
    # Two 2-CPU workers need both nodes of the type; the second takes more than half a second.
    proc = _train(
        cluster,
        user_dir,
        *("--num-workers", "2", "--cpus-per-worker", "2", "--wait-for-resources", "0.5"),
        *("--epochs", "1", "--name", "late"),
        timeout=180,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (
        "--wait-for-resources: waited 0.5 s for the autoscaler to add nodes for 2 x {CPU: 2}, "
        "in vain:" in proc.stderr
    ), proc.stderr[-3000:]
    assert re.search(r"wait longer, or lower --(num-workers|cpus-per-worker)", proc.stderr)
    assert not (user_dir / "runs" / "late").exists()
