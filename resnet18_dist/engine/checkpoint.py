"""What a training checkpoint holds, captured and restored in one place (``TrainState``).

``TrainState.capture`` takes the model, optimizer, scheduler and loop state after an epoch;
``TrainState.restore_into`` puts them back; ``to_dict`` / ``from_dict`` are the file's layout
(``checkpoint_file.py`` writes and reads it, versioned). Checkpoints describe themselves: they
carry the model spec, the class names and the run's config, so a checkpoint for another
architecture, class count or class list is refused with a clear error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet18_dist.checkpoint_file import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    write_checkpoint,
)
from resnet18_dist.engine.ema import ModelEma
from resnet18_dist.engine.optim import set_schedule_position
from resnet18_dist.models import ModelSpec
from resnet18_dist.seeding import rng_state, set_rng_state

log = logging.getLogger(__name__)


def cpu_copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


@dataclass
class LoopState:
    """The loop's progress: what an exact resume needs besides weights and optimizer."""

    epoch: int = 0  # the next epoch to run
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    best_model: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # The metrics of the epoch a resume starts after, from its checkpoint (not saved again).
    resumed_metrics: dict[str, Any] | None = field(default=None, repr=False)

    def ended_early(self, epochs: int) -> bool:
        """What the report calls "stopped early": patience ran out before the last of
        ``epochs``. Patience that runs out at the last epoch stopped nothing; ``stopped_early``
        itself still says it ran out, so that a run extended with more epochs restarts it."""
        return self.stopped_early and self.epoch < epochs

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
        }


@dataclass(frozen=True)
class RunMeta:
    """What every checkpoint of a run carries to describe itself."""

    model_spec: dict[str, Any]
    classes: list[str]
    config: dict[str, Any]
    resolved: dict[str, Any]


