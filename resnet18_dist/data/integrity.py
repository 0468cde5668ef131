"""Shard integrity: catch a shard that changed after preparation before a decoder sees it.

Preparation decodes every image, so a corrupt image in a shard means the file changed on disk
afterwards. DALI 2.4's CPU decoder can crash the process (SIGSEGV) on such an image instead of
raising, so the DALI backend checks the shards' sha256 against the manifest first, and names the
shard and the sample key of any image that no longer decodes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from resnet18_dist.data.manifest import DatasetError, Manifest, parse_index

log = logging.getLogger(__name__)

# Hash at most this much per split automatically (about 10 s at 1 GB/s); larger datasets are
# checked with --verify-shards on.
AUTO_VERIFY_MAX_BYTES = 8 * 2**30


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def undecodable_samples(manifest: Manifest, split: str, shard: int) -> list[tuple[str, str]]:
    """(key, reason) for every image of one shard that PIL cannot decode."""
    path = manifest.shard_paths(split)[shard]
    bad = []
    with open(path, "rb") as fh:
        for ref in parse_index(manifest.index_paths(split)[shard], shard):
            fh.seek(ref.image_offset)
            try:
                with Image.open(io.BytesIO(fh.read(ref.image_size))) as img:
                    img.load()
            except UnidentifiedImageError:
                bad.append((ref.key, "not an image PIL can identify"))
            except Exception as exc:  # PIL raises many types for broken data
                bad.append((ref.key, f"{type(exc).__name__}: {exc}"))
    return bad


def describe_corruption(manifest: Manifest, split: str, shard: int) -> str:
    path = manifest.shard_paths(split)[shard]
    bad = undecodable_samples(manifest, split, shard)
    if not bad:
        return f"{path} changed since preparation (sha256 differs), though its images decode"
    keys = ", ".join(f"{k} ({why})" for k, why in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{path}: corrupt image(s) {keys}{more}"


def verify_split(manifest: Manifest, split: str, mode: str = "auto") -> bool:
    """Check every shard of ``split`` against its manifest sha256; raise naming the bad sample.

    Returns whether the check ran (mode ``auto`` skips splits larger than 8 GiB).
    """
    shards = manifest.shards[split]
    total = sum(s.bytes for s in shards)
    if mode == "off" or (mode == "auto" and total > AUTO_VERIFY_MAX_BYTES):
        if mode == "auto":
            log.info(
                "%s split is %.1f GiB: shard checksums not verified (--verify-shards on)",
                split,
                total / 2**30,
            )
        return False
    for i, info in enumerate(shards):
        path = manifest.root / info.path
        if path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
            raise DatasetError(
                describe_corruption(manifest, split, i)
                + ". Re-prepare the dataset (launch/prepare_data.py)."
            )
    return True
