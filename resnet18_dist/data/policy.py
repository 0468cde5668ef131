"""What every data backend must agree on: image size, geometry, augmentation and normalisation.

The torchvision and DALI backends each build their own operators from these values, so a
policy means the same thing on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from resnet18_dist.config import SMALL_IMAGE_MAX, DataConfig
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.preprocessing import PHOTO, SQUASH, photo_resize

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


# The searched policies (trivialaugment, autoaugment) run on uint8 pixels after the size's base
# geometry. Both backends use bilinear resampling and fill what a geometric op uncovers with
# mid-grey 128 (DALI's auto_aug default; torchvision's would be nearest and black).
AUTO_AUG_POLICIES = ("trivialaugment", "autoaugment")
AUTO_AUG_FILL = 128
# AutoAugment's largest translation, as a fraction of the side (torchvision: 150 / 331 * width).
AUTOAUGMENT_MAX_SHIFT = 150 / 331


def is_small(image_size: int) -> bool:
    return image_size <= SMALL_IMAGE_MAX


def autoaugment_policy(image_size: int) -> str:
    """The AutoAugment policy for a size: CIFAR-10's (found on reduced CIFAR-10) for small
    images, ImageNet's for photos. DALI names them reduced_cifar10 / image_net."""
    return "cifar10" if is_small(image_size) else "imagenet"


def erase_side(image_size: int) -> int:
    """Random erasing's square: half the image's side, Cutout's 16 px at 32 px (DeVries &
    Taylor, 2017)."""
    return max(1, round(image_size / 2))


@dataclass(frozen=True)
class DataPolicy:
    image_size: int
    augment: str  # seed | cifar | trivialaugment | autoaugment | none (resolved, never auto)
    random_erasing: float = 0.0  # probability per training image
    preprocess: str = SQUASH  # squash | photo (resolved, never auto; see preprocessing.py)
    preprocess_reason: str = field(default="", compare=False)  # why (console, run_info.json)
    # photo: the shorter side before the centre crop when an export's metadata says it
    # (export/pipeline.py); 0 = the rule's (preprocessing.photo_resize).
    resize: int = 0

    @property
    def photo(self) -> bool:
        return self.preprocess == PHOTO

    @property
    def eval_resize(self) -> int:
        """Evaluation's shorter side before the centre crop (photo); the side itself (squash)."""
        if not self.photo:
            return self.image_size
        return self.resize or photo_resize(self.image_size)

    @property
    def random_crop(self) -> bool:
        """Whether training starts with the photo geometry's random resized crop and a flip
        (every policy but none: the crop stands in for the cifar policy's padded one)."""
        return self.photo and self.augment != "none"

    @property
    def base_crop(self) -> bool:
        """Whether the training geometry includes the cifar policy's padded random crop."""
        return not self.photo and (
            self.augment == "cifar"
            or (self.augment in AUTO_AUG_POLICIES and is_small(self.image_size))
        )


def native_size(manifest: Manifest) -> int:
    """The images' side when they are small, else 0 (photos of mixed or large sizes)."""
    if manifest.native_size is not None and manifest.native_size <= SMALL_IMAGE_MAX:
        return int(manifest.native_size)
    if manifest.max_side <= SMALL_IMAGE_MAX:
        return int(manifest.max_side)
    return 0


def resolve_preprocess(requested: str, manifest: Manifest, size: int) -> tuple[str, str]:
    """The geometry for ``--preprocess`` and why (for the console and run_info.json)."""
    if requested != "auto":
        return requested, "--preprocess"
    if not manifest.all_square:
        return PHOTO, "auto: the images are not all square"
    # Small squares (CIFAR at 16 px, say) are squashed even when downscaled: an 8 % crop of a
    # 32-px image leaves a few pixels, and the centre crop would cut an eighth of each side.
    if manifest.max_side > max(size, SMALL_IMAGE_MAX):
        return PHOTO, f"auto: images up to {manifest.max_side} px, larger than {size} px"
    return SQUASH, f"auto: square images of at most {manifest.max_side} px"


def resolve_policy(cfg: DataConfig, manifest: Manifest) -> DataPolicy:
    size = cfg.image_size or native_size(manifest) or DEFAULT_PHOTO_SIZE
    preprocess, reason = resolve_preprocess(cfg.preprocess, manifest, size)
    augment = cfg.augment
    if augment == "auto":
        # A dataset may name its policy (the built-in digits: "none", since digits are not
        # mirror-symmetric and an 8-px image leaves nothing to crop); otherwise by size.
        augment = manifest.raw.get("augment_hint") or (
            "cifar" if size <= SMALL_IMAGE_MAX else "seed"
        )
    return DataPolicy(
        image_size=size,
        augment=augment,
        random_erasing=cfg.random_erasing,
        preprocess=preprocess,
        preprocess_reason=reason,
    )
