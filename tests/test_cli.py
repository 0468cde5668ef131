from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet18_dist.cli import build_parser, config_from_args
from resnet18_dist.config import TrainConfig, option_fields

from .conftest import REPO

TRAIN = str(REPO / "launch" / "train.py")


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_documents_every_option() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for _, f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        assert flag in proc.stdout, flag
    assert "--config" in proc.stdout and "(default: 0.1)" in proc.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lr", "-1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--dropout", "1.5"], "--dropout"),
        (["--se-reduction", "5"], "--se-reduction"),
        (["--data-dir", "/no/such/dataset"], "--data-dir"),
        (["--min-lr", "1.0"], "--min-lr"),
        (["--batch-size", "1"], "--batch-size"),
        (["--augment", "mixup"], "--augment"),
        (["--config", "/no/such.yaml"], "--config"),
    ],
)
def test_invalid_options_exit_2_naming_the_option(args: list[str], option: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert option in proc.stderr
    assert "Ray Train" not in proc.stdout  # rejected before Ray or any worker started


def test_yaml_config_with_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": "1e-3", "epochs": 3}, "run": {"seed": 5}}))
    parser = build_parser("test")
    cfg = config_from_args(parser, ["--config", str(path), "--epochs", "4"])
    assert cfg.optim.lr == 1e-3  # PyYAML reads 1e-3 as a string; it is coerced
    assert cfg.optim.epochs == 4  # the flag wins
    assert cfg.run.seed == 5
    assert cfg.optim.momentum == 0.9  # defaults fill the rest
    # The config a run writes is itself a valid --config.
    cfg.dump_yaml(tmp_path / "round.yaml")
    assert TrainConfig.load_yaml(tmp_path / "round.yaml") == cfg


def test_yaml_errors_name_the_section_or_option(tmp_path: Path, capsys) -> None:
    parser = build_parser("test")
    bad = tmp_path / "bad.yaml"
    for content, needle in (
        ({"optim": {"lrr": 0.1}}, "lrr"),
        ({"optimizer": {}}, "optimizer"),
        ({"optim": {"lr": "fast"}}, "--lr"),
        ({"optim": {"lr": -2.0}}, "--lr"),
    ):
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(SystemExit) as exc:
            config_from_args(parser, ["--config", str(bad)])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_cpus_exits_2_before_workers_start(tmp_path: Path) -> None:
    proc = _run("--num-workers", "64", "--output-dir", str(tmp_path), "--wandb-mode", "disabled")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--num-workers" in proc.stderr and "64 workers" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run directory: no worker ever started
