"""The training loop: ``train_one_epoch``, ``evaluate`` and ``fit``. It knows nothing of Ray,
accelerate or W&B; it sees a runtime, a sink, loaders and a task.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from resnet18_dist.data.loaders import Loader, Loaders
from resnet18_dist.engine.callbacks import Callback, CallbackList
from resnet18_dist.engine.checkpoint import LoopState, RunMeta, TrainState, cpu_copy
from resnet18_dist.engine.ema import ModelEma
from resnet18_dist.engine.epoch_sink import EpochSink
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.tasks import Task
from resnet18_dist.metrics import ClassificationMetrics, scalars
from resnet18_dist.seeding import derive_seed, seed_everything


@dataclass
class TrainingSetup:
    """What ``fit`` trains: built once per run by the session."""

    model: nn.Module  # as the runtime wrapped it (DDP, accelerate), compiled with --compile
    unwrapped: nn.Module
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # model.train(), except that frozen parts keep BatchNorm in eval (models/finetune.py)
    set_train_mode: Callable[[nn.Module], None] = lambda m: m.train()
    ema: ModelEma | None = None  # --ema-decay: updated every step; validated and exported

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and the best snapshot keeps: the average when there is one."""
        return self.ema.module if self.ema is not None else self.unwrapped


@dataclass(frozen=True)
class FitOptions:
    epochs: int
    patience: int  # 0 = no early stopping
    seed: int
    num_classes: int
    log_every: int = 10
    show_progress: bool = False


def train_one_epoch(
    setup: TrainingSetup,
    loader: Loader,
    runtime: TorchRuntime,
    state: LoopState,
    callbacks: Callback,
    log_every: int,
) -> dict[str, float]:
    model, task, optimizer, scheduler = (
        setup.model,
        setup.task,
        setup.optimizer,
        setup.scheduler,
    )
    setup.set_train_mode(model)
    device = runtime.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = window_start = time.perf_counter()
    window_seen = 0
    for i, (images, labels) in enumerate(loader):
        n = labels.shape[0]  # shape metadata: no host sync
        if n >= 2:
            with runtime.autocast():
                loss, logits = task.loss(model, images, labels)
        else:
            loss, logits = _tiny_batch_loss(model, task, images, labels, runtime)
        optimizer.zero_grad(set_to_none=True)
        runtime.backward(loss)
        runtime.step(optimizer)
        if setup.ema is not None:
            setup.ema.update()
        scheduler.step()
        state.global_step += 1
        seen += n
        window_seen += n
        # Device-side accumulation: no host sync per step.
        loss_sum += loss.detach().float() * n
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        if runtime.is_main:
            callbacks.on_train_batch(i)
            if state.global_step % log_every == 0:
                now = time.perf_counter()
                callbacks.on_step(
                    state.global_step,
                    {
                        "loss": float(loss.detach()),  # one host sync per log interval
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": window_seen * runtime.world_size / (now - window_start),
                    },
                )
                window_start, window_seen = now, 0
    runtime.synchronize()
    elapsed = time.perf_counter() - start
    totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)])
    runtime.all_reduce(totals)
    loss_total, correct_total, seen_total = totals.tolist()
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "train_top1": correct_total / max(seen_total, 1),
        "train_images_per_s": seen_total / elapsed,
        "train_samples": int(seen_total),
        "train_time_s": elapsed,
    }


