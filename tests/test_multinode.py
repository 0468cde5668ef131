"""A real multi-node Ray cluster on loopback (a CPU-less head and 2-CPU worker nodes that come
and go, token auth on): elastic runs that start small, shrink and grow; `ray job submit` of a
training job with `--placement spread` that loses a whole worker node mid-run; and of a sweep
whose killed driver the same submission continues."""

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

from .conftest import REPO, train_args
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
    cfg = TrainConfig.from_dict({"cluster": {**run, "cpus_per_worker": 2, "max_failures": 2}})
    trainer = build_trainer(cfg, tmp_path / "run", use_gpu=False, wandb_mode="disabled")
    scaling = trainer.scaling_config
    assert (scaling.min_workers, scaling.max_workers) == (1, 2)
    assert scaling.placement_strategy == "SPREAD"
    assert scaling.elastic_resize_monitor_interval_s == 2
    assert scaling.resources_per_worker == {"CPU": 2}
    assert trainer.run_config.failure_config.max_failures == 2
    assert (trainer.run_config.storage_path, trainer.run_config.name) == (str(tmp_path), "run")
    fixed = build_trainer(
        TrainConfig.from_dict({"cluster": {"num_workers": 2}}), tmp_path / "f", False, "disabled"
    )
    assert (
        fixed.scaling_config.num_workers == 2 and fixed.scaling_config.placement_strategy == "PACK"
    )


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_spreads_two_ddp_workers_and_survives_losing_a_node(
    cluster: LoopbackCluster, digits_dataset: Path, tmp_path: Path
) -> None:
    """`ray job submit --working-dir . -- python launch/train.py` as the README writes it, with
    `--placement spread` and `--max-failures 1`: its two 1-CPU DDP workers (which would fit on
    one 2-CPU node) land on the two CPU nodes, and the console a user follows is the launcher's
    (one line per epoch, no Ray Train dicts). Once epoch 2 is registered, one of those nodes is
    lost whole (its `ray start`, raylet and worker killed): Ray Train restarts the group from
    that checkpoint on what is left, and the job succeeds with every epoch trained once. (One
    run for both: a second 6-epoch job only for the loss cost half a minute of the budget.)"""
    nodes = cluster.alive_nodes()
    run_dir = tmp_path / "spread"
    submit = _job(
        cluster,
        "submit",
        *("--submission-id", "spread-job", "--working-dir", str(REPO), "--no-wait"),
        "--",
        *("python", "launch/train.py", "--data-dir", str(digits_dataset)),
        *train_args(
            tmp_path, "spread", 2, "--placement", "spread", "--epochs", "6", *TINY, quiet=False
        ),
        *("--max-failures", "1"),
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline = time.monotonic() + 600
    while registered_epoch(run_dir) < 2:
        job = next(j for j in cluster.state("jobs") if j.get("submission_id") == "spread-job")
        assert job["status"] in ("PENDING", "RUNNING"), job
        assert time.monotonic() < deadline, "epoch 2's checkpoint"
        time.sleep(0.5)
    job_id = job["job_id"]
    first = [w for w in _train_workers(cluster, job_id) if w["state"] == "ALIVE"]
    assert len(first) == 2, first
    placed = {w["node_id"] for w in first}
    # From Ray's own state: one worker on each of the two CPU nodes (the head has no CPUs).
    assert len(placed) == 2 and placed <= {n for n, name in nodes.items() if name != "head"}, (
        placed,
        nodes,
    )
    victim = next(n for n in cluster.nodes if n.node_id in placed)
    with _frozen(victim):  # mid-epoch, as in a long one
        killed = cluster.kill(victim)
    assert len(killed) >= 3, killed  # `ray start`, its raylet, at least one worker
    # `ray job logs --follow` returns when the job ends, as a user would watch it.
    logs = _job(cluster, "logs", "spread-job", "--follow", timeout=900)
    status = _job(cluster, "status", "spread-job")
    assert "Job 'spread-job' succeeded" in status.stdout + status.stderr, logs.stdout[-4000:]
    cluster.add_node(f"r{len(cluster.nodes)}", cpus=2)  # the replacement, for the tests after

    log = logs.stdout
    # The console names the node of every rank, as Ray knows it (checked on the restarted
    # group: Ray's log deduplication may fold a first-group line into its repeat).
    ids = {w["actor_id"] for w in first}
    again = [w for w in _train_workers(cluster, job_id) if w["actor_id"] not in ids]
    assert len(again) == 2 and not {w["node_id"] for w in again} & {victim.node_id}, again
    for w in again:
        assert f"Ray node {w['node_id'][:12]}" in log, log[-3000:]
    assert "placement spread" in log
    # Every rank restored the same checkpoint, of epoch 2 or (frozen just after it) 3, and
    # went on from there: each epoch is logged once, in order (not restarted from scratch).
    restored = set(re.findall(r"Ray Train restored checkpoint \S*checkpoint_epoch(\d{4})", log))
    assert len(restored) == 1, log[-4000:]
    back = int(restored.pop())
    assert 2 <= back < 6, log[-4000:]
    # The console a user follows: both ranks in one gloo group, one line per epoch trained
    # before the restored checkpoint (an epoch whose line was printed but whose checkpoint Ray
    # had not yet registered is trained again, and logged again), no Ray Train dicts.
    assert re.search(r"DDP worker rank 0/2 .* process group gloo", log), log[-3000:]
    assert re.search(r"DDP worker rank 1/2 .* process group gloo", log), log[-3000:]
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log
    for epoch in range(1, back + 1):
        assert len(re.findall(rf"epoch {epoch}/6: train loss", log)) == 1, epoch
    assert "epoch 6/6: train loss" in log and "test report (360 images" in log
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").open()]
    assert epochs == [0, 1, 2, 3, 4, 5], epochs
    assert load_checkpoint(run_dir)["loop"]["epoch"] == 6
    report = json.loads((run_dir / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2 and report["epochs_run"] == 6
    assert report["test_samples"] == 360
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_epoch*"))
    assert checkpoints == ["checkpoint_epoch0005", "checkpoint_epoch0006"]  # --keep-checkpoints 2


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


# Last on the module's cluster: run before the elastic test, it made that one take 173 s instead
# of 60. No placement group or worker outlives the killed driver (State API); what does is Ray
# Train's autoscaling coordinator (a detached actor), whose resource requests expire only after
# 180 s: most likely the killed trial's request, which the elastic run's growth waits out.
@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_a_sweep_that_continues_after_its_driver_is_killed(
    cluster: LoopbackCluster, small_digits: Path, tmp_path: Path
) -> None:
    """A sweep as a Ray job on the module's cluster, with Optuna's TPE search (the `optuna`
    extra, which CI installs; skipped, and reported so, without it). Once its first trial has
    finished and the second has logged an epoch, the job's driver is killed (SIGKILL, as an OOM
    killer would), the trials held still first so that a fast one cannot finish. The same
    `ray job submit` again continues the sweep: the finished trial is not trained again, the
    interrupted one goes on from its registered checkpoint, Optuna's state is Tune's own, and
    the best trial is exported. (One sweep for the Ray job, the search and the resume: each of them
    alone cost 45 to 50 s of the test budget.)"""
    from .test_sweep import _rows, _sweep_args

    pytest.importorskip("optuna", reason="the optuna extra: pip install -e '.[optuna]'")

    # Two live 2-CPU nodes (as the module's cluster starts; a test before may have lost one).
    while len([n for n in cluster.nodes if n.name != "head" and n.proc.poll() is None]) < 2:
        cluster.add_node(f"o{len(cluster.nodes)}", cpus=2)
    sweep = tmp_path / "job"
    runtime_env = {"env_vars": {"RESNET18_DIST_CACHE": os.environ["RESNET18_DIST_CACHE"]}}
    command = [
        *("--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--"),
        "python",
        "launch/sweep.py",
        *_sweep_args(small_digits, tmp_path, "job", "--num-samples", "2", *TINY),
        *("--lr-range", "0.01,0.2", "--max-epochs", "4", "--grace-period", "4"),
        # One trial at a time, so that one has finished when the other is interrupted.
        *("--max-concurrent", "1", "--search", "optuna"),
        *("--wandb-mode", "disabled", "--max-int8-drop", "100"),
    ]
    submit = _job(cluster, "submit", "--submission-id", "sweep-1", "--no-wait", *command)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline = time.monotonic() + 400
    while True:
        # Optuna's trials are named by Tune's random trial ids: the finished one has its test
        # report, the interrupted one its first epoch logged and no report yet.
        trials = [d for d in sweep.glob("trial-*") if d.is_dir()]
        done = [d for d in trials if (d / "report.json").is_file()]
        # ... and Ray Train has registered its epoch-1 checkpoint (a kill before that would
        # restart it from scratch, which the epochs check below could not tell apart).
        going = [d for d in trials if d not in done and registered_epoch(d) >= 1]
        if done and going:
            (finished,), (interrupted,) = done, going
            break
        job = next(j for j in cluster.state("jobs") if j.get("submission_id") == "sweep-1")
        assert job["status"] in ("PENDING", "RUNNING"), job
        assert time.monotonic() < deadline, "the second trial's first epoch"
        time.sleep(0.1)
    workers = [p for n in cluster.nodes if n.name != "head" for p in _worker_processes(n)]
    for p in workers:
        p.send_signal(signal.SIGSTOP)
    drivers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "launch/sweep.py" in " ".join(p.info["cmdline"] or [])
        and str(sweep.parent) in " ".join(p.info["cmdline"] or [])
    ]
    assert drivers, "no sweep driver to kill"
    for p in drivers:
        p.send_signal(signal.SIGKILL)
    try:  # the trials stay frozen until Ray has failed the job (its SIGKILL reaches them)
        deadline = time.monotonic() + 120
        while (
            job := next(j for j in cluster.state("jobs") if j.get("submission_id") == "sweep-1")
        )["status"] in ("PENDING", "RUNNING"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
    finally:
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
    assert job["status"] == "FAILED", job
    first_epoch = (interrupted / "metrics.jsonl").read_text().splitlines()[0]
    # Killed mid-trial: the second trial has not finished, no sweep result is written.
    assert not (interrupted / "report.json").exists() and not (sweep / "trials.csv").exists()
    before = (finished / "report.json").stat().st_mtime_ns, (finished / "metrics.jsonl").read_text()

    proc = _job(cluster, "submit", "--submission-id", "sweep-2", *command, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert f"continuing sweep {sweep}" in log, log[-3000:]
    assert "The cluster has 4 CPU(s): 2 trial(s) fit at once; running 1 at once." in log
    assert "optuna search" in log
    after = (finished / "report.json").stat().st_mtime_ns, (finished / "metrics.jsonl").read_text()
    assert after == before  # the finished trial was not trained again
    rows = _rows(sweep)
    assert sorted(r["trial"] for r in rows) == sorted([finished.name, interrupted.name]), rows
    assert all(r["status"] == "finished" and r["epochs_run"] == "4" for r in rows), rows
    assert len({r["lr"] for r in rows}) == 2  # two samples from TPE's start-up
    # The interrupted trial continued from its checkpoint: each epoch was logged once, and its
    # first epoch's line is the one written before the kill (a restart rewrites the file).
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2, 3], lines
    assert lines[0] == first_epoch
    assert (sweep / "best" / "model.int8.onnx").is_file()
    # Tune's own record of the searcher that ran (the console above only echoes the option):
    # a Searcher such as OptunaSearch saves searcher-state-*.pkl, the random search
    # (BasicVariantGenerator) basic-variant-state-*.json instead.
    assert list(sweep.glob("searcher-state-*.pkl")), sorted(p.name for p in sweep.iterdir())
    assert not list(sweep.glob("basic-variant-state-*.json"))


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
