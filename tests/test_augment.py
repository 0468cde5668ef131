"""The augmentation policies' outputs, checked on real decoded batches. The torchvision cases
run here (no DALI needed); test_dali.py runs the same checks on the DALI backend."""

from __future__ import annotations

from pathlib import Path

import torch

from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD, DataPolicy, crop_padding
from resnet18_dist.data.torch_loader import (
    ShardDataset,
    TorchvisionLoader,
    eval_transform,
    train_transform,
)

from .conftest import cpu_settings

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def torchvision_loader(
    manifest: Manifest, split: str, policy: DataPolicy, *, train: bool, bs: int = 16
) -> TorchvisionLoader:
    transform = train_transform(policy) if train else eval_transform(policy)
    settings = cpu_settings(bs)
    dataset = ShardDataset(manifest, split, transform, policy.image_size)
    return TorchvisionLoader(dataset, settings, train=train)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW floats back to 0..255."""
    return (images.float() * STD + MEAN) * 255


def assert_cifar_policy_output(m: Manifest, images: torch.Tensor) -> None:
    """Each image is its original reflect-padded, shifted by -pad..pad, maybe mirrored."""
    size, pad = 8, crop_padding(8)
    ((ref, _),) = list(
        torchvision_loader(m, "train", DataPolicy(size, "none"), train=False, bs=1000)
    )
    padded = torch.nn.functional.pad(ref, (pad, pad, pad, pad), mode="reflect")
    variants = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, :, dy : dy + size, dx : dx + size]
            variants += [window, window.flip(-1)]
    allowed = torch.cat(variants).flatten(1)
    dist = torch.cdist(images.float().flatten(1), allowed)
    # Each output is one of the allowed crops: at most one grey level off (1/255/0.229 = 0.017
    # in normalised units) where DALI rounds, against distances of 20+ to any other candidate.
    assert dist.min(dim=1).values.max() < 0.1
    # ...and the randomness is used: not every output is the unshifted, unflipped image.
    identity = torch.cdist(images.float().flatten(1), ref.flatten(1)).min(dim=1).values
    assert (identity > 1e-3).float().mean() > 0.5


def _fill_fraction_at(degrees: float) -> float:
    """Fraction of a 32-px image left empty (fill 0) by rotating it by `degrees`."""
    from torchvision.transforms.v2 import functional as TF

    img = torch.full((1, 32, 32), 128.0)
    rotated = TF.rotate(img, degrees, interpolation=TF.InterpolationMode.BILINEAR, fill=0)
    return float((rotated < 64).float().mean())


def assert_seed_policy_output(images: torch.Tensor) -> None:
    """On flat grey images: the rotation's empty corners never exceed those of a 15 degree turn,
    and brightness / contrast x [0.8, 1.2] keep the grey level within their range."""
    px = pixels(images).mean(dim=1)  # grey: the channels agree
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


def test_cifar_policy_shifts_within_the_padding_and_flips(small_digits: Path) -> None:
    m = Manifest.load(small_digits)
    loader = torchvision_loader(m, "train", DataPolicy(8, "cifar"), train=True, bs=64)
    images, _ = next(iter(loader))
    assert_cifar_policy_output(m, images)


def test_seed_policy_rotation_and_jitter_stay_in_range(gray_dataset: Path) -> None:
    m = Manifest.load(gray_dataset)
    images, _ = next(
        iter(torchvision_loader(m, "train", DataPolicy(32, "seed"), train=True, bs=48))
    )
    assert_seed_policy_output(images)
