"""What every data backend must agree on: image size, augmentation policy and normalisation.

The torchvision and DALI backends each build their own operators from these values, so a
policy means the same thing on either.
"""

from __future__ import annotations

from dataclasses import dataclass

from resnet18_dist.config import SMALL_IMAGE_MAX, DataConfig
from resnet18_dist.data.manifest import Manifest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_PHOTO_SIZE = 224

# The guide's "seed" policy, shared by both backends.
ROTATION_DEGREES = 15.0
JITTER = 0.2  # brightness, contrast and saturation
# The "cifar" policy: 4 px of reflect padding at 32 px, scaled with the image so that an 8-px
# digit is shifted by at most 1 px rather than by half its width.
CROP_PADDING_AT_32 = 4


def crop_padding(image_size: int) -> int:
    return max(1, round(image_size * CROP_PADDING_AT_32 / 32))


@dataclass(frozen=True)
class DataPolicy:
    image_size: int
    augment: str  # seed | cifar | none (resolved, never auto)


def native_size(manifest: Manifest) -> int:
    """The images' side when they are small, else 0 (photos of mixed or large sizes)."""
    if manifest.native_size is not None and manifest.native_size <= SMALL_IMAGE_MAX:
        return int(manifest.native_size)
    if manifest.max_side <= SMALL_IMAGE_MAX:
        return int(manifest.max_side)
    return 0


def resolve_policy(cfg: DataConfig, manifest: Manifest) -> DataPolicy:
    size = cfg.image_size or native_size(manifest) or DEFAULT_PHOTO_SIZE
    augment = cfg.augment
    if augment == "auto":
        # A dataset may name its policy (the built-in digits: "none", since digits are not
        # mirror-symmetric and an 8-px image leaves nothing to crop); otherwise by size.
        augment = manifest.raw.get("augment_hint") or (
            "cifar" if size <= SMALL_IMAGE_MAX else "seed"
        )
    return DataPolicy(image_size=size, augment=augment)
