"""A prepared dataset on object storage (``--data-dir s3://bucket/prefix`` or ``gs://...``),
copied once per node into the cache, every shard checked against the manifest's sha256.

Why a local copy rather than reading the bucket: DALI 2.4's webdataset reader can read
``s3://`` itself, but the torchvision backend reads shards through our own index with plain
file offsets, the shard-integrity check that guards DALI's decoder against a changed file
hashes local files, and a bucket read every epoch pays the transfer every epoch. One copy per
node serves every epoch, every rank on the node and every later run of the same dataset; its
shards are fetched several at a time (``--fetch-threads``).

The copy is keyed by the URI and the manifest's own sha256, so a re-prepared dataset under the
same prefix is a new copy, never a mix of old and new shards; the driver pins the manifest it
checked (``DataConfig.manifest_sha256``) and a worker that finds another one in the bucket
stops, so every node of a run trains on the same data. Files land under a staging directory
first and the finished copy appears by one rename, so a killed download leaves nothing a reader
would take for a dataset; shards already verified in an interrupted staging copy are kept.
Every process using a copy holds a shared lock on it until it exits, and an older copy is
deleted only when nobody holds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO

from resnet18_dist import storage
from resnet18_dist.cache import cache_root
from resnet18_dist.data.integrity import mark_verified
from resnet18_dist.data.manifest import MANIFEST, REJECTS, SPLITS, DatasetError, Manifest, ShardInfo

log = logging.getLogger(__name__)

REMOTE_DATASETS = "remote-datasets"
FETCH_THREADS = 8  # shards downloaded at once (--fetch-threads)

# Shared locks on the copies this process reads, held until it exits.
_IN_USE: dict[Path, IO[str]] = {}


def read_remote_manifest(uri: str) -> tuple[bytes, Manifest]:
    """The manifest's bytes, parsed and checked as a local one is, without fetching a shard
    (what the driver checks before any worker starts)."""
    where = storage.join(uri, MANIFEST)
    try:
        data = storage.read_bytes(where)
    except storage.StorageError as exc:
        raise DatasetError(
            f"{uri} is not a prepared dataset: cannot read {where} ({exc}); upload a directory "
            "written by `python launch/prepare_data.py`"
        ) from exc
    return data, Manifest.parse(data, Path(), where)


def manifest_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_dataset(
    uri: str,
    expect_sha256: str | None = None,
    cache: Path | None = None,
    threads: int = FETCH_THREADS,
) -> Path:
    """The local copy of the dataset at ``uri`` on this node, downloaded and verified on first
    use, ``threads`` shards at a time. ``expect_sha256`` is the manifest the run was started
    with: another one in the bucket (a re-upload since) is refused. Safe to call from several
    ranks at once: a file lock makes one of them fetch it."""
    data, manifest = read_remote_manifest(uri)
    digest = manifest_sha256(data)
    if expect_sha256 and digest != expect_sha256:
        raise DatasetError(
            f"{storage.join(uri, MANIFEST)} changed since this run started (sha256 {digest[:16]}, "
            f"the run checked {expect_sha256[:16]}): the dataset was uploaded again; rerun the "
            "command so that every node reads one version"
        )
    base = (cache or cache_root()) / REMOTE_DATASETS
    uri_key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = base / f"{uri_key}-{digest[:16]}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        _hold(target)
        # Every fetch (not only a new copy's) drops the versions nobody reads any more: one
        # still in use the last time is deleted by a later run, and room is made before a copy.
        _drop_older_copies(base, uri_key, target)
        if not (target / MANIFEST).is_file():
            with open(base / f".{target.name}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (target / MANIFEST).is_file():
                    _download(uri, manifest, data, target, threads)
                    # Every shard was hashed on its way in: the DALI guard need not read it again.
                    mark_verified(Manifest.load(target))
    except storage.StorageError as exc:  # the bucket's side
        raise DatasetError(str(exc)) from exc
    except OSError as exc:  # the local side: a full disk, a read-only cache
        raise DatasetError(
            f"cannot copy {uri} into {base}: {exc} (free space there, or point "
            f"$RESNET18_DIST_CACHE at a larger disk)"
        ) from exc
    return target  # the caller's Manifest.load checks that every listed file is there


def _hold(target: Path) -> None:
    if target not in _IN_USE:
        # "a+": readable too, as a shared lock needs on NFS (where flock is a byte-range lock).
        handle = open(target.with_name(f".{target.name}.inuse"), "a+")  # noqa: SIM115 held open
        fcntl.flock(handle, fcntl.LOCK_SH)
        _IN_USE[target] = handle


def _fetch_shard(uri: str, stage: Path, shard: ShardInfo) -> None:
    """One shard into ``stage``, under its real name only once its sha256 matched."""
    dst = stage / shard.path
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    src = storage.join(uri, shard.path)
    try:
        got = storage.stream_to_file(src, part)
        if got != shard.sha256:
            raise DatasetError(
                f"{src}: sha256 {got} differs from {shard.sha256} in its manifest; the "
                "shard changed after preparation (prepare the dataset again and re-upload it)"
            )
        part.replace(dst)
    finally:
        part.unlink(missing_ok=True)


def _download(
    uri: str, manifest: Manifest, manifest_bytes: bytes, target: Path, threads: int
) -> None:
    stage = target.with_name(f".{target.name}.part")
    shards = [s for split in SPLITS for s in manifest.shards[split]]
    total = sum(s.bytes for s in shards)
    stage.mkdir(parents=True, exist_ok=True)
    # A copy killed mid-transfer leaves its threads' partial files (`.part`, `.part-PID`); this
    # process holds the copy's exclusive lock, so nobody is writing them: they go. What an
    # interrupted copy verified is not needed again.
    for leftover in stage.rglob("*.part*"):
        if leftover.is_file():
            leftover.unlink()
    staged = sum(s.bytes for s in shards if _size(stage / s.path) == s.bytes)
    free = shutil.disk_usage(stage).free
    if free < total - staged:
        raise DatasetError(
            f"cannot copy {uri} into {target.parent}: its shards need "
            f"{(total - staged) / 1e9:.2f} GB more, {free / 1e9:.2f} GB are free (point "
            "$RESNET18_DIST_CACHE at a larger disk)"
        )
    # Kept from an interrupted copy: a shard takes its real name only once its hash matched
    # (_fetch_shard), so those of full size are not read again.
    todo = [s for s in shards if _size(stage / s.path) != s.bytes]
    # Index files are small and carry no hash in the manifest; Manifest.load and the first
    # parse_index check their shape.
    extras = [s.idx for s in shards]
    if storage.exists(storage.join(uri, REJECTS)):
        extras.append(REJECTS)
    workers = max(1, min(threads, len(todo) + len(extras)))
    log.warning(
        "copying the dataset %s (%d shards, %.1f MB, to go) to %s, %d files at a time",
        uri,
        len(todo),
        (total - staged) / 1e6,
        target,
        workers,
    )
    # In parallel: one object's transfer is bound by the round trips of one connection, not by
    # the link (a bucket serves many at once), and a dataset of small shards is mostly round
    # trips. Each call opens its own pyarrow filesystem (they are thread-safe anyway); each
    # thread hashes its own shard as it arrives. The first failure cancels what has not
    # started; leaving the pool waits for what is in flight (each removes its own partial
    # file), so the copy's lock is not released while a thread still writes.
    with ThreadPoolExecutor(workers, thread_name_prefix="fetch") as pool:
        futures = [pool.submit(_fetch_shard, uri, stage, shard) for shard in todo]
        futures += [
            pool.submit(storage.download, storage.join(uri, rel), stage / rel) for rel in extras
        ]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    (stage / MANIFEST).write_bytes(manifest_bytes)  # last: its presence marks a whole copy
    stage.replace(target)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _drop_older_copies(base: Path, uri_key: str, keep: Path) -> None:
    """Copies (and unfinished copies) of an earlier version of the same URI: the bucket no
    longer holds that data. One another process still reads is left for a later fetch. Their
    two empty lock files stay: deleting a lock file another process may be opening is a race."""
    for old in sorted(base.glob(f"{uri_key}-*")) + sorted(base.glob(f".{uri_key}-*.part")):
        name = old.name.lstrip(".").removesuffix(".part")
        if name == keep.name or not old.is_dir():
            continue
        with (
            open(base / f".{name}.inuse", "a+") as in_use,
            open(base / f".{name}.lock", "a+") as lk,
        ):
            try:
                fcntl.flock(in_use, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lk, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # still read, or still being fetched
            shutil.rmtree(old, ignore_errors=True)
