"""A real 3-node Ray cluster on loopback (a CPU-less head and two 2-CPU nodes, token auth on):
`ray job submit` with `--placement spread`, and a whole worker node lost mid-run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resnet18_dist.checkpoint_file import load_checkpoint

from .conftest import REPO, train_args
from .ray_cluster import RAY, LoopbackCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        # No CPUs on the head: training runs on the worker nodes only, as on a real cluster
        # whose head is kept for the GCS, the dashboard and the job drivers.
        c.start_head(cpus=0)
        c.add_node("a", cpus=2)
        c.add_node("b", cpus=2)
        yield c
    finally:
        c.shutdown()


def _state(cluster: LoopbackCluster, kind: str, *filters: str) -> str:
    """`ray list KIND` from Ray's State API, as JSON."""
    out = subprocess.run(
        [
            *(RAY, "list", kind, "--address", cluster.address, "--format", "json"),
            *("--detail", "--limit", "1000"),
            *[arg for f in filters for arg in ("--filter", f)],
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def _train_workers(cluster: LoopbackCluster, job_id: str) -> list[dict]:
    """The Ray Train worker actors of one job."""
    return json.loads(_state(cluster, "actors", "class_name=RayTrainWorker", f"job_id={job_id}"))


def _job(cluster: LoopbackCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", args[0], "--address", cluster.dashboard, *args[1:]],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_spread_job_places_its_two_workers_on_two_nodes(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    nodes = cluster.alive_nodes()
    submit = _job(
        cluster,
        "submit",
        *("--submission-id", "spread-job", "--working-dir", str(REPO), "--no-wait"),
        "--",
        *("python", "launch/train.py", "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "spread", 2, "--placement", "spread", "--epochs", "3"),
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    # `ray job logs --follow` returns when the job ends, as a user would watch it.
    logs = _job(cluster, "logs", "spread-job", "--follow", timeout=900)
    status = _job(cluster, "status", "spread-job")
    assert "Job 'spread-job' succeeded" in status.stdout + status.stderr, logs.stdout[-4000:]

    jobs = json.loads(_state(cluster, "jobs"))
    job = next(j for j in jobs if j.get("submission_id") == "spread-job")
    assert job["status"] == "SUCCEEDED", job
    workers = _train_workers(cluster, job["job_id"])
    assert len(workers) == 2, workers
    placed = {w["node_id"] for w in workers}
    # From Ray's own state: one worker on each of the two CPU nodes (the head has no CPUs).
    assert len(placed) == 2 and placed <= {n for n, name in nodes.items() if name in "ab"}, (
        placed,
        nodes,
    )
    # The console names the node of every rank, as Ray knows it.
    for w in workers:
        assert f"Ray node {w['node_id'][:12]}" in logs.stdout, logs.stdout[-3000:]
    assert "placement spread" in logs.stdout
    report = json.loads((tmp_path / "spread" / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2 and report["epochs_run"] == 3


def test_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    # Two workers of 2 CPUs each: one per node, so the cluster cannot run the group again
    # until a node comes back (as an autoscaler would bring one).
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--address", cluster.address, "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "lost", 2, "--cpus-per-worker", "2", "--epochs", "6"),
        *("--max-failures", "1"),
    ]
    run_dir = tmp_path / "lost"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not _epochs_done(run_dir, 2):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        time.sleep(2.0)  # Ray's controller registers a reported checkpoint asynchronously
        assert driver.poll() is None, "the run ended before a node could be lost"
        victim = next(n for n in cluster.nodes if n.name in "ab" and n.proc.poll() is None)
        killed = cluster.kill(victim)
        assert len(killed) >= 3, killed  # `ray start`, its raylet, at least one worker
        cluster.wait_until_dead(victim)
        time.sleep(3.0)  # the group has failed and waits for resources that are not there
        assert driver.poll() is None, log.read_text()[-4000:]
        cluster.add_node("c", cpus=2)  # the replacement
        rc = driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert re.search(r"Ray Train restored checkpoint \S*checkpoint_epoch0002", text), text[-4000:]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    # Resumed after epoch 2, not restarted: every epoch logged once, in order.
    assert epochs == [0, 1, 2, 3, 4, 5], epochs
    final = load_checkpoint(run_dir)
    assert final["loop"]["epoch"] == 6 and "model" in final
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_run"] == 6 and report["test_samples"] == 360


def _epochs_done(run_dir: Path, n: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return (
        metrics.is_file()
        and len(metrics.read_text().splitlines()) >= n
        and (run_dir / f"checkpoint_epoch{n:04d}" / "checkpoint.pt").is_file()
    )


def test_elastic_run_shrinks_when_a_node_dies_and_grows_when_one_joins(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    # Two 2-CPU nodes for training: `--num-workers 1:2` with 2 CPUs per worker starts with two
    # workers, one per node; a node lost leaves room for one, and a node joining for two again.
    alive = [n for n in cluster.nodes if n.name != "head" and n.proc.poll() is None]
    while len(alive) < 2:
        alive.append(cluster.add_node(f"e{len(cluster.nodes)}", cpus=2))
    for extra in alive[2:]:
        cluster.kill(extra)
        cluster.wait_until_dead(extra)
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--address", cluster.address, "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "elastic", 2, "--cpus-per-worker", "2", "--epochs", "10"),
        *("--num-workers", "1:2", "--resize-interval-s", "2", "--batch-size", "32"),
        *("--max-failures", "2"),
    ]
    run_dir = tmp_path / "elastic"
    log = tmp_path / "driver.log"

    def wait_for(what: str, ready) -> None:
        deadline = time.monotonic() + 600
        while not ready():
            assert driver.poll() is None, f"ended waiting for {what}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{what}:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)

    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for("epoch 2 at two workers", lambda: _epochs_done(run_dir, 2))
        time.sleep(2.0)  # Ray's controller registers a reported checkpoint asynchronously
        cluster.kill(alive[0])  # a node, and the worker on it, lost
        one = "1 worker(s) on cpu, batch 64 per worker (64 global)"
        wait_for("training on one worker", lambda: one in log.read_text())
        done = len((run_dir / "metrics.jsonl").read_text().splitlines())
        wait_for("an epoch on one worker", lambda: _epochs_done(run_dir, done + 1))
        cluster.add_node(f"e{len(cluster.nodes)}", cpus=2)  # capacity returns
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Ray Train: 1:2 worker(s) (elastic)" in text
    two = "2 worker(s) on cpu, batch 32 per worker (64 global)"
    # Two workers, then (the node lost) one, then (a node back) two again; the global batch
    # is 64 samples (32 x MAX) throughout.
    first_two, shrunk = text.index(two), text.index(one)
    assert first_two < shrunk < text.rindex(two), text[-4000:]
    assert len(re.findall(r"Ray Train restored checkpoint \S*checkpoint_epoch\d{4}", text)) >= 2
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == list(range(10)), epochs
    report = json.loads((run_dir / "report.json").read_text())
    resolved = report["resolved"]
    assert resolved["world_size"] == 2 and resolved["batch_size_per_worker"] == 32
    assert resolved["global_batch_size"] == 64 and report["epochs_run"] == 10
    assert load_checkpoint(run_dir)["loop"]["epoch"] == 10


def _epochs_done(run_dir: Path, n: int) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return (
        metrics.is_file()
        and len(metrics.read_text().splitlines()) >= n
        and (run_dir / f"checkpoint_epoch{n:04d}" / "checkpoint.pt").is_file()
    )


def test_elastic_run_starts_small_and_grows_when_a_node_joins(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    # One 2-CPU node left for training: `--num-workers 1:2` with 2 CPUs per worker starts
    # with one worker, then grows to two once a second node joins.
    workers = [n for n in cluster.nodes if n.name != "head" and n.proc.poll() is None]
    if not workers:
        workers = [cluster.add_node("e1", cpus=2)]
    for extra in workers[1:]:
        cluster.kill(extra)
        cluster.wait_until_dead(extra)
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--address", cluster.address, "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "elastic", 2, "--cpus-per-worker", "2", "--epochs", "6"),
        *("--num-workers", "1:2", "--resize-interval-s", "2", "--batch-size", "32"),
    ]
    run_dir = tmp_path / "elastic"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not _epochs_done(run_dir, 1):
            assert driver.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        cluster.add_node("e2", cpus=2)  # capacity returns
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Ray Train: 1:2 worker(s) (elastic)" in text
    # It ran with one worker, then, restored from a checkpoint, with two.
    assert re.search(r"DDP worker rank 0/1 ", text), text[-3000:]
    assert re.search(r"DDP worker rank 1/2 ", text), text[-3000:]
    assert re.search(r"Ray Train restored checkpoint \S*checkpoint_epoch\d{4}", text)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [0, 1, 2, 3, 4, 5], epochs
    report = json.loads((run_dir / "report.json").read_text())
    resolved = report["resolved"]
    # The global batch held: 64 samples (32 x MAX) at one worker and at two.
    assert "1 worker(s) on cpu, batch 64 per worker (64 global)" in text, text[-3000:]
    assert "2 worker(s) on cpu, batch 32 per worker (64 global)" in text, text[-3000:]
    assert resolved["world_size"] == 2 and resolved["batch_size_per_worker"] == 32
    assert resolved["global_batch_size"] == 64
