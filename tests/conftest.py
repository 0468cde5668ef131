"""Shared fixtures: real digits datasets (full and small), the CIFAR-10 JPEGs when present."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .ray_cluster import free_port  # one port allocator for every test (and its workers)

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train.tar.gz"

# No test may reach W&B's servers; tests that check W&B set offline mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The digits cache lives in the test session's temp dir, never in the user's home."""
    os.environ["RESNET18_DIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with one bucket (tests/s3_server.py); the environment
    that points at it. One for the session: each test module keeps to its own prefixes."""
    from .s3_server import moto_server

    with moto_server(tmp_path_factory) as env:
        yield env


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's 1,797 real digits as an ImageFolder of JPEGs."""
    from resnet18_dist.data.digits import render_digits

    return render_digits(tmp_path_factory.mktemp("digits-src") / "digits")


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full digits, prepared (1077 / 360 / 360)."""
    from resnet18_dist.data.digits import prepare_digits

    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare_digits(out, quiet=True)
    return out


def subset_folder(src: Path, dst: Path, per_class: int, classes: int | None = None) -> Path:
    """Copy the first ``per_class`` images of each (of the first ``classes``) class."""
    for i, class_dir in enumerate(sorted(p for p in src.iterdir() if p.is_dir())):
        if classes is not None and i >= classes:
            break
        (dst / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(f, dst / class_dir.name / f.name)
    return dst


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory: pytest.TempPathFactory, digits_folder: Path) -> Path:
    """40 real digits per class (240 / 80 / 80), prepared: small enough for loop tests."""
    from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset

    root = tmp_path_factory.mktemp("small")
    src = subset_folder(digits_folder, root / "src", per_class=40)
    out = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(src), out=str(out), quiet=True, min_shards=3))
    return out


def make_color_folder(root: Path, num_classes: int, per_class: int, size: int = 16) -> Path:
    """Images whose label can be read back from the pixels: class k has red level 20 + 20 k,
    with random texture in green and blue so that no two images are alike."""
    rng = np.random.default_rng(0)
    for k in range(num_classes):
        d = root / f"class{k:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = np.empty((size, size, 3), np.uint8)
            img[..., 0] = 20 + 20 * k
            img[..., 1:] = rng.integers(0, 256, (size, size, 2))
            Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=95, subsampling=0)
    return root


def red_to_label(red_mean: float) -> int:
    return round((red_mean - 20) / 20)


@pytest.fixture(scope="session")
def cifar_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 50,000 CIFAR-10 training JPEGs (ImageFolder), extracted from ../shared/data."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"CIFAR-10 JPEGs not available ({CIFAR_TAR} is absent)")
    out = tmp_path_factory.mktemp("cifar")
    with tarfile.open(CIFAR_TAR) as tar:
        tar.extractall(out, filter="data")
    return out / "train"


@pytest.fixture(scope="session")
def gray_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 flat mid-grey 32-px PNGs in 2 classes: augmentation is all that changes them."""
    root = tmp_path_factory.mktemp("gray")
    for c in range(2):
        d = root / "src" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (32, 32), (128, 128, 128)).save(d / f"{i}.png")
    out = root / "prepared"
    from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset

    prepare_dataset(PrepareOptions(source=str(root / "src"), out=str(out), quiet=True))
    return out


def load_launcher(name: str):
    """A launch/ script as a module, so a test can call its main() in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def small_run(small_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run of a quarter-width ResNet18 on the small digits (a real
    checkpoint for tests that need one)."""
    from resnet18_dist.config import (
        DataConfig,
        LoggingConfig,
        ModelConfig,
        OptimConfig,
        RunDirConfig,
        TrainConfig,
    )
    from resnet18_dist.engine.epoch_sink import LocalEpochSink
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.session import run_training

    run_dir = tmp_path_factory.mktemp("small-run") / "run"
    cfg = TrainConfig(
        data=DataConfig(data_dir=str(small_digits), batch_size=32),
        # A quarter-width ResNet18 (the same code path, 1/16 of the weights): the tests that
        # use this run check files, refusals and export errors, not what the model learned.
        model=ModelConfig(width=0.25),
        optim=OptimConfig(epochs=1, lr=0.05),
        run=RunDirConfig(seed=1),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )
    run_training(cfg, TorchRuntime(cfg.device), LocalEpochSink(run_dir), run_dir)
    return run_dir


# The README's quick start, word for word (tests/test_readme.py checks that it still is).
MAIN_JOB = "python launch/train.py --num-workers 2"


