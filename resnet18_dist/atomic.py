"""Atomic file and directory publication: write elsewhere, fsync, rename into place.

A reader (or a restarted run) sees either the previous complete file or the new complete one,
never a torn write, even if the process is killed or the disk fills up part-way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from resnet18_dist.errors import UserError


class WriteError(OSError, UserError):
    """Writing an output failed; the message names the path and the reason."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems (e.g. on Windows) cannot fsync dirs
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return exc.strerror or str(exc)


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere, the only portable read is a set-and-restore
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then rename it into place.

    The file gets the mode an ordinary ``open()`` would give it (0666 less the umask), not
    mkstemp's owner-only 0600: datasets and exports are read by other users and services.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path}: {_describe(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"cannot write {path}: {_describe(exc)}") from exc
        # torch.save wraps I/O failures in RuntimeError; report them with the path as well.
        if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
            raise WriteError(errno.EIO, f"cannot write {path}: {exc}") from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``final``; on success it replaces ``final``.

    On any error the staging directory is removed and ``final`` (if it existed) is untouched.
    The swap is two renames, so a crash between them leaves the old copy under a hidden
    ``.<name>.old-*`` name rather than a half-written ``final``.
    """
    final = Path(final).absolute()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        stage.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the output
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {final}: {_describe(exc)}") from exc
    try:
        yield stage
        _fsync_dir(stage)
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
        os.rename(stage, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(exc.errno, f"cannot write {final}: {_describe(exc)}") from exc
        raise
