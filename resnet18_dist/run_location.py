"""Where a run (or a sweep) lives: a local directory or a prefix on object storage, behind one
interface, so that the run-name rule, resume, pruning and the launchers never ask which it is.

``RunLocation.of(output_dir, name)`` gives a ``LocalRun`` or a ``BucketRun``. Both own the same
things: what the run holds (its files, its ``checkpoint_*`` directories, the newest complete
checkpoint, the epochs of a finished run), reading a run file, deleting a checkpoint, the name a
second run of the same default name gets (``unique_name``) and keeping an old run aside under
``NAME.prev-TIMESTAMP`` (``move_aside``). Ground floor: no torch, nothing above it.
"""

from __future__ import annotations

import json
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import urlsplit

from resnet18_dist import storage
from resnet18_dist.checkpoint_file import (
    CHECKPOINT_FILE,
    checkpoint_epoch,
    latest_checkpoint_in,
    latest_remote_checkpoint,
)
from resnet18_dist.run_files import REPORT_FILE

CHECKPOINT_PREFIX = "checkpoint_"


class RunLocation(ABC):
    """One run directory, local or on a bucket. ``path`` is what plans, messages and reports
    name: a ``Path`` for a local run, the URI (a str) for one on object storage."""

    path: Path | str

    @staticmethod
    def of(parent: str | Path, name: str) -> RunLocation:
        if storage.is_remote(parent):
            return BucketRun(storage.join(str(parent), name))
        return LocalRun(Path(parent).resolve() / name)

    @staticmethod
    def at(path: str | Path) -> RunLocation:
        """The run directory ``path`` itself (a local path or a URI)."""
        if storage.is_remote(path):
            return BucketRun(str(path))
        return LocalRun(Path(path))

    @property
    def name(self) -> str:
        return self.parent_and_name()[1]

    @abstractmethod
    def parent_and_name(self) -> tuple[str, str]: ...

    @abstractmethod
    def sibling(self, name: str) -> RunLocation:
        """The run directory ``name`` beside this one."""

    @abstractmethod
    def entries(self) -> set[str]:
        """The names directly in the run directory (files and directories); empty if absent."""

    def holds_a_run(self) -> bool:
        return bool(self.entries())

    @abstractmethod
    def exists(self) -> bool:
        """Anything is there under this name (an empty directory or a file, locally)."""

    @abstractmethod
    def read_text(self, name: str) -> str:
        """A run file's text (FileNotFoundError, or storage's error, when it is not there)."""

    @abstractmethod
    def newest_checkpoint(self) -> Path | str | None:
        """The newest complete ``checkpoint_*/checkpoint.pt``, or None."""

    @abstractmethod
    def delete_entry(self, name: str) -> None:
        """Delete one directory of the run (a checkpoint) with everything in it."""

    @abstractmethod
    def join(self, relative: str) -> Path | str:
        """A path inside the run directory."""

    @abstractmethod
    def relative(self, other: str | Path) -> str | None:
        """``other`` relative to this run directory ('' for the directory itself) when it lies
        inside it, else None."""

    @abstractmethod
    def _move_to(self, target: RunLocation) -> None: ...

    def finished_epochs(self) -> int | None:
        """Epochs a finished run trained (from its report), or None if it has not finished (0
        for a report that cannot be read: finished, but with nothing to extend)."""
        if REPORT_FILE not in self.entries():
            return None
        try:
            return int(json.loads(self.read_text(REPORT_FILE))["epochs_run"])
        except (ValueError, KeyError, TypeError):
            return 0

    def checkpoint_names(self) -> list[str]:
        """The run's ``checkpoint_*`` directory names, oldest epoch first."""
        names = [n for n in self.entries() if n.startswith(CHECKPOINT_PREFIX)]
        return sorted(names, key=lambda n: checkpoint_epoch(Path(n)))

    def aside(self) -> RunLocation:
        """Where ``move_aside`` would keep this run now: ``NAME.prev-TIMESTAMP``, with a suffix
        if a run was already moved there in the same second."""
        base = f"{self.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}"
        return self.sibling(unique_name(self.sibling(base), base))

    def move_aside(self, target: RunLocation | None = None) -> RunLocation:
        """Keep the run under ``target`` (default: ``aside()`` now) and leave this name free;
        returns where it went. A plan that already named where the run goes (and what it will
        read from there) passes that, so a second that ticks in between changes nothing."""
        target = target or self.aside()
        self._move_to(target)
        return target


