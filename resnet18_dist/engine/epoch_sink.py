"""Epoch sinks: where the loop hands each epoch's metrics and checkpoint.

Every rank calls ``report`` once per epoch (Ray Train requires it of all workers); only the
main rank passes a checkpoint. ``LocalEpochSink`` keeps checkpoints in the run directory; the Ray
Train sink (``integrations/ray_worker.py``) hands them to ``ray.train.report``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from resnet18_dist.checkpoint_file import CHECKPOINT_FILE, checkpoint_dir_name, checkpoint_epoch

if TYPE_CHECKING:  # only a type here; importing it would pull in the models
    from resnet18_dist.engine.checkpoint import TrainState


class EpochSink(Protocol):
    def report(self, metrics: dict[str, Any], checkpoint: TrainState | None) -> str | None:
        """Persist metrics (and the checkpoint, if given); return where it was saved."""
        ...


class LocalEpochSink:
    """Checkpoints as ``run_dir/checkpoint_epochNNNN/checkpoint.pt``; the newest ``keep`` stay."""

    def __init__(self, run_dir: Path, keep: int = 2, is_main: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.is_main = is_main

    def report(self, metrics: dict[str, Any], checkpoint: TrainState | None) -> str | None:
        if checkpoint is None or not self.is_main:
            return None
        path = checkpoint.save(self.run_dir / checkpoint_dir_name(int(metrics["epoch"])))
        self._prune()
        return str(path)

    def _prune(self) -> None:
        """Keep the ``keep`` highest epochs (by number: names sort wrongly past epoch 9999)."""
        dirs = sorted(
            (d for d in self.run_dir.glob("checkpoint_epoch*") if (d / CHECKPOINT_FILE).is_file()),
            key=checkpoint_epoch,
        )
        for old in dirs[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
