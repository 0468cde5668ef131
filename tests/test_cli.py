from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.config import TrainConfig
from resnet18_dist.options import ConfigError

from .conftest import launch


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return launch("train", *args, timeout=timeout)


def test_help_documents_every_option() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for _, f, _ in TrainConfig.option_fields():
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["cli"]:
            assert flag in proc.stdout, flag
        else:  # set by the launcher or a YAML file only
            assert flag not in proc.stdout, flag
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
    parser = build_parser(TrainConfig, "test")
    cfg = parse_options(TrainConfig, parser, ["--config", str(path), "--epochs", "4"])
    assert cfg.optim.lr == 1e-3  # PyYAML reads 1e-3 as a string; it is coerced
    assert cfg.optim.epochs == 4  # the flag wins
    assert cfg.run.seed == 5
    assert cfg.optim.momentum == 0.9  # defaults fill the rest
    # The config a run writes is itself a valid --config.
    cfg.dump_yaml(tmp_path / "round.yaml")
    assert TrainConfig.load_yaml(tmp_path / "round.yaml") == cfg


# A run's config.yaml as older versions wrote it: cluster, device and logging options under `run`.
OLD_LAYOUT = {
    "optim": {"lr": 0.05, "epochs": 3},
    "run": {
        "name": "old",
        "seed": 4,
        "num_workers": "1:2",
        "placement": "spread",
        "use_gpu": "off",
        "amp": "off",
        "wandb_mode": "disabled",
        "quiet": True,
    },
}


def test_a_config_in_the_old_single_run_section_layout_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(OLD_LAYOUT))
    parser = build_parser(TrainConfig, "test")
    # A flag in the new layout still overrides the file's value under the old `run` section.
    cfg = parse_options(TrainConfig, parser, ["--config", str(path), "--placement", "pack"])
    assert (cfg.run.name, cfg.run.seed) == ("old", 4)
    assert (cfg.cluster.min_workers, cfg.cluster.max_workers) == (1, 2)
    assert cfg.cluster.placement == "pack"
    assert (cfg.device.use_gpu, cfg.device.amp) == ("off", "off")
    assert (cfg.logging.wandb_mode, cfg.logging.quiet) == ("disabled", True)
    # Written back, it is in the new layout, and reads the same.
    cfg.dump_yaml(tmp_path / "new.yaml")
    written = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert set(written) == {*TrainConfig.sections()} and "num_workers" not in written["run"]
    assert TrainConfig.load_yaml(tmp_path / "new.yaml") == cfg
    # An unknown key under `run` is still an error naming it.
    bad = {"run": {**OLD_LAYOUT["run"], "num_wokers": 2}}
    with pytest.raises(ConfigError, match="num_wokers"):
        TrainConfig.from_dict(bad)


def test_compare_lines_up_an_old_layout_run_with_a_new_one(tmp_path: Path) -> None:
    from resnet18_dist.compare import differing_config, load_run

    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        d.mkdir()
        (d / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 0.5}\n')
    # Written by hand, in the old layout and without the options added since: those read as
    # their defaults, which the old run trained with.
    (old / "config.yaml").write_text(yaml.safe_dump(OLD_LAYOUT))
    cfg = TrainConfig.from_dict(OLD_LAYOUT)
    cfg.cluster.placement = "pack"
    cfg.dump_yaml(new / "config.yaml")
    runs = [load_run(old), load_run(new)]
    # Only the option that differs, under its new section's name.
    assert differing_config(runs) == ["cluster.placement"]


