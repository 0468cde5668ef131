"""A real multi-node Ray cluster on loopback (a CPU-less head and 2-CPU worker nodes that come
and go, token auth on): elastic runs that start small, shrink and grow, `ray job submit` of a
training job with `--placement spread` and of a sweep, and a whole worker node lost mid-run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from resnet18_dist.checkpoint_file import load_checkpoint

from .conftest import REPO, assert_two_rank_console, train_args
from .ray_cluster import RAY, LoopbackCluster, Node, registered_epoch

# These tests are about placement, failure and resizing, not learning: a ResNet18 at a quarter
# of the width (1/16 of the compute) trains an epoch of the digits in about a second.
TINY = ("--width", "0.25")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        # No CPUs on the head: training runs on the worker nodes only, as on a real cluster
        # whose head is kept for the GCS, the dashboard and the job drivers.
        c.start_head(cpus=0)
        c.add_nodes(["a", "b"], cpus=2)
        yield c
    finally:
        c.shutdown()


def _train_workers(cluster: LoopbackCluster, job_id: str) -> list[dict]:
    """The Ray Train worker actors of one job, from Ray's State API."""
    return cluster.state("actors", ("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id))


def _worker_processes(node: Node) -> list[psutil.Process]:
    """The Ray Train worker processes running on one node."""
    out = []
    for p in node.processes():
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
    return out


# Ray Train's log line (--verbose) when an elastic run decides to grow. Its view of the cluster's
# resources is refreshed every 20 s (the AutoscalingCoordinator's tick), so a run that is not
# held still may end before a node that joined is seen.
GROW = "Deciding to resize the worker group from 1 -> 2 workers"


@contextlib.contextmanager
def _frozen(node: Node) -> Iterator[None]:
    """SIGSTOP the Ray Train workers on ``node`` (the other ranks wait for them at their next
    all-reduce): the run holds still, as in a long epoch, while the test changes the cluster, so
    a fast epoch cannot finish the run first. SIGCONT on the way out, if they still exist."""
    deadline = time.monotonic() + 60
    while not (procs := _worker_processes(node)):
        assert time.monotonic() < deadline, f"no Ray Train worker on node {node.name}"
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)


def _job(cluster: LoopbackCluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, "job", args[0], "--address", cluster.dashboard, *args[1:]],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_cluster_run_asks_ray_train_for_its_placement_size_range_and_retries(
    tmp_path: Path,
) -> None:
    """The options the cluster tests below exercise, as they reach Ray Train."""
    from resnet18_dist.config import TrainConfig
    from resnet18_dist.integrations.ray_train import build_trainer

    run = {"num_workers": "1:2", "placement": "spread", "resize_interval_s": 2}
    cfg = TrainConfig.from_dict({"run": {**run, "cpus_per_worker": 2, "max_failures": 2}})
    trainer = build_trainer(cfg, tmp_path / "run", use_gpu=False, wandb_mode="disabled")
    scaling = trainer.scaling_config
    assert (scaling.min_workers, scaling.max_workers) == (1, 2)
    assert scaling.placement_strategy == "SPREAD"
    assert scaling.elastic_resize_monitor_interval_s == 2
    assert scaling.resources_per_worker == {"CPU": 2}
    assert trainer.run_config.failure_config.max_failures == 2
    assert (trainer.run_config.storage_path, trainer.run_config.name) == (str(tmp_path), "run")
    fixed = build_trainer(
        TrainConfig.from_dict({"run": {"num_workers": 2}}), tmp_path / "f", False, "disabled"
    )
    assert (
        fixed.scaling_config.num_workers == 2 and fixed.scaling_config.placement_strategy == "PACK"
    )


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_spreads_two_ddp_workers_over_two_nodes(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    """`ray job submit --working-dir . -- python launch/train.py` as the README writes it, with
    `--placement spread`: the job succeeds, its two DDP workers land on the two CPU nodes, and
    the console a user follows is the launcher's (one line per epoch, no Ray Train dicts)."""
    nodes = cluster.alive_nodes()
    submit = _job(
        cluster,
        "submit",
        *("--submission-id", "spread-job", "--working-dir", str(REPO), "--no-wait"),
        "--",
        *("python", "launch/train.py", "--data-dir", str(digits_dataset)),
        *train_args(
            tmp_path, "spread", 2, "--placement", "spread", "--epochs", "3", *TINY, quiet=False
        ),
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    # `ray job logs --follow` returns when the job ends, as a user would watch it.
    logs = _job(cluster, "logs", "spread-job", "--follow", timeout=900)
    status = _job(cluster, "status", "spread-job")
    assert "Job 'spread-job' succeeded" in status.stdout + status.stderr, logs.stdout[-4000:]

    jobs = cluster.state("jobs")
    job = next(j for j in jobs if j.get("submission_id") == "spread-job")
    assert job["status"] == "SUCCEEDED", job
    workers = _train_workers(cluster, job["job_id"])
    assert len(workers) == 2, workers
    placed = {w["node_id"] for w in workers}
    # From Ray's own state: one worker on each of the two CPU nodes (the head has no CPUs).
    assert len(placed) == 2 and placed <= {n for n, name in nodes.items() if name != "head"}, (
        placed,
        nodes,
    )
    log = logs.stdout
    # The console names the node of every rank, as Ray knows it.
    for w in workers:
        assert f"Ray node {w['node_id'][:12]}" in log, log[-3000:]
    assert "placement spread" in log
    assert_two_rank_console(log, epochs=3)
    report = json.loads((tmp_path / "spread" / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2 and report["epochs_run"] == 3
    assert report["test_samples"] == 360
    checkpoints = sorted(p.name for p in (tmp_path / "spread").glob("checkpoint_epoch*"))
    assert checkpoints == ["checkpoint_epoch0002", "checkpoint_epoch0003"]  # --keep-checkpoints 2


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_a_small_sweep(
    cluster: LoopbackCluster, small_digits: Path, tmp_path: Path
) -> None:
    """A sweep as a Ray job on the same cluster (one `ray start` for the module; its two
    2-CPU nodes hold two trials at once), with Optuna's TPE search (the `optuna` extra, which
    CI installs; skipped, and reported so, without it)."""
    from .test_sweep import _rows, _sweep_args

    pytest.importorskip("optuna", reason="the optuna extra: pip install -e '.[optuna]'")

    # Two live 2-CPU nodes (as the module's cluster starts; a test before may have lost one).
    while len([n for n in cluster.nodes if n.name != "head" and n.proc.poll() is None]) < 2:
        cluster.add_node(f"o{len(cluster.nodes)}", cpus=2)
    address, env = cluster.dashboard, cluster.env
    runtime_env = {"env_vars": {"RESNET18_DIST_CACHE": os.environ["RESNET18_DIST_CACHE"]}}
    proc = subprocess.run(
        [
            RAY,
            *("job", "submit", "--address", address, "--working-dir", str(REPO)),
            *("--runtime-env-json", json.dumps(runtime_env), "--"),
            "python",
            "launch/sweep.py",
            *_sweep_args(small_digits, tmp_path, "job", "--num-samples", "2", *TINY),
            *("--max-epochs", "1", "--wandb-mode", "disabled", "--max-int8-drop", "100"),
            *("--search", "optuna"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "The cluster has 4 CPU(s): 2 trial(s) fit at once" in log
    rows = _rows(tmp_path / "job")
    assert len(rows) == 2 and all(r["status"] != "error" for r in rows)
    assert (tmp_path / "job" / "best" / "model.int8.onnx").is_file()
    assert "optuna search" in log
    assert len({r["lr"] for r in rows}) == 2  # two samples from TPE's start-up
    # Tune's own record of the searcher that ran (the console above only echoes the option):
    # a Searcher such as OptunaSearch saves searcher-state-*.pkl, the random search
    # (BasicVariantGenerator) basic-variant-state-*.json instead.
    sweep = tmp_path / "job"
    assert list(sweep.glob("searcher-state-*.pkl")), sorted(p.name for p in sweep.iterdir())
    assert not list(sweep.glob("basic-variant-state-*.json"))


@pytest.mark.slow
@pytest.mark.ray
def test_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    # Two workers of 2 CPUs each: one per node, so the cluster cannot run the group again
    # until a node comes back (as an autoscaler would bring one).
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--address", cluster.address, "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "lost", 2, "--cpus-per-worker", "2", "--epochs", "6", *TINY),
        *("--max-failures", "1"),
    ]
    run_dir = tmp_path / "lost"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(driver, log, "epoch 2's checkpoint", lambda: registered_epoch(run_dir) >= 2)
        victim = next(n for n in cluster.nodes if n.name in "ab" and n.proc.poll() is None)
        with _frozen(victim):
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
    # Every rank restored the same checkpoint, of epoch 2 or (frozen just after it) 3.
    restored = set(re.findall(r"Ray Train restored checkpoint \S*checkpoint_epoch(\d{4})", text))
    assert len(restored) == 1 and 2 <= int(restored.pop()) < 6, text[-4000:]
    # Resumed after its checkpoint, not restarted: the first epochs were trained once, and
    # every epoch is logged once, in order.
    assert len(re.findall(r"epoch 1/6: train loss", text)) == 1, text[-4000:]
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [0, 1, 2, 3, 4, 5], epochs
    final = load_checkpoint(run_dir)
    assert final["loop"]["epoch"] == 6 and "model" in final
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_run"] == 6 and report["test_samples"] == 360


def _wait(driver: subprocess.Popen, log: Path, what: str, ready, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert driver.poll() is None, f"ended waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"{what}:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.ray
def test_elastic_run_starts_small_grows_when_a_node_joins_and_shrinks_when_one_dies(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    # `--num-workers 1:2` with 2 CPUs per worker on 2-CPU nodes: one node alive leaves room for
    # one worker, a node joining for two, a node lost for one again.
    alive = [n for n in cluster.nodes if n.name != "head" and n.proc.poll() is None]
    if not alive:
        alive = [cluster.add_node(f"e{len(cluster.nodes)}", cpus=2)]
    for extra in alive[1:]:
        cluster.kill(extra)
        cluster.wait_until_dead(extra)
    first = alive[0]
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--address", cluster.address, "--data-dir", str(digits_dataset)),
        *train_args(tmp_path, "elastic", 2, "--cpus-per-worker", "2", "--epochs", "8", *TINY),
        *("--num-workers", "1:2", "--resize-interval-s", "2", "--batch-size", "128"),
        "--verbose",  # Ray Train's own INFO lines: its decision to resize
        *("--max-failures", "2"),
    ]
    run_dir = tmp_path / "elastic"
    log = tmp_path / "driver.log"
    one = "1 worker(s) on cpu, batch 256 per worker (256 global)"
    two = "2 worker(s) on cpu, batch 128 per worker (256 global)"
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(driver, log, "epoch 1 at one worker", lambda: registered_epoch(run_dir) >= 1)
        with _frozen(first):  # the run is mid-epoch when capacity arrives
            joined = cluster.add_node(f"e{len(cluster.nodes)}", cpus=2)
            _wait(driver, log, "Ray Train's decision to grow", lambda: GROW in log.read_text(), 180)
        _wait(driver, log, "training on two workers", lambda: two in log.read_text())
        done = registered_epoch(run_dir)
        _wait(driver, log, "an epoch at two workers", lambda: registered_epoch(run_dir) > done)
        with _frozen(joined):
            cluster.kill(joined)  # a node, and the worker on it, lost
        rc = driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            driver.send_signal(signal.SIGKILL)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "Ray Train: 1:2 worker(s) (elastic)" in text
    # One worker, then (a node joined) two, then (a node lost) one again, each restored from
    # a checkpoint; the global batch is 256 samples (128 x MAX) throughout.
    assert re.search(r"DDP worker rank 0/1 ", text) and re.search(r"DDP worker rank 1/2 ", text)
    assert text.index(one) < text.index(two) < text.rindex(one), text[-4000:]
    assert len(re.findall(r"Ray Train restored checkpoint \S*checkpoint_epoch\d{4}", text)) >= 2
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == list(range(8)), epochs  # every epoch once, across the three groups
    report = json.loads((run_dir / "report.json").read_text())
    resolved = report["resolved"]
    assert resolved["world_size"] == 1 and resolved["batch_size_per_worker"] == 256
    assert resolved["global_batch_size"] == 256 and report["epochs_run"] == 8
    assert load_checkpoint(run_dir)["loop"]["epoch"] == 8


def test_loopback_ports_are_never_handed_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI flake of 2026-12-04 (`ray start b`: node_manager and object_manager both on port
    51383): a kernel that gives the same free port to two probes in a row is not believed."""
    import socket

    from . import ray_cluster

    real = socket.socket
    given = iter([51383, 51383, 51384])

    class Probe:
        def __init__(self, *args: object) -> None:
            self._sock = real(*args)

        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            self._sock.close()

        def bind(self, address: tuple[str, int]) -> None:
            self._sock.bind(address)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", next(given))

    monkeypatch.setattr(ray_cluster, "_GIVEN", set())
    monkeypatch.setattr(ray_cluster.socket, "socket", Probe)
    assert [ray_cluster.free_port(), ray_cluster.free_port()] == [51383, 51384]
