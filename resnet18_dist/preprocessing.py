"""How an image becomes the model's square input, without torch: the two geometries.

``squash`` resizes the whole image to size x size (CIFAR, digits: already square and small).
``photo`` is torchvision's ImageNet recipe (its classification references, timm): training
takes a random resized crop, evaluation resizes the shorter side to size / 0.875 and takes the
centre size x size. Training builds these with torchvision's or DALI's operators
(``data/torch_loader.py``, ``data/dali.py``); the clients of an export (``serve/classifier.py``:
predict and the REST endpoint) apply the evaluation geometry from the export's metadata here,
with PIL and torchvision's own size arithmetic, so that they feed the model what evaluation fed
it, pixel for pixel.
"""

from __future__ import annotations

import math

from PIL import Image

SQUASH = "squash"
PHOTO = "photo"
GEOMETRIES = (SQUASH, PHOTO)
# torchvision's RandomResizedCrop defaults, which its ImageNet reference trains with.
PHOTO_SCALE = (0.08, 1.0)
PHOTO_RATIO = (3 / 4, 4 / 3)
# The centre crop's share of the resized shorter side (224 of 256), as torchvision's references.
PHOTO_CROP_FRACTION = 0.875


def photo_resize(size: int) -> int:
    """The shorter side before the centre crop: 256 for 224, as timm rounds (down)."""
    return math.floor(size / PHOTO_CROP_FRACTION)


def shorter_side_to(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter`` and the aspect ratio kept, the longer
    side truncated as torchvision's ``Resize(int)`` computes it."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL's (left, top, right, bottom) of torchvision's ``CenterCrop(size)``."""
    left = round((width - size) / 2.0)  # Python rounds half to even, as torchvision does
    top = round((height - size) / 2.0)
    return left, top, left + size, top + size


def eval_geometry(img: Image.Image, geometry: str, size: int, resize: int) -> Image.Image:
    """``img`` (RGB) as evaluation sized it: bilinear, as torchvision resizes PIL images."""
    if geometry == PHOTO:
        img = img.resize(shorter_side_to(*img.size, resize), Image.Resampling.BILINEAR)
        return img.crop(centre_box(*img.size, size))
    if geometry != SQUASH:
        raise ValueError(f"unknown preprocessing {geometry!r} (expected one of {GEOMETRIES})")
    return img.resize((size, size), Image.Resampling.BILINEAR)