@dataclass
class TrainState:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loop: LoopState
    rng: dict[str, Any]
    meta: RunMeta
    metrics: dict[str, Any] = field(default_factory=dict)
    val_per_class_acc: list[float] = field(default_factory=list)
    path: str | None = None  # the file it was loaded from
    # --ema-decay: the average's state (ModelEma.state_dict); None without it, and in
    # checkpoints written before it existed.
    ema: dict[str, Any] | None = None

    # -- capture / restore: the two ends of a resume
    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loop: LoopState,
        meta: RunMeta,
        metrics: dict[str, Any] | None = None,
        val_per_class_acc: list[float] | None = None,
        ema: ModelEma | None = None,
    ) -> TrainState:
        """The state after an epoch (``model`` unwrapped), with this process's RNG states."""
        return cls(
            ema=ema.state_dict() if ema is not None else None,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            loop=loop,
            rng=rng_state(),
            meta=meta,
            metrics={k: v for k, v in (metrics or {}).items() if not isinstance(v, dict)},
            val_per_class_acc=list(val_per_class_acc or []),
        )

    def restore_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        steps_per_epoch: int,
        epochs: int,
        ema: ModelEma | None = None,
    ) -> LoopState:
        """Weights, optimizer, RNG and loop state back in place; returns the loop state.

        The schedule's shape comes from this run's config (so --epochs may grow on resume);
        its position is the checkpoint's epoch in this run's steps, so another batch size or
        worker count continues where a straight run with those settings would be.
        """
        model.load_state_dict(self.model)
        # load_state_dict takes every group option from the file, the implementation flags
        # too; keep this run's (a checkpoint from a CPU run resumed on a GPU becomes fused).
        impl = [{k: g.get(k) for k in ("foreach", "fused")} for g in optimizer.param_groups]
        optimizer.load_state_dict(self.optimizer)
        for group, keep in zip(optimizer.param_groups, impl, strict=True):
            group.update(keep)
        if ema is not None:
            if self.ema is not None:
                ema.load_state_dict(self.ema)
            else:  # a checkpoint written without --ema-decay: the average starts here
                log.info("the checkpoint has no weight average; --ema-decay starts one now")
                ema.module.load_state_dict(self.model)
        loop = self.loop
        loop.global_step = loop.epoch * steps_per_epoch
        set_schedule_position(scheduler, loop.global_step)
        set_rng_state(self.rng)
        if loop.stopped_early and epochs > loop.epoch:
            log.info(
                "the run stopped early after epoch %d; continuing to epoch %d, patience restarts",
                loop.epoch,
                epochs,
            )
            loop.stopped_early = False
            loop.bad_epochs = 0
        return loop

    # -- the file's layout
    def to_dict(self) -> dict[str, Any]:
        loop = self.loop
        latest_is_best = loop.best_epoch == loop.epoch - 1
        # With an average, the best weights are the average's (what validation scored): when
        # the latest epoch is the best they equal `ema.model` and are not stored twice.
        return {
            "ema": self.ema,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            # Stored only when the best epoch is not the latest (else it equals `model`).
            "best_model": None if latest_is_best else loop.best_model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "loop": loop.to_dict(),
            "rng": self.rng,
            "model_spec": self.meta.model_spec,
            "classes": self.meta.classes,
            "config": self.meta.config,
            "resolved": self.meta.resolved,
            "metrics": self.metrics,
            "val_per_class_acc": self.val_per_class_acc,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        try:
            loop = LoopState(**raw["loop"])
            loop.best_model = raw.get("best_model")
            ema = raw.get("ema")  # absent in checkpoints from before --ema-decay
            if loop.best_model is None and loop.best_epoch == loop.epoch - 1:
                loop.best_model = cpu_copy(ema["model"] if ema else raw["model"])
            return cls(
                ema=ema,
                model=raw["model"],
                optimizer=raw["optimizer"],
                scheduler=raw.get("scheduler", {}),
                loop=loop,
                rng=raw["rng"],
                meta=RunMeta(
                    model_spec=raw["model_spec"],
                    classes=list(raw.get("classes") or []),
                    config=raw.get("config") or {},
                    resolved=raw.get("resolved") or {},
                ),
                metrics=raw.get("metrics") or {},
                val_per_class_acc=list(raw.get("val_per_class_acc") or []),
                path=raw.get("_path"),
            )
        except (KeyError, TypeError) as exc:
            where = raw.get("_path", "checkpoint")
            raise CheckpointError(f"{where}: not a training checkpoint ({exc!r} missing)") from exc

    def save(self, directory: Path) -> Path:
        return write_checkpoint(self.to_dict(), directory)

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        """A checkpoint file, checkpoint directory or run directory (its newest checkpoint)."""
        return cls.from_dict(load_checkpoint(path))


def check_compatible(
    state: TrainState | dict[str, Any], spec: ModelSpec, classes: list[str] | None = None
) -> None:
    """Reject a checkpoint for another architecture, class count or class list."""
    if isinstance(state, TrainState):
        raw_spec, their_classes, where = state.meta.model_spec, state.meta.classes, state.path
    else:
        raw_spec, their_classes, where = (
            state["model_spec"],
            state.get("classes"),
            state.get("_path"),
        )
    where = where or "checkpoint"
    theirs = ModelSpec.from_dict(raw_spec)
    if theirs.arch != spec.arch:
        raise CheckpointError(f"{where}: built for {theirs.arch!r}, this run builds {spec.arch!r}")
    if theirs.num_classes != spec.num_classes:
        raise CheckpointError(
            f"{where}: has {theirs.num_classes} classes, the data has {spec.num_classes}"
        )
    for name in ("se_reduction", "stem", "width"):
        if getattr(theirs, name) != getattr(spec, name):
            raise CheckpointError(
                f"{where}: {name}={getattr(theirs, name)!r}, this run uses "
                f"{getattr(spec, name)!r} (--{name.replace('_', '-')})"
            )
    if classes is not None and their_classes not in (None, [], classes):
        raise CheckpointError(
            f"{where}: class names {their_classes} differ from the data's {classes}"
        )
