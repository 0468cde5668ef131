"""An export on object storage (``s3://`` / ``gs://``): published there, and fetched back.

Publishing: the export is made in a local staging directory as usual, then uploaded with its
``report.json`` last. The report lists every artifact's sha256 (``files``), so a reader takes a
prefix for an export only once the report is there, and only with every file matching it. An
upload killed midway therefore leaves no report: nothing a reader takes for an export. Replacing
an earlier export deletes its report first, so a half-replaced prefix is not taken for either.

Fetching (``predict --model s3://...``, ``serve --model s3://...`` on every replica's node): the
report is read, and the files the reader uses (the served ONNX model) are downloaded once per
machine into the cache, under a name made of the URI and the report's own hash, each checked
against its sha256; a later fetch of the same export is a cache hit. A changed or partial export
is refused naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from resnet18_dist import storage
from resnet18_dist.atomic import atomic_write_bytes
from resnet18_dist.cache import cache_root
from resnet18_dist.data.integrity import sha256_file
from resnet18_dist.errors import UserError
from resnet18_dist.model_meta import FORMAT, META_JSON, REPORT_JSON

FILES_KEY = "files"  # the report's {relative path: sha256} of the artifacts it describes


class BucketExportError(OSError, UserError):
    """A remote export that cannot be published or read whole; the message names the file."""


def file_hashes(root: Path, skip: tuple[str, ...] = (REPORT_JSON,)) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under ``root`` but ``skip``."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = sha256_file(path)
    return out


def check_remote_out(uri: str, option: str = "--out") -> None:
    """Refuse (ConfigError naming ``option``, exit 2) a prefix whose bucket is missing, or which
    holds objects that are not an earlier export (publishing deletes what is there)."""
    from resnet18_dist.options import ConfigError

    if not urlsplit(uri).path.strip("/"):  # publishing would empty the whole bucket
        raise ConfigError(option, f"{uri}: give a prefix inside the bucket (s3://bucket/name)")
    try:
        storage.require_bucket(uri)
        names = storage.list_files(uri)
        if not names:
            return
        try:
            meta = json.loads(storage.read_bytes(storage.join(uri, META_JSON)))
        except (storage.StorageError, ValueError):
            meta = None
    except storage.StorageError as exc:
        raise ConfigError(option, str(exc)) from exc
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
        raise ConfigError(
            option,
            f"{uri} holds {len(names)} object(s) and is not an export (no {META_JSON} of one); "
            "it would be replaced, so give a new prefix or an earlier export",
        )


def upload_export(local: Path, uri: str) -> None:
    """Publish the finished export directory ``local`` at ``uri``: the earlier export's report
    first deleted, then its objects, then every file, then ``report.json``."""
    report = local / REPORT_JSON
    if not report.is_file():
        raise BucketExportError(f"{local}: no {REPORT_JSON}; not a finished export")
    try:
        if storage.exists(storage.join(uri, REPORT_JSON)):
            storage.delete_file(storage.join(uri, REPORT_JSON))
        if storage.list_files(uri):
            storage.delete_tree(uri)
        for path in sorted(p for p in local.rglob("*") if p.is_file() and p != report):
            storage.upload_file(path, storage.join(uri, path.relative_to(local).as_posix()))
        storage.upload_file(report, storage.join(uri, REPORT_JSON))
    except storage.StorageError as exc:
        raise BucketExportError(f"cannot publish the export to {uri}: {exc}") from exc


def read_report(uri: str) -> tuple[dict[str, Any], bytes]:
    """The remote export's report (parsed, and its bytes); an error naming ``report.json``
    when it is missing (no export there, or one still being written or cut off) or unreadable."""
    report_uri = storage.join(uri, REPORT_JSON)
    try:
        present = storage.exists(report_uri)
        if not present:
            found = storage.list_files(uri)
            what = (
                f"{len(found)} object(s) but no {REPORT_JSON}: an export cut off or still being "
                "written"
                if found
                else f"no {REPORT_JSON}: no export there"
            )
            raise BucketExportError(f"{report_uri}: {what}")
        raw = storage.read_bytes(report_uri)
    except storage.StorageError as exc:  # credentials, network: said as they are
        raise BucketExportError(f"{report_uri}: cannot read it: {exc}") from exc
    try:
        report = json.loads(raw)
    except ValueError:
        report = None
    files = report.get(FILES_KEY) if isinstance(report, dict) else None
    if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise BucketExportError(
            f"{report_uri}: not an export report with file hashes ('{FILES_KEY}'); "
            "export it again with this version"
        )
    for rel in files:
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BucketExportError(f"{report_uri}: bad file name {rel!r} in '{FILES_KEY}'")
    return report, raw


def report_digest(raw: bytes) -> str:
    """What pins one published export: the sha256 of its report (which hashes every file)."""
    return hashlib.sha256(raw).hexdigest()


def fetch_export(uri: str, files: Iterable[str] | None = None, pin: str | None = None) -> Path:
    """A local copy of the remote export at ``uri`` holding ``files`` (default: every file its
    report lists), each checked against the report's sha256 as it is downloaded. A file already
    fetched for the same report is reused, so a model is downloaded once per machine, however
    many processes (Serve replicas) ask at once: they take turns under a file lock. ``pin``: the
    report digest this export must still have (``serve`` pins the export it checked, so a
    replica started later never serves a republished model)."""
    report, raw = read_report(uri)
    digest = report_digest(raw)
    if pin is not None and digest != pin:
        raise BucketExportError(
            f"{storage.join(uri, REPORT_JSON)}: the export changed since it was checked (report "
            f"sha256 {digest[:12]}..., pinned {pin[:12]}...); restart serve to serve the new one"
        )
    listed: dict[str, str] = report[FILES_KEY]
    wanted = sorted(listed) if files is None else sorted(set(files))
    root = cache_root() / "exports"
    final = root / hashlib.sha256(uri.encode() + b"\0" + raw).hexdigest()[:24]
    try:
        final.mkdir(parents=True, exist_ok=True)
        with open(root / f".{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            for rel in wanted:
                if rel not in listed:
                    raise BucketExportError(
                        f"{storage.join(uri, REPORT_JSON)}: the export has no {rel}"
                    )
                if not (final / rel).is_file():
                    _fetch_file(storage.join(uri, rel), final / rel, listed[rel])
            if not (final / REPORT_JSON).is_file():
                atomic_write_bytes(final / REPORT_JSON, raw)
    except OSError as exc:
        if isinstance(exc, BucketExportError):
            raise
        raise BucketExportError(f"{final}: cannot write the fetched export there: {exc}") from exc
    return final


def _fetch_file(src: str, dst: Path, want: str) -> None:
    """Download ``src`` to ``dst`` through a temporary name, renamed into place only once its
    sha256 is the report's."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part-{os.getpid()}")
    try:
        try:
            got = storage.stream_to_file(src, tmp)
        except storage.StorageError as exc:
            raise BucketExportError(
                f"{src}: listed in the export's {REPORT_JSON} but cannot be read: a partial "
                f"or changed export ({exc})"
            ) from exc
        if got != want:
            raise BucketExportError(
                f"{src}: sha256 {got[:12]}... differs from {want[:12]}... in the export's "
                f"{REPORT_JSON}: the export changed or is partial; export it again"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def local_export(model: str, files: Iterable[str] | None = None, pin: str | None = None) -> Path:
    """``model`` as a local export directory or model file: a bucket URI fetched (``files``
    of it, default all) and checked, a local path as it is."""
    return fetch_export(model, files, pin) if storage.is_remote(model) else Path(model)


def export_name(model: str) -> str:
    """The export's name (its directory's or its prefix's last part), as answers show it."""
    return storage.split(model)[1] if storage.is_remote(model) else Path(model).resolve().name
