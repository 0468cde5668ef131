"""The run-name rule (defect 2), on both launchers: the same --name and --output-dir resumes an
unfinished run, refuses a finished one (exit 2) unless --resume extends it with more epochs, and
--fresh starts over in a new directory, keeping the old one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO


def _cmd(script: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch" / script),
        "--data-dir",
        str(data),
        "--batch-size",
        "32",
        "--output-dir",
        str(out),
        "--name",
        "r",
        "--wandb-mode",
        "disabled",
        "--quiet",
        *("--width", "0.25"),  # the run-name rule, not learning: a quarter-width ResNet18
        *extra,
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").open()]


@pytest.mark.slow
def test_accelerate_path_resumes_refuses_extends_and_starts_fresh(
    small_digits: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "r"
    # A run killed (SIGKILL, as a lost driver) once epoch 1's checkpoint is written ...
    proc = subprocess.Popen(
        _cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoint_epoch0001" / "checkpoint.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "ended before epoch 1"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "report.json").exists()
    # ... resumes when the same command runs again, with no flag, and says from where.
    again = _run(_cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "3"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming unfinished run" in again.stdout and "at epoch 2" in again.stdout
    assert _epochs(run_dir) == [0, 1, 2]  # each epoch logged once; epoch 1 not retrained
    finished = (run_dir / "report.json").read_bytes()

    # A finished run is refused: exit 2, nothing touched.
    refused = _run(_cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "3"))
    assert refused.returncode == 2
    assert "already finished" in refused.stderr and "--fresh" in refused.stderr
    assert (run_dir / "report.json").read_bytes() == finished
    assert _epochs(run_dir) == [0, 1, 2]
    # --resume with the same epochs has nothing to add: refused too.
    same = _run(_cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "3", "--resume"))
    assert same.returncode == 2 and "--epochs" in same.stderr

    # --resume extends it with a larger --epochs.
    more = _run(_cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "4", "--resume"))
    assert more.returncode == 0, more.stderr[-3000:]
    assert "extending finished run" in more.stdout
    assert _epochs(run_dir) == [0, 1, 2, 3]
    assert json.loads((run_dir / "report.json").read_text())["epochs_run"] == 4
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_epoch*"))
    assert checkpoints == ["checkpoint_epoch0003", "checkpoint_epoch0004"]

    # --fresh starts over in a new directory; the old run is kept, whole.
    fresh = _run(_cmd("train_accelerate.py", small_digits, tmp_path, "--epochs", "1", "--fresh"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("r.prev-")]
    assert len(kept) == 1 and _epochs(kept[0]) == [0, 1, 2, 3]
    assert (kept[0] / "report.json").is_file() and str(kept[0]) in fresh.stdout
    assert _epochs(run_dir) == [0]
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch*")) == ["checkpoint_epoch0001"]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_path_refuses_a_finished_run_before_ray_starts(
    small_run: Path, small_digits: Path
) -> None:
    out, name = small_run.parent, small_run.name
    before = (small_run / "report.json").read_bytes()
    cmd = _cmd("train.py", small_digits, out, "--epochs", "1")
    cmd[cmd.index("--name") + 1] = name
    proc = _run(cmd)
    assert proc.returncode == 2
    assert "already finished" in proc.stderr and "Ray Train:" not in proc.stdout
    assert (small_run / "report.json").read_bytes() == before


def test_a_metrics_line_lost_to_a_kill_is_rebuilt_from_the_checkpoint(tmp_path: Path) -> None:
    """Killed after epoch 3's checkpoint was reported but before its line was logged (and
    after a line of epoch 4 from a later attempt): the resume at epoch 4 keeps every epoch
    once, epoch 3's line taken from the checkpoint's own metrics."""
    import json

    from resnet18_dist.engine.callbacks import JsonlLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"epoch": e, "train_loss": 1.0 / (e + 1)}) + "\n" for e in (0, 1, 3))
        + '{"epoch": 4, "train_lo'  # a torn line
    )
    logger = JsonlLogger(path, start_epoch=3, resumed={"epoch": 2, "train_loss": 0.33, "x": [1]})
    logger.on_start({})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert lines[2] == {"epoch": 2, "train_loss": 0.33}
    logger.on_start({})  # idempotent: the line is not added twice
    assert len(path.read_text().splitlines()) == 3


def test_a_checkpoint_ray_never_registered_is_pruned_with_the_ones_it_drops(
    tmp_path: Path,
) -> None:
    """A driver killed after epoch 2's checkpoint was written but before Ray Train registered
    it: the rerun resumes from it, Ray keeps its newest two (5, 6) but never deletes epoch 2.
    The train command prunes it after the run; other directories and a newer checkpoint stay."""
    from resnet18_dist.engine.rundir import prune_untracked_checkpoints

    for name in ("checkpoint_epoch0002", "checkpoint_epoch0005", "checkpoint_epoch0006", "wandb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "checkpoint_epoch0007").mkdir()  # newer than what Ray reported: not ours to judge
    tracked = {"checkpoint_epoch0005", "checkpoint_epoch0006"}
    assert prune_untracked_checkpoints(tmp_path, tracked) == ["checkpoint_epoch0002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_epoch0005",
        "checkpoint_epoch0006",
        "checkpoint_epoch0007",
        "wandb",
    ]
    assert prune_untracked_checkpoints(tmp_path, set()) == []  # Ray kept none: nothing known