def _tiny_batch_loss(
    model: nn.Module, task: Task, images: torch.Tensor, labels: torch.Tensor, runtime: TorchRuntime
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last training batch of an epoch can hold 1 sample, or none on a rank whose part of
    the split was one sample shorter (every sample is read exactly once per epoch). BatchNorm
    cannot take statistics of so few values, so this step uses the running statistics; an empty
    batch contributes a zero loss but still joins DDP's gradient all-reduce, which every rank
    must reach."""
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for m in bns:
        m.eval()
    try:
        with runtime.autocast():
            if labels.numel():
                return task.loss(model, images, labels)
            logits = model(images)
            return logits.sum() * 0.0, logits
    finally:
        for m in bns:
            m.train()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Loader,
    runtime: TorchRuntime,
    num_classes: int,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Metrics over the whole split across ranks. Pass the *unwrapped* model: ranks may hold
    one batch more or less, and a DDP forward would wait on the others."""
    model.eval()
    metrics = ClassificationMetrics(num_classes, runtime.device)
    start = time.perf_counter()
    batches = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress)
    for images, labels in batches:
        if labels.shape[0] == 0:  # a rank whose part of the split ended one batch early
            continue
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        metrics.update(logits, labels, F.cross_entropy(logits, labels))
    runtime.synchronize()
    elapsed = time.perf_counter() - start
    result = metrics.compute()  # collective: sums every rank's counts
    # The slowest rank bounds the wall time; every sample is counted once in `samples`.
    t = runtime.all_reduce(torch.tensor([elapsed], device=runtime.device), op="max")
    result["images_per_s"] = result["samples"] / max(float(t[0]), 1e-9)
    result["time_s"] = float(t[0])
    return result


def fit(
    setup: TrainingSetup,
    loaders: Loaders,
    runtime: TorchRuntime,
    sink: EpochSink,
    opts: FitOptions,
    meta: RunMeta,
    state: LoopState | None = None,
    callbacks: Callback | None = None,
) -> LoopState:
    """Train from ``state.epoch`` to ``opts.epochs`` with early stopping; report every epoch.

    ``meta`` (config, model spec, class names...) goes into every checkpoint so that it
    describes itself.
    """
    state = state or LoopState()
    callbacks = callbacks or CallbackList()
    unwrapped = setup.unwrapped
    while state.epoch < opts.epochs and not state.stopped_early:
        epoch = state.epoch
        epoch_start = time.perf_counter()
        # Per-rank, per-epoch seeds: a resumed epoch draws the same random numbers as a
        # straight run, whatever happened before it.
        seed_everything(derive_seed(opts.seed, runtime.rank, epoch))
        loaders.train.set_epoch(epoch)
        if runtime.is_main:
            callbacks.on_epoch_start(epoch, len(loaders.train))
        train = train_one_epoch(setup, loaders.train, runtime, state, callbacks, opts.log_every)
        # One set of BatchNorm statistics for evaluation, the best snapshot and the checkpoint.
        runtime.broadcast_buffers(unwrapped)
        if setup.ema is not None:
            runtime.broadcast_buffers(setup.ema.module)
        val = evaluate(
            setup.eval_model,
            loaders.val,
            runtime,
            opts.num_classes,
            progress=opts.show_progress,
            desc=f"val {epoch + 1}",
        )

        improved = val["top1"] > state.best_top1
        if improved:
            state.best_top1, state.best_epoch, state.bad_epochs = val["top1"], epoch, 0
            state.best_model = cpu_copy(setup.eval_model.state_dict())
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        state.stopped_early = bool(opts.patience) and state.bad_epochs >= opts.patience

        peak = runtime.all_reduce(
            torch.tensor([float(runtime.peak_memory_bytes())], device=runtime.device), op="max"
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": state.global_step,
            **train,
            **scalars(val, "val"),
            "val_images_per_s": val["images_per_s"],
            "val_time_s": val["time_s"],
            "lr": setup.optimizer.param_groups[0]["lr"],
            "peak_memory_mb": float(peak[0]) / 2**20,
            "best_val_top1": state.best_top1,
            "best_epoch": state.best_epoch,
            "stopped_early": state.ended_early(opts.epochs),
        }
        checkpoint = None
        if runtime.is_main:
            checkpoint = TrainState.capture(
                unwrapped,
                setup.optimizer,
                setup.scheduler,
                state,
                meta,
                metrics,
                val["per_class_acc"],
                ema=setup.ema,
            )
        handover = time.perf_counter()
        saved = sink.report(dict(metrics), checkpoint)
        metrics["checkpoint_time_s"] = time.perf_counter() - handover
        metrics["epoch_time_s"] = time.perf_counter() - epoch_start
        if runtime.is_main:
            callbacks.on_epoch(epoch, metrics)
            callbacks.on_checkpoint(saved, metrics)
    return state


def load_best_weights(model: nn.Module, state: LoopState) -> None:
    if state.best_model is not None:
        model.load_state_dict(copy.copy(state.best_model))
