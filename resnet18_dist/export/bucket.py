"""An export on object storage (``s3://`` / ``gs://``): published there, and fetched back.

Publishing: the export is made in a local staging directory as usual, then uploaded with its
``report.json`` last. The report lists every artifact's sha256 (``files``), so a reader takes a
prefix for an export only once the report is there, and only with every file matching it. An
upload killed midway therefore leaves no report: nothing a reader takes for an export. Replacing
an earlier export deletes its report first, so a half-replaced prefix is not taken for either.

Fetching (``predict --model s3://...``, ``serve --model s3://...`` on every replica's node): the
report is read, and the files it lists are downloaded once into the cache, under a name made of
the URI and the report's own hash, each checked against its sha256; a later fetch of the same
export is a cache hit. A changed or partial export is refused naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from resnet18_dist import storage
from resnet18_dist.cache import cache_root
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
            out[rel] = _sha256(path)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_remote_out(uri: str) -> None:
    """Refuse (ConfigError, exit 2) an ``--out`` prefix whose bucket is missing, or which holds
    objects that are not an earlier export (publishing deletes what is there)."""
    from resnet18_dist.options import ConfigError

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
        raise ConfigError("--out", str(exc)) from exc
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT):
        raise ConfigError(
            "--out",
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
    when it is missing (no export there, or one still being written or cut off)."""
    report_uri = storage.join(uri, REPORT_JSON)
    try:
        raw = storage.read_bytes(report_uri)
    except storage.StorageError as exc:
        found = _safe_list(uri)
        what = (
            f"{len(found)} object(s) but no {REPORT_JSON}: an export cut off or still being written"
            if found
            else "no export there"
        )
        raise BucketExportError(f"{report_uri}: {what} ({exc})") from exc
    try:
        report = json.loads(raw)
        files = report[FILES_KEY]
        assert isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise BucketExportError(
            f"{report_uri}: not an export report with file hashes ('{FILES_KEY}'); "
            "export it again with this version"
        ) from exc
    return report, raw


def _safe_list(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except storage.StorageError:
        return []


def fetch_export(uri: str) -> Path:
    """A local copy of the remote export at ``uri``, verified file by file against its report's
    sha256 (downloaded once; later calls for the same report reuse the copy)."""
    report, raw = read_report(uri)
    key = hashlib.sha256(uri.encode() + b"\0" + raw).hexdigest()[:24]
    root = cache_root() / "exports"
    final = root / key
    if (final / REPORT_JSON).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        for rel, want in sorted(report[FILES_KEY].items()):
            if rel.startswith("/") or ".." in rel.split("/"):
                raise BucketExportError(f"{storage.join(uri, REPORT_JSON)}: bad file name {rel!r}")
            src = storage.join(uri, rel)
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                got = storage.stream_to_file(src, dst)
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
        (stage / REPORT_JSON).write_bytes(raw)
        try:
            os.rename(stage, final)
        except OSError:
            if not (final / REPORT_JSON).is_file():  # not a concurrent fetch of the same export
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return final


def local_export(model: str) -> Path:
    """``model`` as a local export directory or model file: a bucket URI fetched and verified,
    a local path as it is."""
    return fetch_export(model) if storage.is_remote(model) else Path(model)


def export_name(model: str) -> str:
    """The export's name (its directory's or its prefix's last part), as answers show it."""
    return storage.split(model)[1] if storage.is_remote(model) else Path(model).resolve().name
