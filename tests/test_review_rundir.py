"""Code review of issue 21, the run directory and resuming: ``--fresh --resume`` into the run it
moves aside, ``--resume`` alone on a run that died before its first checkpoint, run names that
are not plain path components. (A bucket run's local mirror outliving the run: see the end.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnet18_dist.config import RunDirConfig, TrainConfig
from resnet18_dist.engine.rundir import plan_run
from resnet18_dist.options import ConfigError

from .conftest import REPO


def _train_cmd(data: Path, *extra: str) -> list[str]:
    """``python launch/train.py`` for a 1-worker, W&B-free run on 8-px digits, with a
    quarter-width ResNet18 (run directories, not learning)."""
    return [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        *("--data-dir", str(data), "--image-size", "8", "--batch-size", "32", "--width", "0.25"),
        *("--num-workers", "1", "--wandb-mode", "disabled", "--quiet"),
        *extra,
    ]


# ---------------------------------------------------------------- 5: --fresh --resume INTO_RUN
def test_fresh_resume_from_the_run_it_moves_aside_resumes_from_the_moved_copy(
    small_run: Path, tmp_path: Path
) -> None:
    """``--fresh --resume runs/r1/checkpoint_epoch0001 --name r1``: the checkpoint is found
    where the move put it (NAME.prev-TIMESTAMP/...), and the plan says so."""
    shutil.copytree(small_run, tmp_path / "r1")
    given = tmp_path / "r1" / "checkpoint_epoch0001"
    plan = plan_run(
        RunDirConfig(output_dir=str(tmp_path), name="r1", fresh=True, resume=str(given)), epochs=2
    )
    moved = Path(plan.moved_aside)
    assert moved.name.startswith("r1.prev-") and (moved / "report.json").is_file()
    assert plan.action == "new" and not (tmp_path / "r1").exists()
    assert Path(plan.resume_from) == moved / "checkpoint_epoch0001" / "checkpoint.pt"
    assert Path(plan.resume_from).is_file()
    assert f"starting from checkpoint {plan.resume_from}" in plan.describe()

    # The run directory itself as --resume: its newest checkpoint, in the moved copy.
    shutil.copytree(small_run, tmp_path / "r2")
    plan = plan_run(
        RunDirConfig(output_dir=str(tmp_path), name="r2", fresh=True, resume=str(tmp_path / "r2")),
        epochs=2,
    )
    moved = Path(plan.moved_aside)
    assert Path(plan.resume_from) == moved / "checkpoint_epoch0001" / "checkpoint.pt"
    assert Path(plan.resume_from).is_file()

    # The launcher's dry run (before Ray starts) moves nothing and plans the same mapping.
    shutil.copytree(small_run, tmp_path / "r3")
    given = tmp_path / "r3" / "checkpoint_epoch0001" / "checkpoint.pt"
    dry = plan_run(
        RunDirConfig(output_dir=str(tmp_path), name="r3", fresh=True, resume=str(given)),
        epochs=2,
        dry_run=True,
    )
    assert given.is_file() and not Path(dry.moved_aside).exists()
    assert Path(dry.resume_from) == Path(dry.moved_aside) / "checkpoint_epoch0001/checkpoint.pt"


# ------------------------------------------------ 6: --resume alone, died before a checkpoint
@pytest.mark.ray
@pytest.mark.slow
def test_resume_alone_restarts_a_run_that_died_before_its_first_checkpoint(
    small_digits: Path, tmp_path: Path
) -> None:
    """What a launcher leaves when its run dies during epoch 1: the header files (written by
    rank 0 before training), no checkpoint, no metrics line, no report. The plain command
    starts it again from epoch 1; ``--resume`` alone does the same (it failed in every worker,
    looking for a checkpoint the plan had found not to exist)."""
    run_dir = tmp_path / "runs" / "d"
    run_dir.mkdir(parents=True)
    cfg = TrainConfig.from_dict(
        {
            "data": {"data_dir": str(small_digits), "image_size": 8},
            "model": {"width": 0.25},
            "optim": {"epochs": 1},
        }
    )
    cfg.run.name, cfg.run.output_dir = "d", str(tmp_path / "runs")
    cfg.dump_yaml(run_dir / "config.yaml")
    (run_dir / "run_info.json").write_text(json.dumps({"start_epoch": 0}) + "\n")

    out = subprocess.run(
        _train_cmd(
            small_digits, "--epochs", "1", "--output-dir", "runs", "--name", "d", "--resume"
        ),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restarting unfinished run" in out.stdout and "from epoch 1 of 1" in out.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["epochs_run"] == 1
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").open()] == [0]


# ---------------------------------------------------------------- 8: run names
@pytest.mark.parametrize("name", ["exp#2", "exp%202", "a b", "x?y", "r/1", ".", "..", "é", "a:b"])
def test_a_run_name_outside_the_portable_set_is_refused_naming_the_option(name: str) -> None:
    """On s3:// a '#', '%20' or '?' in the name changed the prefix or dropped the URI's
    ``?endpoint_override``; a run name is one plain path component everywhere."""
    with pytest.raises(ConfigError) as err:
        RunDirConfig(name=name)
    assert err.value.option == "--name" and repr(name) in err.value.message


def test_portable_run_names_are_kept_and_the_sweep_checks_its_name_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from resnet18_dist.cli import build_parser, parse_options
    from resnet18_dist.tuning.space import SweepConfig

    for name in ("", "r1", "exp-2.v1_A", "train-20250101-120000-2", "trial-00003", "..a"):
        assert RunDirConfig(name=name).name == name
    # The sweep's directory is its --name, the same RunDirConfig field.
    with pytest.raises(SystemExit) as exit_:
        parse_options(SweepConfig, build_parser(SweepConfig, ""), ["--name", "s#1"])
    assert exit_.value.code == 2 and "error: --name:" in capsys.readouterr().err


def test_the_train_command_refuses_a_run_name_with_exit_code_2(
    small_digits: Path, tmp_path: Path
) -> None:
    out = subprocess.run(
        _train_cmd(small_digits, "--epochs", "1", "--output-dir", "runs", "--name", "exp#2"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "error: --name:" in out.stderr, out.stderr[-2000:]
    assert "[A-Za-z0-9._-]" in out.stderr and not (tmp_path / "runs").exists()


# 5 and 9 on a bucket (`--fresh --resume` from the run's own checkpoint reads the moved copy; the
# new run's metrics hold none of the old lines of the node's local mirror): the last step of
# tests/test_storage_s3.py's run on S3, which already holds such a finished run.
