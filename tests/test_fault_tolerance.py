"""A Ray Train worker killed mid-run (SIGKILL, as an OOM killer or a lost node would): without
``--max-failures`` the launcher says what failed and where the intact checkpoints are, and the
same command again resumes from them. With it,
Ray restarts the group from the last checkpoint, and a driver killed with its private Ray is
resumed by running the same command again: tests/test_storage_s3.py runs both in one run whose
checkpoints are in a bucket (one Ray start fewer than a run of its own here)."""

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

from .conftest import REPO
from .ray_cluster import registered_epoch

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
def test_killed_worker_without_retries_is_a_clear_error_and_the_same_command_resumes(
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

    # The same command again, as the error says: the plan finds the newest whole checkpoint on
    # this disk and resumes from it; every epoch is trained and logged once across both runs.
    # (The same on a bucket, after a killed worker and a killed driver: tests/test_storage_s3.py.)
    kept = checkpoint_epoch(latest_checkpoint_in(run_dir).parent)
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert f"resuming unfinished run {run_dir} at epoch {kept + 1} of 5" in out, out[-3000:]
    trained = [int(e) for e in re.findall(r"epoch (\d+)/5: train loss", out)]
    assert trained == list(range(kept + 1, 6)), trained
    assert _epochs_logged(run_dir) == list(range(5))
    assert json.loads((run_dir / "report.json").read_text())["epochs_run"] == 5


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
