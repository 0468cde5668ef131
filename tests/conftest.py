"""Shared fixtures: real digits datasets (full and small), the CIFAR-10 JPEGs when present."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
