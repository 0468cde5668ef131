"""Decoding images from users: the shared decoder of predict and serve, on bad input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from resnet18_dist.serve.classifier import PredictError, decode_image


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file that declares ``width`` x ``height`` pixels (a decompression bomb's
    header: PIL refuses it at open, from the declared size alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path: Path) -> None:
    """Defect 8: PIL's DecompressionBombError is not an OSError and escaped decode_image."""
    data = png_header_only(30_000, 30_000)  # 900 megapixels declared, 100 bytes on disk
    with pytest.raises(PredictError, match=r"bomb\.png: image too large .*900000000 pixels"):
        decode_image(data, "bomb.png")


def test_predict_decodes_a_tagged_photo_upright(tmp_path: Path) -> None:
    """Defect 1 on the inference side: a JPEG stored sideways with Orientation=6 is classified
    as the upright image preparation would have stored (16 wide, 32 high, red on top)."""
    from .test_prepare import _oriented_jpeg

    _oriented_jpeg(tmp_path / "phone.jpg")
    img = decode_image((tmp_path / "phone.jpg").read_bytes(), "phone.jpg")
    assert img.size == (16, 32)
    top, bottom = img.getpixel((8, 4)), img.getpixel((8, 28))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]
