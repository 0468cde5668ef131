"""Relative paths as users type them: resolved once in the launchers, so Ray workers and Tune
trials (each in a working directory of its own) find the same files; and every project
exception survives the pickle that carries it from a worker to the driver."""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.options import Options

# Every command's options class (the sweep's includes the training options).
OPTION_CLASSES = {
    "train": "resnet18_dist.config:TrainConfig",
    "sweep": "resnet18_dist.tuning.space:SweepConfig",
    "prepare": "resnet18_dist.data.prepare:PrepareOptions",
    "export": "resnet18_dist.export.pipeline:ExportOptions",
    "predict": "resnet18_dist.commands.predict:PredictOptions",
    "serve": "resnet18_dist.serve.options:ServeOptions",
    "compare": "resnet18_dist.commands.compare:CompareOptions",
    "benchmark": "resnet18_dist.commands.benchmark:BenchmarkOptions",
}
# Field names that hold a path in this project; a new one must be declared with path=...
PATH_NAMES = {
    "data_dir",
    "output_dir",
    "resume",
    "pretrained",
    "teacher",
    "teacher_weights",
    "checkpoint",
    "out",
    "source",
    "model",
    "images",
    "runs",
    "sweep",
    "plot",
    "api_key_file",
}


def _load(spec: str) -> type[Options]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _project_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    import resnet18_dist.tuning  # tuning/ of the checkout, mapped under the package

    walk = [
        *pkgutil.walk_packages(resnet18_dist.__path__, "resnet18_dist."),
        *pkgutil.walk_packages(resnet18_dist.tuning.__path__, "resnet18_dist.tuning."),
    ]
    names = [m.name for m in walk if not m.name.endswith("__main__")]  # __main__ runs
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional extra (TensorRT...) that is not installed
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.split(".")[0] == "resnet18_dist"
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def _instance(cls: type[BaseException]) -> BaseException:
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self"
        and p.default is inspect.Parameter.empty
        and p.kind == p.POSITIONAL_OR_KEYWORD
    ]
    args = [413 if p.annotation in (int, "int") else f"{p.name} text" for p in params]
    return cls(*args) if args else cls("a message naming /some/file")


def test_every_project_exception_survives_pickle_with_its_message() -> None:
    classes = _project_exceptions()
    names = {c.__name__ for c in classes}
    # The ones that crossed process boundaries before (and the two with their own __init__).
    assert {"ConfigError", "ApiError", "CheckpointError", "DatasetError", "StorageError"} <= names
    for cls in classes:
        exc = _instance(cls)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == str(exc), cls
        assert vars(back) == vars(exc), cls


@pytest.mark.parametrize("command", sorted(OPTION_CLASSES))
def test_every_path_option_is_declared_and_made_absolute(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = _load(OPTION_CLASSES[command])
    monkeypatch.chdir(tmp_path)
    for section, f, _ in cls.option_fields():
        if f.name not in PATH_NAMES or not f.metadata.get("cli", True):
            continue
        assert "path" in f.metadata, f"{command}: --{f.name} holds a path but is not path=..."
        raw: dict = {}
        where = raw.setdefault(section, {}) if section else raw
        where[f.name] = ["sub/a.jpg"] if f.metadata.get("nargs") in ("+", "*") else "sub/x"
        from resnet18_dist.cli import absolute_paths

        out = absolute_paths(cls, raw)
        got = (out[section] if section else out)[f.name]
        want = str(tmp_path / "sub" / ("a.jpg" if isinstance(got, list) else "x"))
        assert (got[0] if isinstance(got, list) else got) == want, f.name
        for keyword in f.metadata["path"]:  # words such as `torchvision` stay words
            where[f.name] = keyword
            assert (absolute_paths(cls, raw)[section] if section else raw)[f.name] == keyword
        where[f.name] = "s3://bucket/prefix?endpoint_override=127.0.0.1:9000"
        kept = (absolute_paths(cls, raw)[section] if section else raw)[f.name]
        assert kept == "s3://bucket/prefix?endpoint_override=127.0.0.1:9000"


def test_train_options_from_the_command_line_are_absolute_defaults_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_digits: Path
) -> None:
    from resnet18_dist.config import TrainConfig

    monkeypatch.chdir(small_digits.parent)
    parser = build_parser(TrainConfig, "")
    cfg = parse_options(TrainConfig, parser, ["--data-dir", small_digits.name, "--resume"])
    assert cfg.data.data_dir == str(small_digits)
    assert cfg.run.output_dir == str(small_digits.parent / "runs")  # the default, resolved
    assert cfg.run.resume == "this"
    # A worker rebuilds the config from its dict in another directory: it still validates.
    monkeypatch.chdir(tmp_path)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_abbreviated_options_are_refused(small_digits: Path) -> None:
    from resnet18_dist.config import TrainConfig

    parser = build_parser(TrainConfig, "")
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--num-worker", "2"])
    assert exc.value.code == 2