def user_env() -> dict[str, str]:
    """A user's terminal after the quick start's `. .venv/bin/activate`: the venv's bin/ first
    on PATH; the private Ray the first command on a laptop starts (never a cluster another test
    module runs on this machine); no W&B."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": os.pathsep.join((venv_bin, os.environ.get("PATH", ""))),
        "RAY_ADDRESS": "local",
        "WANDB_MODE": "disabled",
    }


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's main job, typed as the quick start writes it (`python launch/train.py
    --num-workers 2`, through bash, in a user's working directory that holds a checkout's
    launch/): the default digits, 2 DDP workers under a private Ray, the default 15 epochs of
    the real ResNet18. One trained run (its directory under that working directory's runs/,
    its console) for every test that needs a trained model: the main job's bar, the export,
    predict, the REST endpoint, and the README's later commands (tests/test_readme.py goes on
    in the same working directory)."""
    cwd = tmp_path_factory.mktemp("main-job") / "work"
    cwd.mkdir()
    (cwd / "launch").symlink_to(REPO / "launch")  # a checkout's launch/, and nothing else
    proc = subprocess.run(
        ["bash", "-c", MAIN_JOB],
        cwd=cwd,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (run,) = (cwd / "runs").iterdir()
    return run, log


# The README's export of the quick start's run, word for word (tests/test_readme.py checks that
# it still is, and types it with the options it appends: tests/test_readme.py OVERRIDES).
README_EXPORT = "python launch/export.py --checkpoint runs/<name> --out exports/<name> --triton"
# The consoles of the README commands that a session fixture ran, for tests/test_readme.py.
SHARED_CONSOLES: dict[str, str] = {}


@pytest.fixture(scope="session")
def digits_export(digits_run: tuple[Path, str]) -> tuple[Path, dict]:
    """The README's export of the main job's run (model.pt, ONNX FP32 and INT8, a Triton
    repository, the report), typed in the main job's working directory as tests/test_readme.py
    types it; (the export directory, its report). One export for every test that needs one,
    and the one the README's later commands (predict, serve) use."""
    from .test_readme import UserShell, page_commands, read_pages

    cwd = digits_run[0].parents[1]
    commands = [c for c in page_commands(read_pages()) if c.text == README_EXPORT]
    assert commands, f"the README no longer has `{README_EXPORT}`"
    command = commands[0]
    shell = UserShell(cwd, flowers=cwd / "data" / "flowers")
    shell.run(command)
    SHARED_CONSOLES[command.text] = shell.outputs[command.text]
    out = cwd / "exports" / digits_run[0].name
    return out, json.loads((out / "report.json").read_text())


EXPORT_LATENCY_ITERS = 20


def run_ranks(target, world: int, *args, timeout: float = 600) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes that form one gloo
    process group on loopback (torchrun's environment variables); every rank must exit 0."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, port, args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}"


def _rank_main(target, rank: int, world: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        target(rank, world, *args)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def launch(script: str, *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python launch/<script>.py ARGS`` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def train_args(
    output_dir: Path, name: str, workers: int = 2, *extra: str, quiet: bool = True
) -> list[str]:
    """The training command's options for a W&B-free run into ``output_dir/name``."""
    return [
        "--num-workers",
        str(workers),
        "--output-dir",
        str(output_dir),
        "--name",
        name,
        "--wandb-mode",
        "disabled",
        *(["--quiet"] if quiet else []),
        *extra,
    ]


def corrupt_sample(dataset: Path, out: Path, split: str, shard: int, member: int):
    """A copy of ``dataset`` in ``out`` whose ``member``-th tar member of the ``shard``-th shard
    of ``split`` is overwritten with zeros; returns (manifest, shard path, tar member)."""
    from resnet18_dist.data.manifest import Manifest

    shutil.copytree(dataset, out)
    manifest = Manifest.load(out)
    path = manifest.shard_paths(split)[shard]
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    raw = bytearray(path.read_bytes())
    raw[info.offset_data : info.offset_data + info.size] = b"\0" * info.size
    path.write_bytes(bytes(raw))
    return manifest, path, info


def cpu_settings(
    bs: int = 16,
    *,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    workers: int = 0,
    channels_last: bool = False,
):
    """LoaderSettings for one CPU rank (the same batch size for training and evaluation)."""
    import torch

    from resnet18_dist.data.batching import LoaderSettings

    return LoaderSettings(
        batch_size=bs,
        eval_batch_size=bs,
        rank=rank,
        world_size=world,
        seed=seed,
        workers=workers,
        device=torch.device("cpu"),
        channels_last=channels_last,
    )


def assert_two_rank_console(log: str, epochs: int) -> None:
    """The console a user reads from a 2-worker Ray Train run: both DDP ranks in one gloo
    process group; one line per epoch from rank 0, none of Ray Train's per-rank
    ``TrainingReport(...)`` dicts or checkpoint lines (they come back with --verbose, see
    test_dali.py's Ray run); the test report at the end."""
    import re

    assert re.search(r"DDP worker rank 0/2 .* process group gloo", log), log[-3000:]
    assert re.search(r"DDP worker rank 1/2 .* process group gloo", log), log[-3000:]
    assert "TrainingReport(" not in log and "Checkpoint successfully created" not in log
    for epoch in range(1, epochs + 1):
        assert len(re.findall(rf"epoch {epoch}/{epochs}: train loss", log)) == 1, epoch
    assert "test report (360 images" in log
