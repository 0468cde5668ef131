"""Reporters: where the loop hands each epoch's metrics and checkpoint.

Every rank calls ``report`` once per epoch (Ray Train requires it of all workers); only the
main rank passes a checkpoint state. ``LocalReporter`` keeps checkpoints in the run directory;
the Ray Train reporter (``integrations/ray_train.py``) hands them to ``ray.train.report``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

from resnet18_dist.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch{epoch + 1:04d}"


class Reporter(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> str | None:
        """Persist metrics (and the checkpoint, if given); return where it was saved."""
        ...


class LocalReporter:
    """Checkpoints as ``run_dir/checkpoint_epochNNNN/checkpoint.pt``; the newest ``keep`` stay."""

    def __init__(self, run_dir: Path, keep: int = 2, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.is_main = is_main

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> str | None:
        if checkpoint is None or not self.is_main:
            return None
        directory = self.run_dir / checkpoint_dir_name(int(metrics["epoch"]))
        path = save_checkpoint(checkpoint, directory)
        self._prune()
        return str(path)

    def _prune(self) -> None:
        dirs = sorted(
            d for d in self.run_dir.glob("checkpoint_epoch*") if (d / CHECKPOINT_FILE).is_file()
        )
        for old in dirs[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
