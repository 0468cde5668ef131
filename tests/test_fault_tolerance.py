"""A Ray Train worker killed mid-run (SIGKILL, as an OOM killer or a lost node would): with
``--max-failures`` Ray restarts the group from the last checkpoint; without, the launcher says
what failed and where the intact checkpoints are. A driver killed with its private Ray is resumed
by running the same command again (in the same run as a killed worker: one Ray start fewer)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from resnet18_dist.checkpoint_file import checkpoint_epoch, latest_checkpoint_in, load_checkpoint

from .conftest import REPO, train_args
from .ray_cluster import kill_with_its_ray, registered_epoch

# Failure handling, not learning: a ResNet18 at a quarter of the width (1/16 of the compute)
# trains an epoch of the digits in about a second.
TINY = ("--width", "0.25")


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
        *TINY,
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
                    # The workers hold still (as in a long epoch) while one is killed, so
                    # that a fast epoch cannot end the run first.
                    _signal(workers, signal.SIGSTOP)
                    killed.send_signal(signal.SIGKILL)
                    _signal(workers, signal.SIGCONT)
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
    logged = metrics.is_file() and len(metrics.read_text().splitlines()) >= 2
    return logged and registered_epoch(run_dir) >= 2  # Ray registers checkpoints async


def _signal(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _epochs_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


@pytest.mark.slow
@pytest.mark.ray
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


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_worker_is_restarted_by_ray_and_a_killed_driver_by_the_same_command(
    digits_dataset: Path, tmp_path: Path
) -> None:
    """One run, two failures. A worker is killed (SIGKILL, as an OOM killer would) once epoch
    2 is registered: with --max-failures 1 Ray Train restarts the group from that checkpoint.
    Then the process running launch/train.py dies with its private Ray (a lost laptop session,
    a killed job): the same command again resumes from the newest complete checkpoint, no flag
    needed. Every epoch is trained and logged once across the three worker groups."""
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        *("--data-dir", str(digits_dataset), "--epochs", "8", *TINY),
        *train_args(tmp_path, "driver", 2, "--cpus-per-worker", "1", "--max-failures", "1"),
    ]
    run_dir = tmp_path / "driver"
    first_log = tmp_path / "first.log"

    def wait_for(what: str, ready) -> None:
        deadline = time.monotonic() + 600
        while not ready():
            assert first.poll() is None, f"ended waiting for {what}:\n" + first_log.read_text()
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    with open(first_log, "w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        # Epoch 2 logged and registered by Ray: a worker dies early in epoch 3.
        wait_for("epoch 2", lambda: _ready_to_kill(run_dir, after_epoch_logged=True))
        workers = [
            p
            for p in psutil.Process(first.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(_cmdline(p))
        ]
        assert workers, "no Ray Train worker to kill"
        # The workers hold still (as in a long epoch) while one is killed, so that a fast
        # epoch cannot end the run first.
        _signal(workers, signal.SIGSTOP)
        workers[0].send_signal(signal.SIGKILL)
        _signal(workers, signal.SIGCONT)
        # Ray restarts the group from the checkpoint; once the new group has checkpointed an
        # epoch of its own, the session is lost: the driver and its private Ray die together.
        wait_for("the restored group's checkpoint", lambda: registered_epoch(run_dir) >= 3)
        kill_with_its_ray(first)
    text = first_log.read_text()
    assert re.search(r"Ray Train restored checkpoint \S*checkpoint_epoch000[23]", text), text
    assert len(re.findall(r"epoch 1/8: train loss", text)) == 1, text[-3000:]  # resumed
    done = checkpoint_epoch(latest_checkpoint_in(run_dir).parent)
    assert 3 <= done < 8, done
    assert not (run_dir / "report.json").exists()

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resuming unfinished run {run_dir} at epoch {done + 1} of 8" in out, out[-3000:]
    # Epochs before the checkpoint are not trained again; the rest are, once each.
    trained = [int(e) for e in re.findall(r"epoch (\d+)/8: train loss", out)]
    assert trained == list(range(done + 1, 9)), trained
    assert _epochs_logged(run_dir) == list(range(8))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_run"] == 8 and report["test_samples"] == 360
    assert report["test_top1"] > 0.5
    assert load_checkpoint(run_dir)["loop"]["epoch"] == 8


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_for_the_newest_whole_one(
    tmp_path: Path,
) -> None:
    """What every resume above starts from: a checkpoint copied into place by other means
    (Ray Train's upload, a user's cp) and cut short by a kill is passed over, with the newest
    whole one taken instead."""
    import torch

    from resnet18_dist.checkpoint_file import write_checkpoint

    for epoch in (1, 2, 3):
        write_checkpoint(
            {"loop": {"epoch": epoch}, "model": {"w": torch.arange(1000.0)}, "model_spec": {}},
            tmp_path / f"checkpoint_epoch{epoch:04d}",
        )
    newest = tmp_path / "checkpoint_epoch0003" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # its zip directory, written last, is gone
    found = latest_checkpoint_in(tmp_path)
    assert found == tmp_path / "checkpoint_epoch0002" / "checkpoint.pt"
    assert checkpoint_epoch(found.parent) == 2
    assert load_checkpoint(tmp_path)["loop"]["epoch"] == 2  # a run directory resolves the same


def test_a_checkpoint_directory_name_reads_back_as_its_epoch(tmp_path: Path) -> None:
    """One place writes the name (after 0-based epoch e: checkpoint_epoch{e+1:04d}) and reads
    it back; the newest of several is found by that number, not by the names' sort order."""
    from resnet18_dist.checkpoint_file import checkpoint_dir_name, write_checkpoint

    assert [checkpoint_epoch(Path(checkpoint_dir_name(e))) for e in (0, 8, 9, 12344)] == [
        1,
        9,
        10,
        12345,
    ]
    assert checkpoint_dir_name(9) == "checkpoint_epoch0010"
    for epoch in (8998, 9999):  # "checkpoint_epoch10000" sorts before "checkpoint_epoch8999"
        write_checkpoint({"loop": {"epoch": epoch + 1}}, tmp_path / checkpoint_dir_name(epoch))
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "checkpoint_epoch8999"
    assert checkpoint_epoch(latest_checkpoint_in(tmp_path).parent) == 10000
