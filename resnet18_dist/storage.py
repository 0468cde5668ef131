"""Run directories on object storage (``s3://bucket/prefix``, ``gs://bucket/prefix``) through
pyarrow's filesystems, the layer Ray Train itself uses for ``storage_path``.

Credentials and endpoints come from the stores' own conventions, so one setting serves Ray,
pyarrow, boto3 and the AWS CLI alike: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an S3-compatible store (MinIO, Ceph, moto);
pyarrow's URI query options (``s3://bucket/prefix?endpoint_override=host:port&scheme=http``) work
too. Google Cloud Storage uses the application-default credentials.

An object store publishes an object whole or not at all, so a file uploaded here is never seen
half-written; there is no rename, so "move aside" is a copy and a delete.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from resnet18_dist.errors import UserError

REMOTE_SCHEMES = ("s3", "gs", "gcs")


class StorageError(OSError, UserError):
    """A remote path that cannot be read or written; the message names it."""


def is_remote(path: str | Path | None) -> bool:
    return isinstance(path, str) and urlsplit(path).scheme in REMOTE_SCHEMES


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended to its path (a query string, if any, stays at the end)."""
    u = urlsplit(uri)
    path = posixpath.join(u.path or "/", *parts)
    return u._replace(path=path).geturl()


def split(uri: str) -> tuple[str, str]:
    """(parent URI, last name) of a remote path."""
    u = urlsplit(uri)
    parent, name = posixpath.split(u.path.rstrip("/"))
    return u._replace(path=parent).geturl(), name


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a remote URI."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own text
        raise StorageError(f"{uri}: {exc}") from exc


def _wrap(uri: str, action: str, fn, *args: Any) -> Any:
    try:
        return fn(*args)
    except StorageError:
        raise
    except Exception as exc:
        raise StorageError(f"{uri}: cannot {action}: {exc}") from exc


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = filesystem(uri)
    info = _wrap(uri, "stat", fs.get_file_info, path)
    return info.type != pyarrow.fs.FileType.NotFound


def version(uri: str) -> str:
    """Size and modification time of a remote file: a new upload under the same name changes
    it (what a local copy is checked against before it is reused)."""
    fs, path = filesystem(uri)
    info = _wrap(uri, "stat", fs.get_file_info, path)
    return f"{info.size} {info.mtime_ns}"


def list_files(uri: str) -> list[str]:
    """Every file under ``uri``, as paths relative to it ('' when nothing is there)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = _wrap(uri, "list", fs.get_file_info, selector)
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == pyarrow.fs.FileType.File)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _wrap(uri, "read", read)


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT: the object appears whole or not at all."""
    fs, path = filesystem(uri)

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    _wrap(uri, "write", write)


def download(uri: str, local: Path) -> Path:
    """Copy a remote file or directory to ``local`` (a file path, or a directory)."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    info = _wrap(uri, "stat", fs.get_file_info, path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{uri}: no such file or directory")
    local = Path(local)
    if info.type == pyarrow.fs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f"{local.name}.part-{os.getpid()}")  # ranks may share a node
        try:
            stream_to_file(uri, tmp)
            tmp.replace(local)  # a kill mid-download leaves no file under the real name
        finally:
            tmp.unlink(missing_ok=True)
        return local
    local.mkdir(parents=True, exist_ok=True)
    _wrap(
        uri,
        "download",
        pyarrow.fs.copy_files,
        path,
        str(local.resolve()),
        fs,
        pyarrow.fs.LocalFileSystem(),
    )
    return local


def stream_to_file(uri: str, local: Path, chunk: int = 8 << 20) -> str:
    """Copy one remote file into ``local`` a chunk at a time (a checkpoint or a shard may be
    larger than memory), flushed to disk; returns its sha256. The caller renames it into place.
    A failure to read is a StorageError naming ``uri``; a failure to write (a full disk) is the
    OSError itself, for the caller to name its own directory."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    src = _wrap(uri, "open", fs.open_input_stream, path)
    with src, open(local, "wb") as dst:
        while block := _wrap(uri, "read", src.read, chunk):
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def upload_file(local: Path, uri: str) -> None:
    write_bytes(uri, Path(local).read_bytes())


def copy_tree(src: str, dst: str) -> None:
    import pyarrow.fs

    fs, src_path = filesystem(src)
    _, dst_path = filesystem(dst)
    _wrap(src, f"copy to {dst}", pyarrow.fs.copy_files, src_path, dst_path, fs, fs)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    _wrap(uri, "delete", fs.delete_file, path)


def delete_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    _wrap(uri, "delete", fs.delete_dir, path)


def require_bucket(uri: str) -> None:
    """Refuse a URI whose bucket does not exist (or cannot be seen with these credentials)
    before anything is started: Ray would only fail at the first checkpoint."""
    import pyarrow.fs

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    info = _wrap(uri, "stat", fs.get_file_info, bucket)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{uri}: bucket {bucket!r} does not exist or is not visible")
