"""The DALI backend, run CPU-only (device_id=None): the same pipeline definition as on a GPU."""

from __future__ import annotations

import shutil
import tarfile
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet18_dist.data.manifest import DatasetError, Manifest
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD, DataPolicy, crop_padding
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.data.torch_loader import ShardDataset, TorchvisionLoader, eval_transform

from .conftest import red_to_label

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install '.[dali]')")
from resnet18_dist.data.dali import DaliLoader, labels_from_ascii

pytestmark = pytest.mark.dali
CPU = torch.device("cpu")
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _dali(
    manifest: Manifest,
    split: str,
    policy: DataPolicy,
    *,
    train: bool,
    rank: int = 0,
    world: int = 1,
    bs: int = 16,
    seed: int = 0,
    channels_last: bool = False,
) -> DaliLoader:
    return DaliLoader(
        manifest,
        split,
        policy,
        train=train,
        batch_size=bs,
        rank=rank,
        world_size=world,
        seed=seed,
        threads=2,
        device=CPU,
        channels_last=channels_last,
    )


def _torch(
    manifest: Manifest, split: str, policy: DataPolicy, *, train: bool, bs: int = 16
) -> TorchvisionLoader:
    from resnet18_dist.data.torch_loader import train_transform

    transform = train_transform(policy) if train else eval_transform(policy)
    return TorchvisionLoader(
        ShardDataset(manifest, split, transform, policy.image_size),
        train=train,
        batch_size=bs,
        rank=0,
        world_size=1,
        seed=0,
        workers=0,
        device=CPU,
        channels_last=False,
    )


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW floats back to 0..255."""
    return (images.float() * STD + MEAN) * 255


@pytest.fixture(scope="module")
def id_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """105 flat 16-px images: red encodes the label, green/blue the image's own id."""
    root = tmp_path_factory.mktemp("ids")
    for i in range(105):
        label = i % 6
        img = np.empty((16, 16, 3), np.uint8)
        img[..., 0] = 20 + 20 * label
        img[..., 1] = (i // 16) * 16 + 8
        img[..., 2] = (i % 16) * 16 + 8
        d = root / "src" / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=95, subsampling=0)
    out = root / "prepared"
    prepare_dataset(
        PrepareOptions(source=str(root / "src"), out=str(out), quiet=True, min_shards=5)
    )
    return out


def _ids_and_labels(images: torch.Tensor) -> tuple[list[int], list[int]]:
    px = _pixels(images).mean(dim=(2, 3))
    ids = [round((float(g) - 8) / 16) * 16 + round((float(b) - 8) / 16) for _, g, b in px]
    labels = [red_to_label(float(r)) for r, _, _ in px]
    return ids, labels


def test_two_ranks_read_every_training_sample_exactly_once(id_dataset: Path) -> None:
    m = Manifest.load(id_dataset)
    n = m.counts["train"]
    assert n % 2 == 1 and len(m.shards["train"]) == 5  # uneven parts, odd shard count
    source_ids = set()
    for epoch in (0, 1):
        loaders = [
            _dali(m, "train", DataPolicy(16, "none"), train=True, rank=r, world=2, bs=8)
            for r in range(2)
        ]
        seen: list[list[int]] = [[], []]
        batches = []
        for r, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            count = 0
            for images, labels in loader:
                count += 1
                ids, pixel_labels = _ids_and_labels(images)
                assert pixel_labels == labels.tolist()  # labels stay attached to their images
                seen[r] += ids
            batches.append(count)
            assert len(seen[r]) == loader.num_samples
        assert batches[0] == batches[1] == len(loaders[0])  # the same steps on both ranks
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) + len(seen[1]) == n and len(set(seen[0] + seen[1])) == n
        if epoch == 0:
            source_ids = set(seen[0] + seen[1])
            first_part = seen[0]
        else:
            assert set(seen[0] + seen[1]) == source_ids
            assert set(seen[0]) != set(first_part)  # the parts rotate between epochs


