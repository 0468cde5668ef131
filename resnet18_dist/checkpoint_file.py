"""The checkpoint file: plain data (``weights_only`` loadable), versioned, written atomically.

A leaf module (torch and the atomic writer only), so that every floor can read a checkpoint:
``models/`` for pretrained starts and teachers, ``engine/`` to resume, ``export/`` to export.
What a training checkpoint holds, and how it is assembled and restored, is
``engine/checkpoint.py``'s ``TrainState``; this module only moves the dict to and from disk.

A checkpoint is a directory holding ``checkpoint.pt`` (the layout Ray Train persists), so a run
started under accelerate resumes under Ray and back.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from resnet18_dist import storage
from resnet18_dist.atomic import atomic_write, atomic_write_text
from resnet18_dist.errors import UserError

# torch is imported where a checkpoint is read or written: finding one (the run-name rule, in a
# launcher before anything else starts) needs only the file system.
if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "checkpoint.pt"
SOURCE_FILE = "source.txt"  # next to a checkpoint fetched from object storage: its URI
# 1: the first release. 2: the lr schedule's position is kept in epochs (format 1 files load:
# their fields are a subset). 3: an EMA of the weights may be stored, and when it is on, the
# best snapshot is of the average (an older release would export the live weights instead, so
# it must refuse these files; formats 1 and 2 load here unchanged).
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)

log = logging.getLogger(__name__)


class CheckpointError(ValueError, UserError):
    """A checkpoint is missing, unreadable or for another model; the message names the file."""


def write_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (temp file, fsync, rename)."""
    path = Path(directory) / CHECKPOINT_FILE
    import torch

    atomic_write(path, lambda fh: torch.save(state, fh))
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, a checkpoint directory, or a run directory (its latest checkpoint);
    on object storage (``s3://...``) the one file is fetched into the local cache first."""
    if storage.is_remote(path):
        return fetch_remote_checkpoint(str(path))
    p = Path(path)
    if p.is_file():
        return p
    if (p / CHECKPOINT_FILE).is_file():
        return p / CHECKPOINT_FILE
    if p.is_dir():
        found = latest_checkpoint_in(p)
        if found is not None:
            return found
        raise CheckpointError(f"{p}: no {CHECKPOINT_FILE} in it or in any checkpoint_* directory")
    raise CheckpointError(f"{p}: no such checkpoint file or directory")


def latest_remote_checkpoint(run_uri: str) -> str | None:
    """The ``checkpoint_*/checkpoint.pt`` with the highest epoch under a remote run directory.
    An object is published whole, so no completeness check is needed here."""
    found = [
        f
        for f in storage.list_files(run_uri)
        if f.count("/") == 1 and f.startswith("checkpoint_") and f.endswith("/" + CHECKPOINT_FILE)
    ]
    if not found:
        return None
    newest = max(found, key=lambda f: checkpoint_epoch(Path(f).parent))
    return storage.join(run_uri, newest)


def fetch_remote_checkpoint(uri: str) -> Path:
    """Download the checkpoint named by a remote file, checkpoint directory or run directory
    into the local cache (keyed by its URI); returns the local file."""
    try:
        return _fetch(uri)
    except storage.StorageError as exc:  # unreachable endpoint, no credentials, ...
        raise CheckpointError(str(exc)) from exc
    except OSError as exc:  # the local side: a full disk, a read-only cache
        from resnet18_dist.cache import cache_root

        raise CheckpointError(
            f"cannot copy {uri} into the cache {cache_root()}: {exc} (free space there, or "
            "point $RESNET18_DIST_CACHE at a larger disk)"
        ) from exc


def _fetch(uri: str) -> Path:
    from resnet18_dist.cache import cache_root

    if urlsplit(uri).path.rstrip("/").endswith("/" + CHECKPOINT_FILE):
        source = uri
    elif storage.exists(storage.join(uri, CHECKPOINT_FILE)):
        source = storage.join(uri, CHECKPOINT_FILE)
    else:
        source = latest_remote_checkpoint(uri)
        if source is None:
            if not storage.exists(uri):
                raise CheckpointError(f"{uri}: no such checkpoint file or directory")
            raise CheckpointError(
                f"{uri}: no {CHECKPOINT_FILE} in it or in any checkpoint_* directory"
            )
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    local = cache_root() / "remote-checkpoints" / key / CHECKPOINT_FILE
    marker = local.parent / SOURCE_FILE
    stamp = f"{source}\n{storage.version(source)}"
    if not (local.is_file() and marker.is_file() and marker.read_text() == stamp):
        storage.download(source, local)
        # What messages and metadata name; the same object is not downloaded twice. Atomic:
        # ranks of one node may fetch the same checkpoint at once.
        atomic_write_text(marker, stamp)
    return local


def checkpoint_dir_name(epoch: int) -> str:
    """The directory a checkpoint taken after 0-based ``epoch`` is saved in (one place for the
    name that ``checkpoint_epoch`` reads back)."""
    return f"checkpoint_epoch{epoch + 1:04d}"


def checkpoint_epoch(path: Path) -> int:
    """The epoch number in ``checkpoint_epochNNNN`` (-1 for any other name)."""
    m = re.search(r"epoch(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def latest_checkpoint_in(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest epoch among ``run_dir/checkpoint_*/``.

    Our own writes are atomic, but a checkpoint copied into place by other means (Ray Train's
    default upload, ``pyarrow.fs.copy_files``, or a user's ``cp``) can be left truncated by a
    kill mid-copy. It is skipped, with a warning, for the newest one that is whole.
    """
    found = [
        (checkpoint_epoch(f.parent), f.stat().st_mtime, f)
        for f in Path(run_dir).glob(f"checkpoint_*/{CHECKPOINT_FILE}")
    ]
    for _, _, f in sorted(found, key=lambda t: t[:2], reverse=True):
        problem = _incomplete(f)
        if problem is None:
            return f
        log.warning("skipping %s: incomplete checkpoint (%s)", f, problem)
    return None


def _incomplete(path: Path) -> str | None:
    """Why ``path`` is not a whole torch.save archive, or None. torch.save writes a zip whose
    central directory comes last, so any truncation shows here without reading the tensors."""
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("/data.pkl") for n in zf.namelist()):
                return "no data.pkl in the archive"
    except (zipfile.BadZipFile, OSError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load as data only (``weights_only=True``): a checkpoint can never run code.

    The dict gets ``_path`` (the file it came from). A checkpoint written by a newer release
    (an unknown ``format_version``) is refused with a message that says so.
    """
    import torch

    p = resolve_checkpoint_path(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"{p}: not a readable checkpoint ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "model_spec" not in state:
        raise CheckpointError(f"{p}: not a resnet18-dist checkpoint (no model / model_spec)")
    version = state.get("format_version", 1)
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{p}: checkpoint format {version!r}; this resnet18-dist reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))} (was it written by a newer release?)"
        )
    source = p.parent / SOURCE_FILE
    state["_path"] = (
        source.read_text().splitlines()[0]
        if storage.is_remote(str(path)) and source.is_file()
        else str(p)
    )
    return state


def best_model_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights of the best validation epoch (the current ones when that epoch is the latest:
    the weight average's, when the run kept one with --ema-decay)."""
    ema = state.get("ema")
    return state.get("best_model") or (ema["model"] if ema else None) or state["model"]
