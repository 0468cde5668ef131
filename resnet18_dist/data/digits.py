"""The built-in default dataset: scikit-learn's bundled digits (1,797 real 8x8 scans, 10 classes).

It ships inside scikit-learn, so the main job runs with no network. The images are rendered to
JPEG files in ImageFolder layout and prepared like any user dataset, into a cache directory.
"""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from resnet18_dist import storage
from resnet18_dist.cache import cache_root
from resnet18_dist.data.manifest import MANIFEST
from resnet18_dist.data.prepare import PrepareOptions, PrepareResult, prepare_dataset

DIGITS_VERSION = "digits-v2"  # bump when rendering or preparation changes the bytes
DIGITS_SOURCE = "digits"  # the --source value, and the manifest's source path


def render_digits(out: Path) -> Path:
    """Write the digits as ``out/<digit>/<index>.jpg`` and return ``out``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out.mkdir(parents=True, exist_ok=True)
    # Pixel values are 0..16 ink counts; scale to 0..255 and draw dark ink on white like paper.
    pixels = (255 - np.rint(digits.images * (255.0 / 16.0))).astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, digits.target, strict=True)):
        class_dir = out / str(label)
        class_dir.mkdir(exist_ok=True)
        Image.fromarray(img, mode="L").convert("RGB").save(
            class_dir / f"{i:04d}.jpg", quality=95, subsampling=0
        )
    return out


def prepare_digits(out: Path, quiet: bool = True, **options: object) -> PrepareResult:
    """Render the digits and prepare them into ``out`` (any PrepareOptions may be given)."""
    with tempfile.TemporaryDirectory(prefix="digits-src-") as tmp:
        src = render_digits(Path(tmp) / "digits")
        settings = {"quiet": quiet, "augment_hint": "none", **options}
        opts = PrepareOptions(source=str(src), out=str(out), **settings)  # type: ignore[arg-type]
        return prepare_dataset(opts, source_label=DIGITS_SOURCE)


def dataset_dir(
    data_dir: str | None, expect_sha256: str | None = None, fetch_threads: int | None = None
) -> Path:
    """The prepared dataset a run reads: ``--data-dir`` (a local path, or object storage copied
    into this node's cache, ``fetch_threads`` shards at a time, refused if its manifest is not
    ``expect_sha256`` when given), or the built-in digits by default."""
    if storage.is_remote(data_dir):
        from resnet18_dist.data.remote import FETCH_THREADS, fetch_dataset

        return fetch_dataset(data_dir, expect_sha256, threads=fetch_threads or FETCH_THREADS)
    return Path(data_dir) if data_dir else ensure_digits_dataset()


def ensure_digits_dataset(cache: Path | None = None, quiet: bool = True) -> Path:
    """Prepare the digits dataset into the cache on first use and return its directory.

    Safe to call from several workers at once: a file lock makes one of them prepare it and the
    others wait, so no reader ever sees the directory mid-swap.
    """
    root = Path(cache) if cache is not None else cache_root()
    target = root / DIGITS_VERSION
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{DIGITS_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MANIFEST).is_file():
            prepare_digits(target, quiet=quiet)
    return target
