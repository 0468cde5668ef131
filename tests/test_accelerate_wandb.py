"""The accelerate fallback with 2 CPU ranks, cross-launcher resume with Ray Train, W&B offline
runs read back with wandb's own reader, and compare.py on the three runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .conftest import REPO
from .ray_cluster import free_port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO
    )
    if proc.returncode != 0:
        log = proc.stdout + proc.stderr
        errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
        pytest.fail(f"{cmd} failed ({proc.returncode}):\n" + "\n".join(errors[-20:]) + log[-3000:])
    return proc


def _accelerate(*args: str) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` starts a single process with accelerate 1.15
    # (it needs MPI for multi-CPU); torchrun gives the Accelerator two real CPU ranks.
    return _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "launch/train_accelerate.py",
            *args,
        ]
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    common = ["--output-dir", str(out), "--quiet", "--wandb-group", "cross-launcher"]
    # Launchers, resume and logging, not learning: a ResNet18 at a quarter of the width (1/16
    # of the compute), which every run (and the checkpoint it resumes) shares.
    common += ["--width", "0.25"]
    logs = {}
    logs["acc"] = _accelerate(
        "--epochs", "1", "--name", "acc", "--wandb-mode", "offline", "--log-every", "2", *common
    )
    logs["ray"] = _run(
        [
            sys.executable,
            "launch/train.py",
            "--epochs",
            "2",
            "--name",
            "ray",
            "--resume",
            str(out / "acc"),
            "--wandb-mode",
            "disabled",
            *common,
        ]
    )
    logs["acc2"] = _accelerate(
        "--epochs",
        "3",
        "--name",
        "acc2",
        "--resume",
        str(out / "ray"),
        "--wandb-mode",
        "disabled",
        *common,
    )
    return {"out": out, **{k: v.stdout + v.stderr for k, v in logs.items()}}  # type: ignore[dict-item]


@pytest.mark.slow
@pytest.mark.ray
def test_accelerate_runs_two_ranks_and_writes_test_metrics(runs: dict) -> None:
    log = runs["acc"]
    assert "DDP worker rank 0/2" in log and "DDP worker rank 1/2" in log
    assert "accelerate: 2 process(es)" in log
    report = json.loads((runs["out"] / "acc" / "report.json").read_text())
    assert report["resolved"]["world_size"] == 2 and report["resolved"]["runtime"] == "accelerate"
    assert report["test_samples"] == 360 and 0 < report["test_top1"] <= 1
    assert "test report (360 images" in log
    assert (runs["out"] / "acc" / "checkpoint_epoch0001" / "checkpoint.pt").is_file()


@pytest.mark.slow
@pytest.mark.ray
def test_checkpoints_resume_across_launchers(runs: dict) -> None:
    out = runs["out"]
    ray_report = json.loads((out / "ray" / "report.json").read_text())
    assert ray_report["resolved"]["runtime"] == "ray_train"
    assert ray_report["epochs_run"] == 2
    # The Ray run trained only epoch 2: epoch 1 came from the accelerate checkpoint.
    ray_epochs = [json.loads(x)["epoch"] for x in (out / "ray" / "metrics.jsonl").open()]
    assert ray_epochs == [1]
    assert "resumed from" in runs["ray"]
    acc2 = json.loads((out / "acc2" / "report.json").read_text())
    assert acc2["epochs_run"] == 3 and acc2["resolved"]["runtime"] == "accelerate"
    assert [json.loads(x)["epoch"] for x in (out / "acc2" / "metrics.jsonl").open()] == [2]


def _leet(*args: str) -> str:
    wandb_cli = str(Path(sys.executable).with_name("wandb"))
    proc = subprocess.run(
        [wandb_cli, "leet", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_wandb_offline_run_reads_back_with_wandbs_reader(runs: dict) -> None:
    run_dirs = list((runs["out"] / "acc" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    summary = json.loads(_leet("--summary", "--json", str(run_dirs[0])))
    assert summary["state"] == "finished" and summary["project"] == "resnet18-dist"
    keys = set(summary["summary"])
    assert {
        "train_loss",
        "train_top1",
        "val_top1",
        "val_loss",
        "val_f1_macro",
        "lr",
        "peak_memory_mb",
        "system/peak_memory_mb",
        "test_top1",
        "test_f1_macro",
    } <= keys
    config = summary["config"]
    assert config["optim"]["lr"] == 0.1 and config["resolved"]["world_size"] == 2
    assert "accelerate" in summary["tags"]
    records = [
        json.loads(line) for line in _leet("--json", str(run_dirs[0])).splitlines() if line.strip()
    ]
    text = json.dumps(records)
    assert '"cross-launcher"' in text  # the group
    assert '"train"' in text  # the job_type
    assert "test/per_class" in text and "test/confusion" in text  # the test report tables
    assert "model-acc" in text  # the best model as an artifact
    assert "step/loss" in text  # per-step logging


@pytest.mark.slow
@pytest.mark.ray
def test_compare_prints_the_table_and_writes_a_plot(runs: dict, tmp_path: Path) -> None:
    out = runs["out"]
    png = tmp_path / "cmp.png"
    proc = _run(
        [
            sys.executable,
            "launch/compare.py",
            str(out / "acc"),
            str(out / "ray"),
            str(out / "acc2"),
            "--plot",
            str(png),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0]
    assert "optim.epochs" in header and "run.resume" in header  # the config differences
    assert "best val top-1" in header and "test top-1" in header and "train img/s" in header
    assert [line.split()[0] for line in lines[2:5]] == ["acc", "ray", "acc2"]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 800 and img.height > 300
    sweep = _run(
        [
            sys.executable,
            "launch/compare.py",
            "--sweep",
            str(out),
            "--plot",
            str(tmp_path / "sweep.png"),
        ]
    )
    assert sweep.returncode == 0, sweep.stderr
    table = sweep.stdout.split("\n\n")[0].splitlines()
    names = [line.split()[0] for line in table[2:]]
    assert {"acc", "ray", "acc2"} <= set(names)  # every run below the directory, by name
    with Image.open(tmp_path / "sweep.png") as img:
        assert img.format == "PNG" and img.width > 800


def test_wandb_needs_no_account_auto_is_offline_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What lets the runs above log to W&B on a machine with no account or network."""
    from resnet18_dist.config import TrainConfig
    from resnet18_dist.integrations.wandb import resolve_mode, run_tags

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"  # the environment wins over auto
    assert resolve_mode("offline") == "offline"  # an explicit --wandb-mode wins over both
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline"
    # The tags the comparison views group by: launcher, world size, architecture, SE.
    cfg = TrainConfig.from_dict({"model": {"se_reduction": 8}})
    assert run_tags(cfg, "accelerate", 2) == ["accelerate", "workers2", "resnet18", "se8"]
