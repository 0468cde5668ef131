from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet18_dist.atomic import WriteError
from resnet18_dist.data import prepare as prepare_mod
from resnet18_dist.data.manifest import Manifest, parse_index
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.data.sources import SourceError

from .conftest import REPO, subset_folder


def _prepare(src: Path, out: Path, **kw) -> prepare_mod.PrepareResult:
    return prepare_dataset(PrepareOptions(source=str(src), out=str(out), quiet=True, **kw))


def test_digits_split_is_6_2_2_and_stratified(digits_dataset: Path) -> None:
    m = Manifest.load(digits_dataset)
    assert m.counts == {"train": 1077, "val": 360, "test": 360}
    assert m.num_classes == 10 and m.native_size == 8
    totals = np.sum([m.class_counts[s] for s in ("train", "val", "test")], axis=0)
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        # Stratified: every class is within one image of its exact share.
        assert np.all(np.abs(np.array(m.class_counts[split]) - frac * totals) <= 1), split
    # Shard counts and index files agree with the manifest, and keys never repeat.
    keys = set()
    for split in ("train", "val", "test"):
        refs = [r for i, p in enumerate(m.index_paths(split)) for r in parse_index(p, i)]
        assert len(refs) == m.counts[split] == sum(s.count for s in m.shards[split])
        keys |= {r.key for r in refs}
    assert len(keys) == 1797


def test_shards_are_webdataset_tars(digits_dataset: Path) -> None:
    m = Manifest.load(digits_dataset)
    with tarfile.open(m.shard_paths("val")[0]) as tar:
        names = tar.getnames()
        assert names[0].endswith(".jpg") and names[1] == names[0][:-3] + "cls"
        label = int(tar.extractfile(names[1]).read())
        img = Image.open(tar.extractfile(names[0]))
        img.load()
    assert 0 <= label < 10 and img.size == (8, 8)


def test_preparation_is_deterministic_for_a_seed(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=15)
    a = json.loads(Path(_prepare(src, tmp_path / "a", seed=3).out / "manifest.json").read_text())
    b = json.loads(Path(_prepare(src, tmp_path / "b", seed=3).out / "manifest.json").read_text())
    c = json.loads(Path(_prepare(src, tmp_path / "c", seed=4).out / "manifest.json").read_text())
    sha = lambda m: [s["sha256"] for split in ("train", "val", "test") for s in m["shards"][split]]  # noqa: E731
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)
    assert a["seed"] == 3 and c["seed"] == 4


