"""A Ray Train worker killed mid-run (SIGKILL, as an OOM killer or a lost node would): with
``--max-failures`` Ray restarts the group from the last checkpoint; without, the launcher says
what failed and where the intact checkpoints are."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from resnet18_dist.checkpoint_file import load_checkpoint

from .conftest import REPO

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _train_and_kill_a_worker(
    digits_dataset: Path, out: Path, max_failures: int, after_epoch_logged: bool
) -> tuple[subprocess.CompletedProcess, Path]:
    """Start a 2-worker run and SIGKILL one worker: as soon as epoch 2's checkpoint file
    appears (written under a temporary name and renamed, so whole), or, with
    ``after_epoch_logged``, once epoch 2 is logged (its report done) and Ray has had a moment to
    register it, i.e. early in epoch 3."""
    run_dir = out / "ft"
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        "--data-dir",
        str(digits_dataset),
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--epochs",
        "5",
        "--max-failures",
        str(max_failures),
        "--output-dir",
        str(out),
        "--name",
        "ft",
        "--wandb-mode",
        "disabled",
        "--quiet",
    ]
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        killed = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if _ready_to_kill(run_dir, after_epoch_logged):
                # Only this run's own workers: descendants of the launcher (its local Ray).
                workers = [
                    p
                    for p in psutil.Process(proc.pid).children(recursive=True)
                    if "RayTrainWorker" in " ".join(_cmdline(p))
                ]
                if workers:
                    killed = workers[0]
                    killed.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.2)
        assert killed is not None, "the run ended before a worker could be killed"
        rc = proc.wait(timeout=600)
    text = (out / "log.txt").read_text()
    return subprocess.CompletedProcess(cmd, rc, text, ""), run_dir


def _ready_to_kill(run_dir: Path, after_epoch_logged: bool) -> bool:
    if not after_epoch_logged:
        return (run_dir / "checkpoint_epoch0002" / "checkpoint.pt").is_file()
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
        time.sleep(2.0)  # Ray's controller registers a reported checkpoint asynchronously
        return True
    return False


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _epochs_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def test_killed_worker_is_restarted_from_the_last_checkpoint(
    digits_dataset: Path, tmp_path: Path
) -> None:
    proc, run_dir = _train_and_kill_a_worker(
        digits_dataset, tmp_path, max_failures=1, after_epoch_logged=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Ray Train restored checkpoint" in proc.stdout
    assert "test report (360 images" in proc.stdout
    epochs = _epochs_logged(run_dir)
    # Resumed, not restarted: epochs 1 and 2 were trained once; every epoch is logged.
    assert epochs[:2] == [0, 1] and epochs.count(0) == 1 and epochs.count(1) == 1, epochs
    assert sorted(set(epochs)) == [0, 1, 2, 3, 4], epochs
    report = json.loads((run_dir / "report.json").read_text())
    assert report["test_samples"] == 360 and report["test_top1"] > 0.5


def test_killed_worker_without_retries_is_a_clear_error_and_keeps_checkpoints(
    digits_dataset: Path, tmp_path: Path
) -> None:
    proc, run_dir = _train_and_kill_a_worker(
        digits_dataset, tmp_path, max_failures=0, after_epoch_logged=False
    )
    assert proc.returncode == 1
    assert "error: training failed" in proc.stdout
    assert f"continue with --resume {run_dir}" in proc.stdout
    # What was saved before the kill is intact: the newest whole checkpoint resumes. (The kill
    # may land while epoch 2's checkpoint is being written: it is written under a temporary
    # name and renamed, so it is either whole or absent.)
    state = load_checkpoint(run_dir)
    assert state["loop"]["epoch"] >= 1 and "model" in state
    assert not list(run_dir.rglob("*.tmp"))
