"""Checkpoints: self-describing, plain data (``weights_only`` loadable), written atomically.

One format for every launcher. A checkpoint is a directory holding ``checkpoint.pt`` (the
layout Ray Train persists), so a run started under accelerate resumes under Ray and back.
"""

from __future__ import annotations

import io
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from resnet18_dist.atomic import atomic_write
from resnet18_dist.models import ModelSpec

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or for another model; the message names the file."""


def save_checkpoint(state: dict[str, Any], directory: Path) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (temp file, fsync, rename)."""
    path = Path(directory) / CHECKPOINT_FILE
    atomic_write(path, lambda fh: torch.save(state, fh))
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, a checkpoint directory, or a run directory (its latest checkpoint)."""
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


def latest_checkpoint_in(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest epoch among ``run_dir/checkpoint_*/``.

    Our own writes are atomic, but Ray Train persists a reported checkpoint by copying it into
    the run directory in place (``pyarrow.fs.copy_files``): a worker killed mid-copy leaves a
    truncated file there. Ray never registers it, and neither do we: it is skipped, with a
    warning, for the newest one that is whole.
    """
    found = []
    for f in Path(run_dir).glob(f"checkpoint_*/{CHECKPOINT_FILE}"):
        m = re.search(r"epoch(\d+)", f.parent.name)
        found.append((int(m.group(1)) if m else -1, f.stat().st_mtime, f))
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
    """Load as data only (``weights_only=True``): a checkpoint can never run code."""
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
    state["_path"] = str(p)
    return state


def check_compatible(
    state: dict[str, Any], spec: ModelSpec, classes: list[str] | None = None
) -> None:
    """Reject a checkpoint for another architecture, class count or class list."""
    theirs = ModelSpec.from_dict(state["model_spec"])
    where = state.get("_path", "checkpoint")
    if theirs.arch != spec.arch:
        raise CheckpointError(f"{where}: built for {theirs.arch!r}, this run builds {spec.arch!r}")
    if theirs.num_classes != spec.num_classes:
        raise CheckpointError(
            f"{where}: has {theirs.num_classes} classes, the data has {spec.num_classes}"
        )
    for field in ("se_reduction", "stem"):
        if getattr(theirs, field) != getattr(spec, field):
            raise CheckpointError(
                f"{where}: {field}={getattr(theirs, field)!r}, this run uses "
                f"{getattr(spec, field)!r} (--{field.replace('_', '-')})"
            )
    if classes is not None and state.get("classes") not in (None, classes):
        raise CheckpointError(
            f"{where}: class names {state['classes']} differ from the data's {classes}"
        )


def best_model_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights of the best validation epoch (the current ones when that epoch is the latest)."""
    return state.get("best_model") or state["model"]


def state_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