def test_an_epoch_is_reproducible_and_epochs_differ(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    policy = DataPolicy(8, "cifar")

    def first_batch(epoch: int) -> torch.Tensor:
        loader = _dali(m, "train", policy, train=True, seed=3)
        loader.set_epoch(epoch)
        images, _ = next(iter(loader))
        loader.close()
        return images

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_output_matches_the_torchvision_backend(
    small_digits: Path, id_dataset: Path, channels_last: bool
) -> None:
    """Same decoder library (libjpeg-turbo) at native size: identical to float precision.
    Resizing differs by the resamplers' rounding: mean |diff| < 0.01, p99 < 0.05 (normalised)."""
    for root, size, tol in (
        (small_digits, 8, None),
        (id_dataset, 16, None),
        (small_digits, 12, (0.01, 0.05)),
    ):
        m = Manifest.load(root)
        policy = DataPolicy(size, "none")
        dali = _dali(m, "val", policy, train=False, bs=1000, channels_last=channels_last)
        ((xd, yd),) = list(dali)
        ((xt, yt),) = list(_torch(m, "val", policy, train=False, bs=1000))
        assert torch.equal(yd, yt)
        assert xd.shape == xt.shape == (m.counts["val"], 3, size, size)
        assert xd.is_contiguous(memory_format=torch.channels_last) == channels_last
        diff = (xd.float() - xt).abs()
        if tol is None:
            assert diff.max() < 1e-5, (root, size)
        else:
            assert diff.mean() < tol[0] and diff.flatten().quantile(0.99) < tol[1], (root, size)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_cifar_policy_shifts_within_the_padding_and_flips(small_digits: Path, backend: str) -> None:
    m = Manifest.load(small_digits)
    size, pad = 8, crop_padding(8)
    ((ref, _),) = list(_torch(m, "train", DataPolicy(size, "none"), train=False, bs=1000))
    # Every allowed outcome: each image, reflect-padded, shifted by -pad..pad, maybe mirrored.
    padded = torch.nn.functional.pad(ref, (pad, pad, pad, pad), mode="reflect")
    variants = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, :, dy : dy + size, dx : dx + size]
            variants += [window, window.flip(-1)]
    allowed = torch.cat(variants).flatten(1)
    loader = (
        _dali(m, "train", DataPolicy(size, "cifar"), train=True, bs=64)
        if backend == "dali"
        else _torch(m, "train", DataPolicy(size, "cifar"), train=True, bs=64)
    )
    images, _ = next(iter(loader))
    dist = torch.cdist(images.float().flatten(1), allowed)
    # Each output is one of the allowed crops: at most one grey level off (1/255/0.229 = 0.017
    # in normalised units) where DALI rounds, against distances of 20+ to any other candidate.
    assert dist.min(dim=1).values.max() < 0.1
    # ...and the randomness is used: not every output is the unshifted, unflipped image.
    identity = torch.cdist(images.float().flatten(1), ref.flatten(1)).min(dim=1).values
    assert (identity > 1e-3).float().mean() > 0.5


@pytest.fixture(scope="module")
def gray_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gray")
    for c in range(2):
        d = root / "src" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(40):
            Image.new("RGB", (32, 32), (128, 128, 128)).save(d / f"{i}.png")
    out = root / "prepared"
    prepare_dataset(PrepareOptions(source=str(root / "src"), out=str(out), quiet=True))
    return out