def unique_name(first: RunLocation, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first name beside ``first`` (whose name is
    ``base``) that holds nothing. A run started in the same second as another gets a suffix,
    not the other's directory."""
    name, n = base, 1
    while first.sibling(name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


class LocalRun(RunLocation):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def parent_and_name(self) -> tuple[str, str]:
        return str(self.path.parent), self.path.name

    def sibling(self, name: str) -> LocalRun:
        return LocalRun(self.path.with_name(name))

    def exists(self) -> bool:
        return self.path.exists()

    def checkpoint_names(self) -> list[str]:
        """Directories only: a file named ``checkpoint_*`` is not a checkpoint of this run."""
        return [n for n in super().checkpoint_names() if (self.path / n).is_dir()]

    def entries(self) -> set[str]:
        if not self.path.is_dir():
            return set()
        return {p.name for p in self.path.iterdir()}

    def read_text(self, name: str) -> str:
        return (self.path / name).read_text()

    def newest_checkpoint(self) -> Path | None:
        return latest_checkpoint_in(self.path) if self.path.is_dir() else None

    def delete_entry(self, name: str) -> None:
        entry = self.path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    def join(self, relative: str) -> Path:
        return self.path / relative if relative else self.path

    def relative(self, other: str | Path) -> str | None:
        if storage.is_remote(other):
            return None
        try:
            rel = Path(other).resolve().relative_to(self.path.resolve())
        except (ValueError, OSError):
            return None
        return "" if rel == Path(".") else rel.as_posix()

    def _move_to(self, target: RunLocation) -> None:
        self.path.rename(target.path)


class BucketRun(RunLocation):
    """A run under a prefix of an object store. An object is published whole (no half-written
    checkpoint to skip); there is no rename, so moving aside is a copy and a delete."""

    def __init__(self, uri: str) -> None:
        self.path = uri.rstrip("/")

    def parent_and_name(self) -> tuple[str, str]:
        return storage.split(self.path)

    def sibling(self, name: str) -> BucketRun:
        return BucketRun(storage.join(self.parent_and_name()[0], name))

    def files(self) -> list[str]:
        """Every object under the run, relative to it."""
        return storage.list_files(self.path)

    def exists(self) -> bool:
        return bool(self.files())

    def entries(self) -> set[str]:
        return {f.split("/", 1)[0] for f in self.files()}

    def read_text(self, name: str) -> str:
        return storage.read_bytes(storage.join(self.path, name)).decode()

    def newest_checkpoint(self) -> str | None:
        return latest_remote_checkpoint(self.path)

    def delete_entry(self, name: str) -> None:
        storage.delete_tree(storage.join(self.path, name))

    def join(self, relative: str) -> str:
        return storage.join(self.path, relative) if relative else self.path

    def relative(self, other: str | Path) -> str | None:
        """A query string (pyarrow's ``?endpoint_override=...``) does not take part."""
        if not storage.is_remote(other):
            return None
        u, r = urlsplit(str(other)), urlsplit(self.path)
        if (u.scheme, u.netloc) != (r.scheme, r.netloc):
            return None
        path, base = u.path.rstrip("/"), r.path.rstrip("/")
        if path == base:
            return ""
        return path[len(base) + 1 :] if path.startswith(base + "/") else None

    def _move_to(self, target: RunLocation) -> None:
        storage.copy_tree(self.path, str(target.path))
        storage.delete_tree(self.path)


__all__ = ["CHECKPOINT_FILE", "BucketRun", "LocalRun", "RunLocation", "unique_name"]
