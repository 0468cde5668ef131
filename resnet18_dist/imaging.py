"""Decode an image file the one way every part of the project does: fully, and upright.

Phones store a portrait photo as a landscape JPEG plus an EXIF Orientation tag. DALI's decoder
applies that tag (``adjust_orientation=True``), PIL's does not. So that preparation, both loader
backends, the export checks, ``predict.py`` and the REST endpoint all see the same picture, the
tag is applied everywhere the project decodes with PIL (``ImageOps.exif_transpose``), and
preparation stores oriented JPEGs re-encoded upright with no tag left (see
``data/sources.py``), so the shards mean the same thing to every decoder.

What comes back is pixels only: the image's metadata (``info``: PNG text, EXIF, ICC profile,
XMP) is dropped once the orientation is applied. Nothing downstream reads it, and a PNG's
compressed text chunks are a memory bomb of their own: 40 kB of zTXt on the wire is 40 MB of
``str`` in ``info`` once Pillow inflates it, held for as long as the image is (a REST request's
images until its answer), whatever ``max_pixels`` allows. So Pillow's own limits on PNG text are
lowered here, where the project imports its decoder: a file whose text chunks inflate past
``MAX_PNG_TEXT_BYTES`` in all is refused, naming the limit.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

ORIENTATION_TAG = 0x0112

# One chunk may hold an ICC profile (iCCP counts against the same per-chunk limit, and profiles
# near a megabyte exist), so Pillow's 1 MiB per chunk is kept; all text chunks together were
# allowed 64 MiB (MAX_TEXT_MEMORY), which no photo's metadata needs: 1 MiB here.
MAX_PNG_TEXT_CHUNK = 1024 * 1024
MAX_PNG_TEXT_BYTES = 1024 * 1024
PngImagePlugin.MAX_TEXT_CHUNK = MAX_PNG_TEXT_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = MAX_PNG_TEXT_BYTES


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


def _reason(exc: Exception) -> str:
    """The decoder's error as a reason; Pillow's PNG text limits named as this module's."""
    text = str(exc)
    if "MAX_TEXT_MEMORY" in text:
        return (
            f"PNG text metadata too large (its text chunks inflate past the limit of "
            f"{MAX_PNG_TEXT_BYTES} bytes in all)"
        )
    if "MAX_TEXT_CHUNK" in text:
        return (
            f"PNG metadata too large (a text or ICC chunk inflates past the limit of "
            f"{MAX_PNG_TEXT_CHUNK} bytes)"
        )
    return f"cannot decode: {text}"


def strip_metadata(img: Image.Image) -> Image.Image:
    """Drop everything but the pixels: ``info`` and, for a PNG, its ``text`` dict (the same
    strings), emptied in place so that nothing keeps them alive."""
    img.info.clear()
    text = getattr(img, "text", None)  # PngImageFile only; read after load, so no re-parse
    if isinstance(text, dict):
        text.clear()
    return img


def decode_upright(
    data: bytes, max_pixels: int | None = None, formats: tuple[str, ...] | None = None
) -> Image.Image:
    """Decode ``data`` completely (a truncated file fails here) and apply its EXIF orientation.

    ``max_pixels`` refuses, from the header alone, an image declaring more pixels than that;
    PIL's own decompression-bomb guard (about 179 megapixels) applies in any case. ``formats``
    (PIL format names such as ``("JPEG", "PNG")``) limits the decoders PIL tries. The image
    comes back without metadata (``strip_metadata``).
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
    except (OSError, SyntaxError, ValueError) as exc:  # text chunks before IDAT: read here
        raise BadImage(_reason(exc)) from exc
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
    except (OSError, SyntaxError, ValueError) as exc:  # text chunks after IDAT: read here
        raise BadImage(_reason(exc)) from exc
    strip_metadata(img)
    if img.width < 1 or img.height < 1:
        raise BadImage(f"degenerate size {img.width}x{img.height}")
    return img