def _fill_fraction_at(degrees: float) -> float:
    """Fraction of a 32-px image left empty (fill 0) by rotating it by `degrees`."""
    from torchvision.transforms.v2 import functional as TF

    img = torch.full((1, 32, 32), 128.0)
    rotated = TF.rotate(img, degrees, interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    return float((rotated < 64).float().mean())


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_seed_policy_rotation_and_jitter_stay_in_range(gray_dataset: Path, backend: str) -> None:
    """On flat grey images: the rotation's empty corners never exceed those of a 15 degree turn,
    and brightness / contrast x [0.8, 1.2] keep the grey level within their range."""
    m = Manifest.load(gray_dataset)
    policy = DataPolicy(32, "seed")
    loader = (
        _dali(m, "train", policy, train=True, bs=48)
        if backend == "dali"
        else _torch(m, "train", policy, train=True, bs=48)
    )
    images, _ = next(iter(loader))
    px = _pixels(images).mean(dim=1)  # grey: the channels agree
    fill = px < 64  # rotation fill (0, or at most 26 after contrast 0.8 around 128)
    fractions = fill.float().mean(dim=(1, 2))
    max_fill = _fill_fraction_at(15.0)
    assert fractions.max() <= max_fill + 0.01
    assert (fractions > 0.001).float().mean() > 0.5  # most images were turned
    # The centre never meets the rotation's border; there brightness b and contrast c in
    # [0.8, 1.2] give (128 b - 128) c + 128 (DALI's contrast centre is 128; torchvision's is the
    # image mean, which leaves a flat image alone): within [97.3, 158.7].
    centre = px[:, 8:24, 8:24]
    assert centre.min() >= 97.3 - 1.5 and centre.max() <= 158.7 + 1.5
    centre = centre.mean(dim=(1, 2))
    assert centre.std() > 3  # the jitter varies from image to image


def test_labels_decode_from_zero_padded_ascii() -> None:
    raw = torch.tensor([[48, 48, 55], [49, 50, 51], [57, 57, 57]], dtype=torch.uint8)
    assert labels_from_ascii(raw).tolist() == [7, 123, 999]
    with pytest.raises(DatasetError, match="ASCII"):
        labels_from_ascii(torch.tensor([[65]], dtype=torch.uint8), check=True)


def test_a_corrupt_image_is_named_by_shard_and_key(small_digits: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(small_digits, data)
    m = Manifest.load(data)
    shard = m.shard_paths("val")[1]
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[4]
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data : member.offset_data + member.size] = b"\0" * member.size
    shard.write_bytes(bytes(raw))
    key = member.name.rsplit(".", 1)[0]
    with pytest.raises(DatasetError, match=rf"{shard}: corrupt image\(s\) {key} "):
        _dali(m, "val", DataPolicy(8, "none"), train=False)


def test_close_releases_the_pipeline(small_digits: Path) -> None:
    loader = _dali(Manifest.load(small_digits), "val", DataPolicy(8, "none"), train=False)
    next(iter(loader))
    pipe = weakref.ref(loader._pipe)
    loader.close()
    import gc

    gc.collect()
    assert pipe() is None and loader._pipe is None


def test_resume_with_dali_gives_the_same_weights(small_digits: Path, tmp_path: Path) -> None:
    """Per-(seed, rank, epoch) pipelines: an interrupted and resumed run matches a straight one."""
    from resnet18_dist.config import DataConfig, OptimConfig, RunConfig, TrainConfig
    from resnet18_dist.engine.checkpoint import load_checkpoint
    from resnet18_dist.engine.reporting import LocalReporter
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.session import run_training

    from .test_loop import _KillAfterFirstCheckpoint

    cfg = TrainConfig(
        data=DataConfig(
            data_dir=str(small_digits), batch_size=32, augment="cifar", data_backend="dali"
        ),
        optim=OptimConfig(epochs=2, lr=0.05),
        run=RunConfig(seed=5, quiet=True, wandb_mode="disabled"),
    )

    def train(run_dir: Path, **kw) -> dict:
        return run_training(cfg, TorchRuntime(cfg.run), LocalReporter(run_dir), run_dir, **kw)

    report = train(tmp_path / "straight")
    assert report["resolved"]["data_backend"] == "dali"
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "split", extra_callbacks=[_KillAfterFirstCheckpoint()])
    train(tmp_path / "resumed", resume_from=tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "resumed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_with_dali_reach_the_digits_bar(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/train.py"),
            "--num-workers",
            "2",
            "--data-backend",
            "dali",
            "--output-dir",
            str(tmp_path),
            "--name",
            "dali",
            "--wandb-mode",
            "disabled",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "data backend dali (requested dali)" in log
    report = json.loads((tmp_path / "dali" / "report.json").read_text())
    assert report["resolved"]["data_backend"] == "dali" and report["resolved"]["world_size"] == 2
    assert report["test_top1"] >= 0.95, report["test_top1"]
    epochs = [json.loads(line) for line in (tmp_path / "dali" / "metrics.jsonl").open()]
    assert all(e["train_samples"] == 1077 for e in epochs)  # every image once per epoch
