"""Shard integrity: catch a shard that changed after preparation before a decoder sees it.

Preparation decodes every image, so a corrupt image in a shard means the file changed on disk
afterwards. DALI 2.4's CPU decoder can crash the process (SIGSEGV) on such an image instead of
raising, so the DALI backend checks the shards' sha256 against the manifest first, and names the
shard and the sample key of any image that no longer decodes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from resnet18_dist.atomic import atomic_write_text
from resnet18_dist.cache import cache_root
from resnet18_dist.data.manifest import SPLITS, DatasetError, Manifest, parse_index

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

    Returns whether the check ran (mode ``auto`` skips splits larger than 8 GiB). A shard
    verified before on this machine is not hashed again while its size, mtime and inode are
    unchanged (a stamp in the cache directory): restarts and later runs skip the reads.
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
    stamp_path = _stamp_path(manifest, split)
    stamps = _read_stamps(stamp_path)
    fresh: dict[str, list] = {}
    for i, info in enumerate(shards):
        path = manifest.root / info.path
        key = _stamp_key(path, info.sha256)
        if stamps.get(info.path) == key:
            fresh[info.path] = key
            continue
        if key[0] != info.bytes or sha256_file(path) != info.sha256:
            raise DatasetError(
                describe_corruption(manifest, split, i)
                + ". Re-prepare the dataset (launch/prepare_data.py)."
            )
        fresh[info.path] = key
    if fresh != stamps:
        _write_stamps(stamp_path, fresh)
    return True


def mark_verified(manifest: Manifest) -> None:
    """Record every shard as verified, for a copy whose shards were hashed as they were written
    (a dataset fetched from object storage): the first run on it does not read them twice."""
    for split in SPLITS:
        stamps = {
            info.path: _stamp_key(manifest.root / info.path, info.sha256)
            for info in manifest.shards[split]
        }
        _write_stamps(_stamp_path(manifest, split), stamps)


def _stamp_key(path: Path, sha256: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]


def _write_stamps(path: Path, stamps: dict[str, list]) -> None:
    try:
        atomic_write_text(path, json.dumps(stamps) + "\n")
    except OSError as exc:  # a read-only cache only costs a re-check next time
        log.debug("could not record verified shards in %s: %s", path, exc)


def _stamp_path(manifest: Manifest, split: str) -> Path:
    where = f"{Path(manifest.root).resolve()}:{split}".encode()
    return cache_root() / "verified" / f"{hashlib.sha256(where).hexdigest()[:24]}.json"


def _read_stamps(path: Path) -> dict[str, list]:
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}