def test_bad_files_are_rejected_and_listed(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=10)
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(big)
    (src / "3" / "truncated.jpg").write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
    (src / "4" / "empty.jpg").write_bytes(b"")
    (src / "5" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    result = _prepare(src, tmp_path / "out")
    rejected = {Path(r["path"]).name: r["reason"] for r in result.rejects}
    assert set(rejected) == {"truncated.jpg", "empty.jpg", "notes.jpg"}
    assert "0 bytes" in rejected["empty.jpg"]
    assert "identify" in rejected["notes.jpg"]
    assert "truncated" in rejected["truncated.jpg"] or "decode" in rejected["truncated.jpg"]
    on_disk = json.loads((tmp_path / "out" / "rejects.json").read_text())
    assert {Path(r["path"]).name for r in on_disk} == set(rejected)
    assert all(Path(r["path"]).is_absolute() or "/" in r["path"] for r in on_disk)
    assert sum(result.counts.values()) == 100  # the 100 good images, nothing else


def test_prepare_cli_reports_rejects(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=10)
    (src / "0" / "zero.jpg").write_bytes(b"")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/prepare_data.py"),
            "--source",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "rejected 1 file(s)" in proc.stdout and "zero.jpg: empty file (0 bytes)" in proc.stdout


def test_a_class_without_valid_images_is_an_error(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=5, classes=3)
    for f in (src / "1").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(SourceError, match="class.*1"):
        _prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_and_missing_sources_are_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such"):
        _prepare(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class"):
        _prepare(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir()
    with pytest.raises(SourceError, match="no files"):
        _prepare(tmp_path / "empty", tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_is_an_error(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=5)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="permission denied"):
            _prepare(src, locked / "out")
    finally:
        locked.chmod(0o700)


def test_unwritable_output_is_an_error_even_as_root(digits_folder: Path, tmp_path: Path) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=5)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(WriteError, match=str(blocker)):
        _prepare(src, blocker / "out")


def test_failed_preparation_leaves_the_existing_dataset_intact(
    digits_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = subset_folder(digits_folder, tmp_path / "src", per_class=10)
    out = tmp_path / "out"
    _prepare(src, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}

    def failing_jpeg(item):  # the disk fills up half-way through writing shards
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(28, "No space left on device")
        return prepare_mod._SOURCE.jpeg_bytes(item)

    monkeypatch.setattr(prepare_mod, "_jpeg", failing_jpeg)
    with pytest.raises(OSError):
        _prepare(src, out, seed=9)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def _write_cifar_batches(root: Path, digits_folder: Path) -> Path:
    """torchvision's cifar-10-batches-py layout, filled with real digits upscaled to 32x32."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    files = sorted(digits_folder.glob("*/*.jpg"))
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))[:600]]
    rows = np.stack(
        [
            np.asarray(Image.open(f).convert("RGB").resize((32, 32))).transpose(2, 0, 1).reshape(-1)
            for f in files
        ]
    )
    labels = [int(f.parent.name) for f in files]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        sl = slice(i * 100, (i + 1) * 100)
        with open(d / name, "wb") as fh:
            pickle.dump({b"data": rows[sl], b"labels": labels[sl]}, fh)
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [str(i) for i in range(10)]}, fh)
    return d


def test_cifar_batches_keep_their_own_test_split(digits_folder: Path, tmp_path: Path) -> None:
    _write_cifar_batches(tmp_path / "src", digits_folder)
    result = _prepare(tmp_path / "src", tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    # 500 training-batch images -> 375 train / 125 val (the 6:2 ratio); test_batch kept whole.
    assert result.counts == {"train": 375, "val": 125, "test": 100}
    assert m.raw["source"]["kind"] == "cifar10-batches"
    assert "kept" in m.raw["split_rule"]
    assert m.native_size == 32


@pytest.mark.cifar
@pytest.mark.slow
def test_cifar10_jpegs_split_30k_10k_10k(cifar_train_dir: Path, tmp_path: Path) -> None:
    result = _prepare(cifar_train_dir, tmp_path / "cifar")
    assert result.counts == {"train": 30000, "val": 10000, "test": 10000}
    m = Manifest.load(tmp_path / "cifar")
    assert m.classes[:3] == ["airplane", "automobile", "bird"]
    for split, per_class in (("train", 3000), ("val", 1000), ("test", 1000)):
        assert m.class_counts[split] == [per_class] * 10
    assert result.rejects == []


def _oriented_jpeg(path: Path, orientation: int = 6) -> None:
    """A 32x16 JPEG (left half red, right half blue) tagged with an EXIF orientation: as a phone
    stores a photo taken in portrait, which viewers turn 90 degrees (Orientation=6)."""
    img = np.zeros((16, 32, 3), np.uint8)
    img[:, :16] = (220, 20, 20)
    img[:, 16:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(path, quality=95, subsampling=0, exif=exif)


def test_exif_orientation_is_applied_at_preparation(tmp_path: Path) -> None:
    """Defect 1: every decoder must see the same, upright image. PIL ignores the EXIF tag,
    DALI's decoder applies it; preparation stores the image upright with no tag left."""
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(5):
            _oriented_jpeg(tmp_path / "src" / c / f"{i}.jpg")
    _prepare(tmp_path / "src", tmp_path / "out")
    m = Manifest.load(tmp_path / "out")
    assert m.max_side == 32 and m.native_size is None  # 16 wide, 32 high
    with tarfile.open(m.shard_paths("train")[0]) as tar:
        member = next(x for x in tar.getmembers() if x.name.endswith(".jpg"))
        with Image.open(tar.extractfile(member)) as img:
            img.load()
            assert img.size == (16, 32)  # upright, as DALI and every viewer show it
            assert img.getexif().get(0x0112, 1) == 1  # no rotation left for a decoder to apply
            top, bottom = np.asarray(img)[2, 8], np.asarray(img)[29, 8]
    # Orientation 6 turns the image clockwise: the left (red) half ends up on top.
    assert top[0] > 150 and top[2] < 100 and bottom[2] > 150 and bottom[0] < 100


def test_outputs_honour_the_umask(digits_folder: Path, tmp_path: Path) -> None:
    """Defect 5: a dataset or export is often read by another user (a shared disk, a serving
    process); mkstemp's 0600 and mkdtemp's 0700 made every output owner-only."""
    src = subset_folder(digits_folder, tmp_path / "src", per_class=5)
    old = os.umask(0o022)
    try:
        _prepare(src, tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777) == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


class _Boom:
    """Unpickling this runs code: it touches a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_cifar_batches_are_unpickled_with_a_restricted_unpickler(
    digits_folder: Path, tmp_path: Path
) -> None:
    """Defect 6: any --source with a batches.meta was unpickled, so a dataset could run code."""
    root = _write_cifar_batches(tmp_path / "src", digits_folder)
    marker = tmp_path / "pwned"
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [str(i) for i in range(10)], b"x": _Boom(str(marker))}, fh)
    with pytest.raises(SourceError, match=r"batches.meta.*not allowed"):
        _prepare(tmp_path / "src", tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cifar_batches_pickled_by_python2_numpy_still_load(
    digits_folder: Path, tmp_path: Path
) -> None:
    """The real CIFAR-10 files are protocol-2 pickles of numpy arrays; they must still load."""
    root = _write_cifar_batches(tmp_path / "src", digits_folder)
    for f in root.iterdir():
        with open(f, "rb") as fh:
            obj = pickle.load(fh)
        with open(f, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    result = _prepare(tmp_path / "src", tmp_path / "out")
    assert result.counts == {"train": 375, "val": 125, "test": 100}
