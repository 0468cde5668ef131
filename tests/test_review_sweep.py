"""Sweeps (issue 21): --recipe reaches every trial; a rerun with other options is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO


def _sweep_config(argv: list[str]):
    from resnet18_dist.cli import build_parser, parse_options
    from resnet18_dist.tuning.space import SweepConfig

    return parse_options(SweepConfig, build_parser(SweepConfig, "sweep"), argv)


def test_recipe_values_reach_every_trial_config_under_the_given_ones(tmp_path: Path) -> None:
    from resnet18_dist.config import RECIPES
    from resnet18_dist.tuning.space import trial_config

    cfg = _sweep_config(["--recipe", "cifar", "--batch-size", "64", "--output-dir", str(tmp_path)])
    trial = trial_config(
        cfg.train_config().to_dict(), {"lr": 0.05, "weight_decay": 2e-4, "se_reduction": 8}
    )
    preset = RECIPES["cifar"]
    assert trial.optim.recipe == "cifar"
    assert trial.data.augment == preset["data"]["augment"]  # the recipe's, not the default
    assert trial.data.random_erasing == preset["data"]["random_erasing"]
    assert trial.optim.ema_decay == preset["optim"]["ema_decay"]
    assert trial.optim.label_smoothing == preset["optim"]["label_smoothing"]
    assert trial.optim.warmup_epochs == preset["optim"]["warmup_epochs"]
    assert trial.optim.epochs == preset["optim"]["epochs"]  # no --max-epochs: the recipe's
    assert trial.data.batch_size == 64  # given explicitly: over the recipe
    assert (trial.optim.lr, trial.optim.weight_decay) == (0.05, 2e-4)  # sampled: over both
    # --max-epochs still sets the trials' length under a recipe
    short = _sweep_config(["--recipe", "cifar", "--max-epochs", "3", "--output-dir", str(tmp_path)])
    assert short.train_config().optim.epochs == 3


def _saved_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    """sweep_config.yaml as the sweep writes it, for `--name s1 --output-dir sweeps ARGS` typed
    in ``tmp_path``."""
    from resnet18_dist.tuning.sweep import SWEEP_CONFIG

    monkeypatch.chdir(tmp_path)
    cfg = _sweep_config(["--name", "s1", "--output-dir", "sweeps", *args])
    sweep_dir = tmp_path / "sweeps" / "s1"
    sweep_dir.mkdir(parents=True)
    cfg.dump_yaml(sweep_dir / SWEEP_CONFIG)
    return sweep_dir


def test_a_rerun_with_other_options_exits_2_naming_each_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_dir = _saved_sweep(tmp_path, monkeypatch, "--num-samples", "4", "--max-epochs", "2")
    before = sorted(p.name for p in sweep_dir.iterdir())
    proc = subprocess.run(
        [
            *(sys.executable, str(REPO / "launch" / "sweep.py"), "--name", "s1"),
            *("--output-dir", "sweeps", "--num-samples", "8", "--max-epochs", "2"),
            *("--lr-range", "0.01,0.5", "--wandb-mode", "disabled"),
            # Were the check to let it through: fail on connecting, never start a local Ray.
            *("--address", "127.0.0.1:9"),
        ],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "--num-samples" in err and "--lr-range" in err, err
    assert "4" in err and "8" in err and "0.01,0.5" in err, err  # what it was, what it is now
    assert "--fresh" in err and "--name" in err, err  # the two ways out
    assert "--max-epochs" not in err.split("error:", 1)[1], err  # the same: not named
    assert "Ray" not in proc.stdout  # refused before Ray started
    assert sorted(p.name for p in sweep_dir.iterdir()) == before  # nothing written


def test_the_same_options_fresh_and_run_controls_pass_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resnet18_dist.options import ConfigError
    from resnet18_dist.tuning.sweep import check_same_sweep

    sweep_dir = _saved_sweep(tmp_path, monkeypatch, "--num-samples", "4")
    same = _sweep_config(["--name", "s1", "--output-dir", "sweeps", "--num-samples", "4"])
    check_same_sweep(same, sweep_dir)
    # A sweep saved before an option existed ran with its default: not a difference.
    saved = yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())
    del saved["model"]["dropout"]
    (sweep_dir / "sweep_config.yaml").write_text(yaml.safe_dump(saved))
    check_same_sweep(same, sweep_dir)
    # How this invocation runs, not what the sweep is: quiet, W&B mode, --resume, the export's
    # gate and measuring.
    controls = _sweep_config(
        [
            *("--name", "s1", "--output-dir", "sweeps", "--num-samples", "4", "--quiet"),
            *("--wandb-mode", "disabled", "--resume", "--max-int8-drop", "3", "--verbose"),
            *("--latency-iters", "3", "--throughput-seconds", "0.2"),  # the export's measuring
            *("--fetch-threads", "2"),  # how a node copies a bucket's dataset
        ]
    )
    check_same_sweep(controls, sweep_dir)
    fresh = _sweep_config(["--name", "s1", "--output-dir", "sweeps", "--fresh", "--seed", "3"])
    check_same_sweep(fresh, sweep_dir)  # starts over: nothing to compare with
    cifar = _sweep_config(
        ["--name", "s1", "--output-dir", "sweeps", "--num-samples", "4", "--recipe", "cifar"]
    )
    with pytest.raises(ConfigError) as err:
        check_same_sweep(cifar, sweep_dir)
    assert "--recipe" in str(err.value) and "--batch-size" in str(err.value)
    # A sweep saved in the older layout (cluster, device and logging options under `run`) is
    # the same sweep when continued with the same options, and another with other ones.
    saved = yaml.safe_load((sweep_dir / "sweep_config.yaml").read_text())
    for section in ("cluster", "device", "logging"):
        saved["run"].update(saved.pop(section))
    saved["run"]["num_workers"] = "2"
    (sweep_dir / "sweep_config.yaml").write_text(yaml.safe_dump(saved))
    two = ["--name", "s1", "--output-dir", "sweeps", "--num-samples", "4", "--num-workers", "2"]
    check_same_sweep(_sweep_config(two), sweep_dir)
    with pytest.raises(ConfigError, match="--num-workers was 2, now 1"):
        check_same_sweep(same, sweep_dir)
    # A saved file that no longer reads is named, not a traceback.
    (sweep_dir / "sweep_config.yaml").write_text("sweep: [unclosed\n")
    with pytest.raises(ConfigError, match="sweep_config.yaml"):
        check_same_sweep(same, sweep_dir)
