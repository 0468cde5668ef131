"""Observers of a run on rank 0: the JSONL metrics file and the progress bar.

W&B (``integrations/wandb.py``) is another of these. They sit beside the loop and never touch
its arithmetic; the loop calls them only on the main rank.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from resnet18_dist.atomic import atomic_write_text

log = logging.getLogger(__name__)


class Callback:
    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, steps: int) -> None: ...
    def on_train_batch(self, step_in_epoch: int) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: str | None, metrics: dict[str, Any]) -> None: ...
    def on_test(self, report: dict[str, Any]) -> None: ...
    def on_finish(self, failed: bool = False) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def on_start(self, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_start(info)

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(epoch, steps)

    def on_train_batch(self, step_in_epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_train_batch(step_in_epoch)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step(step, metrics)

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch(epoch, metrics)

    def on_checkpoint(self, path: str | None, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(path, metrics)

    def on_test(self, report: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_test(report)

    def on_finish(self, failed: bool = False) -> None:
        for cb in self.callbacks:
            cb.on_finish(failed)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger(Callback):
    """One JSON object per epoch in ``metrics.jsonl`` (appended and flushed each epoch).

    A run that resumes at epoch E first drops the lines of epochs E and later (those of an
    attempt that died after logging them), so the file holds each epoch exactly once. An
    attempt killed between reporting epoch E-1's checkpoint and logging its line leaves no
    line for it: that line is rebuilt from the checkpoint's own metrics (``resumed``).
    """

    def __init__(
        self, path: Path, start_epoch: int = 0, resumed: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.start_epoch = start_epoch
        self.resumed = resumed
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_start(self, info: dict[str, Any]) -> None:
        if not self.path.exists():
            # A new run directory (a resume from another run's checkpoint starts its own log).
            return
        kept, logged = [], set()
        lines = self.path.read_text().splitlines()
        for line in lines:
            try:
                epoch = json.loads(line).get("epoch", -1)
            except (ValueError, AttributeError):  # a torn last line of a killed writer
                continue
            if epoch < self.start_epoch:
                kept.append(line)
                logged.add(epoch)
        last = self.resumed or {}
        if (
            self.start_epoch
            and last.get("epoch") == self.start_epoch - 1
            and (self.start_epoch - 1 not in logged)
        ):
            record = {k: _jsonable(v) for k, v in last.items() if not isinstance(v, (list, dict))}
            kept.append(json.dumps(record))
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        record = {k: _jsonable(v) for k, v in metrics.items() if not isinstance(v, (list, dict))}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def progress_wanted(quiet: bool) -> bool:
    """Progress bars only where they can redraw: a terminal. In a log (a file, a pipe, Ray's
    worker output) each redraw would be another broken line; the epoch summary is the log."""
    return not quiet and sys.stderr.isatty()


class ProgressBar(Callback):
    """Steps of the current epoch with rates (tqdm), on a terminal only."""

    def __init__(self, epochs: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.epochs = epochs
        self.bar: tqdm | None = None
        self.mininterval = 0.1

    def on_epoch_start(self, epoch: int, steps: int) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=steps,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                unit="step",
                mininterval=self.mininterval,
                leave=False,
                file=sys.stderr,
            )

    def on_train_batch(self, step_in_epoch: int) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.4g}", refresh=False
            )

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ConsoleSummary(Callback):
    """One line per epoch and the final test report, kept with --quiet (it is the log)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        log.info(
            f"epoch {epoch + 1}/{self.epochs}: train loss {metrics['train_loss']:.4f} "
            f"top1 {metrics['train_top1']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"top1 {metrics['val_top1']:.4f} top5 {metrics['val_top5']:.4f} "
            f"f1 {metrics['val_f1_macro']:.4f} | {metrics['train_images_per_s']:.0f} img/s train, "
            f"{metrics['val_images_per_s']:.0f} img/s eval | {metrics['epoch_time_s']:.1f}s"
        )
