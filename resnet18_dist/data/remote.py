"""A prepared dataset on object storage (``--data-dir s3://bucket/prefix`` or ``gs://...``),
copied once per node into the cache, every shard checked against the manifest's sha256.

Why a local copy rather than reading the bucket: DALI 2.4's webdataset reader can read
``s3://`` itself, but the torchvision backend reads shards through our own index with plain
file offsets, the shard-integrity check that guards DALI's decoder against a changed file
hashes local files, and a bucket read every epoch pays the transfer every epoch. One copy per
node serves every epoch, every rank on the node and every later run of the same dataset.

The copy is keyed by the URI and the manifest's own sha256, so a re-prepared dataset under the
same prefix is a new copy, never a mix of old and new shards. Files land under a staging
directory first and the finished copy appears by one rename, so a killed download leaves
nothing a reader would take for a dataset; shards already verified in an interrupted staging
copy are kept and not fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from pathlib import Path

from resnet18_dist import storage
from resnet18_dist.cache import cache_root
from resnet18_dist.data.integrity import mark_verified, sha256_file
from resnet18_dist.data.manifest import MANIFEST, REJECTS, SPLITS, DatasetError, Manifest

log = logging.getLogger(__name__)

REMOTE_DATASETS = "remote-datasets"


def read_remote_manifest(uri: str) -> tuple[bytes, dict]:
    """The manifest's bytes and JSON, without fetching any shard (what the driver checks)."""
    where = storage.join(uri, MANIFEST)
    try:
        data = storage.read_bytes(where)
    except storage.StorageError as exc:
        raise DatasetError(
            f"{uri} is not a prepared dataset: cannot read {where} ({exc}); upload a directory "
            "written by `python launch/prepare_data.py`"
        ) from exc
    try:
        raw = json.loads(data)
        for split in SPLITS:
            for shard in raw["shards"][split]:
                shard["path"], shard["idx"], shard["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{where} is malformed: {exc!r}") from exc
    return data, raw


def fetch_dataset(uri: str, cache: Path | None = None) -> Path:
    """The local copy of the dataset at ``uri`` on this node, downloaded and verified on first
    use. Safe to call from several ranks at once: a file lock makes one of them fetch it."""
    data, raw = read_remote_manifest(uri)
    base = (cache or cache_root()) / REMOTE_DATASETS
    uri_key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = base / f"{uri_key}-{hashlib.sha256(data).hexdigest()[:16]}"
    if (target / MANIFEST).is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / MANIFEST).is_file():
            _download(uri, raw, data, target)
            _drop_older_copies(base, uri_key, target)
            # Every shard was hashed on its way in: the DALI guard need not read it again.
            mark_verified(Manifest.load(target))
    Manifest.load(target)  # the copy is whole: every listed shard and index is there
    return target


def _download(uri: str, raw: dict, manifest_bytes: bytes, target: Path) -> None:
    stage = target.with_name(f".{target.name}.part")
    shards = [s for split in SPLITS for s in raw["shards"][split]]
    total = sum(int(s.get("bytes", 0)) for s in shards)
    log.warning("copying the dataset %s (%.1f MB) to %s", uri, total / 1e6, target)
    for shard in shards:
        dst = stage / shard["path"]
        if dst.is_file() and sha256_file(dst) == shard["sha256"]:
            continue  # verified in an interrupted earlier copy
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(dst.name + ".part")
        src = storage.join(uri, shard["path"])
        try:
            got = storage.stream_to_file(src, part)
            if got != shard["sha256"]:
                raise DatasetError(
                    f"{src}: sha256 {got} differs from {shard['sha256']} in its manifest; the "
                    "shard changed after preparation (prepare the dataset again and re-upload it)"
                )
            part.replace(dst)
        except storage.StorageError as exc:
            raise DatasetError(f"{src}: {exc}") from exc
        finally:
            part.unlink(missing_ok=True)
    # Index files are small and carry no hash: fetched every time a copy is made.
    for shard in shards:
        storage.download(storage.join(uri, shard["idx"]), stage / shard["idx"])
    if storage.exists(storage.join(uri, REJECTS)):
        storage.download(storage.join(uri, REJECTS), stage / REJECTS)
    (stage / MANIFEST).write_bytes(manifest_bytes)  # last: its presence marks a whole copy
    stage.replace(target)


def _drop_older_copies(base: Path, uri_key: str, keep: Path) -> None:
    """Copies of an earlier version of the same URI: the bucket no longer holds that data."""
    for old in base.glob(f"{uri_key}-*"):
        if old != keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