def test_yaml_errors_name_the_section_or_option(tmp_path: Path, capsys) -> None:
    parser = build_parser(TrainConfig, "test")
    bad = tmp_path / "bad.yaml"
    for content, needle in (
        ({"optim": {"lrr": 0.1}}, "lrr"),
        ({"optimizer": {}}, "optimizer"),
        ({"optim": {"lr": "fast"}}, "--lr"),
        ({"optim": {"lr": -2.0}}, "--lr"),
    ):
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(SystemExit) as exc:
            parse_options(TrainConfig, parser, ["--config", str(bad)])
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.slow
def test_more_workers_than_cpus_exits_2_before_workers_start(tmp_path: Path) -> None:
    # A batch that 64 workers could split (16 training images each), so that the CPUs are what
    # is refused.
    proc = _run(
        *("--num-workers", "64", "--batch-size", "8", "--output-dir", str(tmp_path)),
        *("--wandb-mode", "disabled"),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--num-workers" in proc.stderr and "64 workers" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run directory: no worker ever started


def test_yaml_booleans_are_accepted_for_on_off_options(tmp_path: Path) -> None:
    """Defect 7: YAML reads an unquoted `off` as false; the on/off/auto options take it."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "run:\n  use_gpu: off\n  channels_last: on\n  amp: off\ndata:\n  verify_shards: no\n"
    )
    cfg = parse_options(TrainConfig, build_parser(TrainConfig, "test"), ["--config", str(path)])
    assert (
        cfg.device.use_gpu == "off" and cfg.device.channels_last == "on" and cfg.device.amp == "off"
    )
    assert cfg.data.verify_shards == "off"


def test_ray_train_v1_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """Defect 11: Ray Train V1 (RAY_TRAIN_V2_ENABLED=0) has no result.return_value; the
    launcher needs V2 and says so at once instead of failing after training."""
    import os

    proc = launch(
        "train",
        "--output-dir",
        str(tmp_path),
        "--wandb-mode",
        "disabled",
        timeout=180,
        env={**os.environ, "RAY_TRAIN_V2_ENABLED": "0"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "RAY_TRAIN_V2_ENABLED" in proc.stderr and "V2" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_console_command_offers_every_subcommand() -> None:
    """`pip install -e .` installs `resnet18-dist`; its subcommands take the launchers' options."""
    exe = Path(sys.executable).with_name("resnet18-dist")
    assert exe.is_file(), "the console script is missing: pip install -e ."
    proc = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: resnet18-dist train")
    for _, f, _ in TrainConfig.option_fields():
        assert ("--" + f.name.replace("_", "-") in proc.stdout) == f.metadata["cli"], f.name
    for command, needle in (("prepare", "--shard-size"), ("export", "--calibration-images")):
        proc = subprocess.run([exe, command, "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and needle in proc.stdout, proc.stderr
    bad = subprocess.run([exe, "train", "--lr", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lr" in bad.stderr
    unknown = subprocess.run([exe, "fly"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown command 'fly'" in unknown.stderr


def test_launch_holds_one_script_per_console_command_and_nothing_else() -> None:
    """launch/ is what users run (one script per `resnet18-dist` subcommand); the benchmark and
    GPU-check scripts live in benchmarks/."""
    from resnet18_dist.commands import COMMANDS

    from .conftest import REPO

    scripts = {p.stem for p in (REPO / "launch").glob("*.py")}
    expected = {module for module, _ in COMMANDS.values()} | {"prepare_data"}
    assert scripts == expected - {"prepare"}, scripts ^ (expected - {"prepare"})
    for script in scripts:
        text = (REPO / "launch" / f"{script}.py").read_text()
        assert "from resnet18_dist.commands" in text, script  # a thin entry point, no logic
    assert {p.stem for p in (REPO / "benchmarks").glob("*.py")} >= {"gpu_check", "benchmark_loop"}


def test_errors_are_mapped_to_exit_codes_once_for_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """commands.run: an option error exits 2 with the usage line and the option named; a
    domain error prints one line and exits 1; an unexpected error prints one line (its
    traceback only with --verbose or RESNET18_DIST_VERBOSE=1) and exits 1."""
    from resnet18_dist.commands import run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)  # a directory that is not a run
    with pytest.raises(SystemExit) as exit_:
        run("compare", ["runs/a"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: resnet18-dist compare"), err
    assert f"error: RUNS: {tmp_path / 'runs' / 'a'}: not a run directory" in err, err

    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text('{"epoch": 0, "val_top1": 0.5}\n')

    def bug(*args, **kwargs):  # a fault injected where a bug would be
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr("resnet18_dist.compare.summary_rows", bug)
    assert run("compare", ["runs/a"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ZeroDivisionError: simulated bug") and "Traceback" not in err
    assert err.count("\n") == 1, err

    (tmp_path / "src" / "c0").mkdir(parents=True)  # a class with no images: a SourceError
    assert run("prepare", ["--source", "src", "--out", "data/x", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "src" in err, err

    monkeypatch.setenv("RESNET18_DIST_VERBOSE", "1")
    with pytest.raises(ZeroDivisionError):  # the bug's own traceback, for a bug report
        run("compare", ["runs/a"])
