"""Decode an image file the one way every part of the project does: fully, and upright.

Phones store a portrait photo as a landscape JPEG plus an EXIF Orientation tag. DALI's decoder
applies that tag (``adjust_orientation=True``), PIL's does not. So that preparation, both loader
backends, the export checks, ``predict.py`` and the REST endpoint all see the same picture, the
tag is applied everywhere the project decodes with PIL (``ImageOps.exif_transpose``), and
preparation stores oriented JPEGs re-encoded upright with no tag left (see
``data/sources.py``), so the shards mean the same thing to every decoder.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112


class BadImage(ValueError):
    """Bytes that are not a usable image; ``str(exc)`` is the reason (without the file name)."""


class ImageTooLarge(BadImage):
    """An image whose declared size exceeds the pixel limit (a decompression bomb, or just
    larger than a service accepts)."""


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright, as stored)."""
    try:
        return int(img.getexif().get(ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # malformed EXIF: treat as upright
        return 1


def decode_upright(
    data: bytes, max_pixels: int | None = None, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Decode ``data`` completely (a truncated file fails here) and apply its EXIF orientation.

    ``max_pixels`` refuses, from the header alone, an image declaring more pixels than that;
    PIL's own decompression-bomb guard (about 179 megapixels) applies in any case. ``formats``
    (PIL format names such as ``("JPEG", "PNG")``) limits the decoders PIL tries.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
    except Image.DecompressionBombError as exc:  # not an OSError: it must be caught by name
        raise ImageTooLarge(f"image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        if formats:
            raise BadImage(f"not a {' or '.join(formats)} image") from exc
        raise BadImage("not an image PIL can identify") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode: {exc}") from exc
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise ImageTooLarge(
            f"image too large ({img.width}x{img.height} = {img.width * img.height} pixels, "
            f"the limit is {max_pixels})"
        )
    try:
        img.load()
        if orientation(img) != 1:
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"cannot decode: {exc}") from exc
    if img.width < 1 or img.height < 1:
        raise BadImage(f"degenerate size {img.width}x{img.height}")
    return img