def _cli(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    code = "from resnet18_dist.commands import main; import sys; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.ray
def test_relative_data_output_resume_teacher_and_pretrained_reach_ray_workers(
    tmp_path: Path, digits_folder: Path
) -> None:
    """A run whose --data-dir, --output-dir, --resume, --teacher and --pretrained are all
    relative, as typed in a working directory: every Ray worker validates them in its own
    directory. (The README's own-data example itself runs in tests/test_readme.py.)"""
    from resnet18_dist.config import (
        DataConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )
    from resnet18_dist.engine.epoch_sink import LocalEpochSink
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.session import run_training
    from tests.conftest import subset_folder

    subset_folder(digits_folder, tmp_path / "src", per_class=20)
    r = _cli(tmp_path, "prepare", "--source", "src", "--out", "data/x", "--quiet")
    assert r.returncode == 0, r.stderr
    # The earlier run the relative paths name, trained in this process (no Ray needed for it).
    r1 = tmp_path / "runs" / "r1"
    cfg = TrainConfig(
        data=DataConfig(data_dir=str(tmp_path / "data" / "x"), image_size=8),
        model=ModelConfig(width=0.25),  # paths, not learning: a quarter-width ResNet18
        optim=OptimConfig(epochs=1),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )
    run_training(cfg, TorchRuntime(cfg.device), LocalEpochSink(r1), r1)
    assert (r1 / "report.json").is_file() and (r1 / "model.pt").is_file()
    common = ["--data-dir", "data/x", "--image-size", "8", "--width", "0.25", "--quiet"]
    r = _cli(
        tmp_path,
        "train",
        *common,
        "--epochs",
        "2",
        "--name",
        "r2",
        "--resume",
        "runs/r1/checkpoint_epoch0001",
        "--teacher",
        "runs/r1",
        "--pretrained",
        "runs/r1/model.pt",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "runs" / "r2" / "report.json").is_file()
    lines = (tmp_path / "runs" / "r2" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # epoch 2 only: epoch 1 came from r1's checkpoint


def test_a_worker_side_refusal_reaches_the_driver_as_one_clear_line() -> None:
    """What Ray does with a worker's exception: pickle it, raise it again in the driver."""
    from resnet18_dist.options import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("--data-dir", "data/x is not a prepared dataset")))
    assert str(err) == "--data-dir: data/x is not a prepared dataset"
    assert err.option == "--data-dir"


def test_a_dataset_too_small_for_the_batch_is_refused_before_ray_starts(
    tmp_path: Path, small_digits: Path
) -> None:
    # 240 training images over 2 workers is 120 each, fewer than a batch of 200.
    args = ["--data-dir", str(small_digits), "--num-workers", "2", "--batch-size", "200"]
    r = _cli(tmp_path, "train", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--batch-size" in r.stderr and "120 per worker" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_fresh_resume_into_the_moved_run_is_what_the_workers_get(
    tmp_path: Path, small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--fresh --resume runs/r1/checkpoint_epoch0001 --name r1``: the launcher moves r1 aside,
    and the options it hands the workers name the moved copy."""
    import shutil

    from resnet18_dist.config import TrainConfig
    from resnet18_dist.launching.preflight import preflight

    monkeypatch.chdir(tmp_path)
    shutil.copytree(small_run, tmp_path / "runs" / "r1")
    parser = build_parser(TrainConfig, "")
    args = ["--name", "r1", "--fresh", "--resume", "runs/r1/checkpoint_epoch0001"]
    cfg = parse_options(TrainConfig, parser, [*args, "--epochs", "2"])
    typed = cfg.to_dict()
    launch = preflight(cfg, "ray").planned(use_gpu=False)
    plan = launch.plan
    assert Path(plan.moved_aside).name.startswith("r1.prev-")
    assert cfg.to_dict() == typed  # the command line's options are not changed
    worker_cfg = TrainConfig.from_dict(launch.config.to_dict())
    assert worker_cfg.run.resume == str(plan.resume_from)
    assert Path(worker_cfg.run.resume).is_file()


def test_a_worker_validates_options_without_looking_at_its_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths are checked once, by the launcher's preflight (naming the option), not again by
    every worker or trial that reads the options: on a worker, a path given on the driver's
    machine may not exist (this is how relative paths broke under Ray)."""
    from resnet18_dist.config import TrainConfig
    from resnet18_dist.launching.preflight import check_paths
    from resnet18_dist.options import ConfigError

    monkeypatch.chdir(tmp_path)
    missing = {
        "--data-dir": {"data": {"data_dir": "data/nowhere"}},
        "--pretrained": {"model": {"pretrained": "weights/nowhere.pt"}},
        "--teacher": {"distill": {"teacher": "runs/no-teacher"}},
        "--teacher-weights": {"distill": {"teacher": "resnet34", "teacher_weights": "w.pt"}},
        "--resume": {"run": {"resume": "runs/nowhere/checkpoint_epoch0001"}},
    }
    for option, raw in missing.items():
        cfg = TrainConfig.from_dict(raw)  # pure: no error on a worker
        with pytest.raises(ConfigError) as err:
            check_paths(cfg)
        assert err.value.option == option, (option, err.value)
