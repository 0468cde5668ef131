"""One training run, from config to test report; every launcher calls ``run_training``.

The phases, in order: ``build_data`` (manifest, policy, loaders; shards verified once per node)
-> ``build_setup`` (model, optimizer, schedule, task) -> ``restore`` (a checkpoint, if resuming)
-> ``describe_run`` (what "auto" resolved to) -> ``open_run`` (the run directory's header files
and the rank-0 callbacks) -> ``fit`` -> ``evaluate_best`` (the test split with the
best-validation weights) -> ``publish`` (``model.pt``, ``report.json``). The launcher supplies
the runtime (process / Ray Train / accelerate), the sink (run directory / Ray Train) and any
extra rank-0 callbacks (W&B).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resnet18_dist import __version__, storage
from resnet18_dist.atomic import atomic_write_text
from resnet18_dist.config import TrainConfig
from resnet18_dist.data.digits import dataset_dir
from resnet18_dist.data.loaders import Loaders, build_loaders, loader_settings
from resnet18_dist.data.manifest import DatasetError, Manifest
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD, DataPolicy, resolve_policy
from resnet18_dist.engine.callbacks import (
    Callback,
    CallbackList,
    ConsoleSummary,
    JsonlLogger,
    ProgressBar,
    progress_wanted,
)
from resnet18_dist.engine.checkpoint import LoopState, RunMeta, TrainState, check_compatible
from resnet18_dist.engine.compiling import Compiled, maybe_compile
from resnet18_dist.engine.ema import ModelEma
from resnet18_dist.engine.epoch_sink import EpochSink
from resnet18_dist.engine.loop import (
    FitOptions,
    TrainingSetup,
    evaluate,
    fit,
    load_best_weights,
)
from resnet18_dist.engine.optim import build_optimizer, build_scheduler, impl_name
from resnet18_dist.engine.rundir import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_INFO_FILE,
)
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.tasks import ClassificationTask, DistillationTask, Task
from resnet18_dist.metrics import scalars
from resnet18_dist.model_meta import ExportMeta
from resnet18_dist.models import ModelSpec, build_model, count_parameters, resolve_stem
from resnet18_dist.models.finetune import apply_freeze, load_pretrained
from resnet18_dist.models.model_file import save_model_pt
from resnet18_dist.models.teacher import load_teacher
from resnet18_dist.seeding import seed_everything

log = logging.getLogger(__name__)


@dataclass
class RunData:
    manifest: Manifest
    policy: DataPolicy
    loaders: Loaders


def worker_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """--batch-size per worker; an elastic run keeps its global batch at --batch-size x MAX
    whatever its current size (rounded up to whole samples per worker), so the lr and the
    schedule (whose position is kept in epochs) stay right across a resize."""
    if not cfg.cluster.elastic:
        return cfg.data.batch_size
    return math.ceil(cfg.data.batch_size * cfg.cluster.max_workers / world_size)


def build_data(cfg: TrainConfig, runtime: TorchRuntime) -> RunData:
    """Manifest, policy and this rank's loaders.

    Shard hashes (the DALI backend's guard against a corrupt file) are checked by one rank per
    node, local rank 0; the others wait for its verdict in the collective below, so a bad shard
    stops every rank with an error and nobody reads it.
    """
    manifest = Manifest.load(
        dataset_dir(cfg.data.data_dir, cfg.data.manifest_sha256, cfg.data.fetch_threads)
    )
    policy = resolve_policy(cfg.data, manifest)
    settings = loader_settings(
        cfg.data,
        batch_size=worker_batch_size(cfg, runtime.world_size),
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=cfg.run.seed,
        device=runtime.device,
        channels_last=runtime.channels_last,
        cpus_per_worker=runtime.cpus,
        verify_shards=runtime.local_rank == 0,
    )
    error: Exception | None = None
    loaders = None
    try:
        loaders = build_loaders(cfg.data, manifest, policy, settings)
    except DatasetError as exc:
        error = exc
    flag = torch.tensor([float(error is not None)], device=runtime.device)
    failed = runtime.all_reduce(flag, op="max")
    if error is not None:
        raise error
    if float(failed[0]) > 0:
        assert loaders is not None
        loaders.close()
        raise DatasetError(
            f"{manifest.root}: another rank of this job found the dataset unusable (its error "
            "names the shard); nothing was read here"
        )
    assert loaders is not None
    return RunData(manifest, policy, loaders)


@dataclass
class RunModel:
    spec: ModelSpec
    setup: TrainingSetup
    teacher_info: dict[str, Any] | None


def build_setup(cfg: TrainConfig, runtime: TorchRuntime, data: RunData, resuming: bool) -> RunModel:
    """Model (pretrained and frozen parts), DDP wrapping, optimizer, schedule and task."""
    spec = ModelSpec(
        arch=cfg.model.arch,
        num_classes=data.manifest.num_classes,
        se_reduction=cfg.model.se_reduction,
        stem=resolve_stem(cfg.model.stem, data.policy.image_size),
        dropout=cfg.model.dropout,
        width=cfg.model.width,
    )
    model = build_model(spec)
    if cfg.model.pretrained and not resuming:  # a resumed run has its own weights
        load_pretrained(model, cfg.model.pretrained)
    set_train_mode = apply_freeze(model, cfg.model.freeze)
    wrapped = runtime.wrap_model(model)
    unwrapped = runtime.unwrap(wrapped)
    optimizer = build_optimizer(unwrapped, cfg.optim, backbone_lr=cfg.optim.backbone_lr)
    scheduler = build_scheduler(optimizer, cfg.optim, len(data.loaders.train))
    # The average starts from the initial weights (pretrained ones included), on the device.
    ema = ModelEma(unwrapped, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    teacher_info = None
    task: Task
    if cfg.distill.teacher:
        teacher, teacher_info = load_teacher(cfg.distill, data.manifest.classes)
        task = DistillationTask(
            # same device and memory format; never DDP
            maybe_compile(runtime.prepare_module(teacher), cfg.device.compile, "the teacher"),
            cfg.distill.temperature,
            cfg.distill.alpha,
            cfg.optim.label_smoothing,
        )
    else:
        task = ClassificationTask(cfg.optim.label_smoothing)
    # Only the training forward (and its backward) is compiled; evaluation, checkpoints and
    # exports use the module itself.
    trained = maybe_compile(wrapped, cfg.device.compile, "the model")
    setup = TrainingSetup(trained, unwrapped, task, optimizer, scheduler, set_train_mode, ema)
    return RunModel(spec, setup, teacher_info)


def restore(
    cfg: TrainConfig, run: RunModel, data: RunData, checkpoint: str | Path | None
) -> LoopState:
    """The loop state to start from: a checkpoint's (weights, optimizer, schedule position,
    RNG), or a fresh one."""
    if not checkpoint:
        return LoopState()
    state = TrainState.load(checkpoint)  # on CPU; load_state_dict moves to the device
    check_compatible(state, run.spec, data.manifest.classes)
    loop = state.restore_into(
        run.setup.unwrapped,
        run.setup.optimizer,
        run.setup.scheduler,
        steps_per_epoch=len(data.loaders.train),
        epochs=cfg.optim.epochs,
        ema=run.setup.ema,
    )
    loop.resumed_metrics = state.metrics
    log.info("resumed from %s at epoch %d", state.path, loop.epoch + 1)
    return loop


def describe_run(
    cfg: TrainConfig, runtime: TorchRuntime, data: RunData, run: RunModel
) -> dict[str, Any]:
    """What "auto" resolved to, stored in run_info.json, every checkpoint and the report."""
    unwrapped = run.setup.unwrapped
    return {
        # A bucket's URI, not this node's cached copy of it: export and reruns fetch it there.
        "data_dir": cfg.data.data_dir
        if storage.is_remote(cfg.data.data_dir)
        else str(data.manifest.root),
        "image_size": data.policy.image_size,
        "preprocess": data.policy.preprocess,
        "preprocess_reason": data.policy.preprocess_reason,
        "eval_resize": data.policy.eval_resize,
        "augment": data.policy.augment,
        "stem": run.spec.stem,
        "data_backend": data.loaders.backend,
        "amp": runtime.amp_mode,
        "channels_last": runtime.channels_last,
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "runtime": runtime.name,
        "cpus_per_worker": runtime.cpus,
        "batch_size_per_worker": worker_batch_size(cfg, runtime.world_size),
        "global_batch_size": worker_batch_size(cfg, runtime.world_size) * runtime.world_size,
        "steps_per_epoch": len(data.loaders.train),
        "parameters": count_parameters(unwrapped),
        "trainable_parameters": count_parameters(unwrapped, trainable_only=True),
        "task": run.setup.task.name,
        "teacher": run.teacher_info,
        "pretrained": cfg.model.pretrained,
        "freeze": cfg.model.freeze,
        "compile": cfg.device.compile,
        "ema_decay": cfg.optim.ema_decay,
        "random_erasing": data.policy.random_erasing,
        "optimizer_impl": impl_name(run.setup.optimizer),
    }


def open_run(
    cfg: TrainConfig,
    runtime: TorchRuntime,
    run_dir: Path,
    data: RunData,
    run: RunModel,
    resolved: dict[str, Any],
    state: LoopState,
    started: float,
    extra_callbacks: list[Callback] | None,
) -> CallbackList:
    """Rank 0 writes the run's header files (config.yaml, run_info.json) and opens its
    observers (metrics.jsonl, progress, console, W&B); other ranks get no callbacks."""
    if not runtime.is_main:
        return CallbackList()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.dump_yaml(run_dir / CONFIG_FILE)
    info = {
        "resolved": resolved,
        "classes": data.manifest.classes,
        "model_spec": run.spec.to_dict(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "resnet18_dist": __version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "start_epoch": state.epoch,
    }
    atomic_write_text(run_dir / RUN_INFO_FILE, json.dumps(info, indent=1) + "\n")
    callbacks = CallbackList(
        [
            JsonlLogger(run_dir / METRICS_FILE, state.epoch, state.resumed_metrics),
            ProgressBar(cfg.optim.epochs, enabled=progress_wanted(cfg.logging.quiet)),
            ConsoleSummary(cfg.optim.epochs),
            *(extra_callbacks or []),
        ]
    )
    callbacks.on_start({"config": cfg.to_dict(), **info})
    spec = run.spec
    log.info(
        "data backend %s (requested %s), %d loader workers, image size %d, preprocess %s "
        "(%s), augment %s",
        data.loaders.backend,
        cfg.data.data_backend,
        data.loaders.workers,
        data.policy.image_size,
        data.policy.preprocess,
        data.policy.preprocess_reason,
        data.policy.augment,
    )
    log.info(
        f"training {spec.arch} ({resolved['parameters']:,} parameters, "
        f"{resolved['trainable_parameters']:,} trainable, stem {spec.stem}, "
        f"SE {spec.se_reduction or 'off'}) on {data.manifest.counts['train']} images of "
        f"{data.manifest.num_classes} classes, {data.policy.image_size}px, "
        f"{runtime.world_size} worker(s) on {runtime.device}, batch "
        f"{resolved['batch_size_per_worker']} per worker ({resolved['global_batch_size']} "
        f"global), backend {data.loaders.backend}"
        + (f", distilling from {run.teacher_info}" if run.teacher_info else "")
    )
    return callbacks


def evaluate_best(
    cfg: TrainConfig, runtime: TorchRuntime, data: RunData, run: RunModel, state: LoopState
) -> dict[str, Any]:
    """The test split, once, with the best-validation weights (never used to choose them)."""
    load_best_weights(run.setup.unwrapped, state)
    return evaluate(
        run.setup.unwrapped,
        data.loaders.test,
        runtime,
        data.manifest.num_classes,
        progress=runtime.is_main and progress_wanted(cfg.logging.quiet),
        desc="test",
    )


def publish(
    runtime: TorchRuntime,
    run_dir: Path,
    data: RunData,
    run: RunModel,
    report: dict[str, Any],
    callbacks: CallbackList,
    location: str | None = None,
) -> None:
    """Rank 0 writes model.pt (the best weights, deployable) and, last, report.json: its
    presence marks the run as finished (engine/rundir.py)."""
    if not runtime.is_main:
        return
    meta = ExportMeta.describe(
        classes=data.manifest.classes,
        image_size=data.policy.image_size,
        preprocess=data.policy.preprocess,
        eval_resize=data.policy.eval_resize,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        model_spec=run.spec.to_dict(),
        source_checkpoint=location or str(run_dir),
    )
    save_model_pt(run.setup.unwrapped, meta, run_dir / BEST_MODEL_FILE)
    report["best_model_path"] = f"{location or run_dir}/{BEST_MODEL_FILE}"
    atomic_write_text(run_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    callbacks.on_test(report)
    callbacks.on_finish()


def run_training(
    cfg: TrainConfig,
    runtime: TorchRuntime,
    sink: EpochSink,
    run_dir: Path,
    *,
    resume_from: str | Path | None = None,
    extra_callbacks: list[Callback] | None = None,
    location: str | None = None,
) -> dict[str, Any]:
    """Train, evaluate the test split with the best weights, write the run directory's files.

    Returns the test report (on every rank). ``resume_from`` is the checkpoint to start from,
    or None for epoch 1: the launcher's run plan (``engine/rundir.py``, which turned
    ``cfg.run.resume`` into it), or the checkpoint Ray Train restored after a failure.
    ``cfg.run.resume`` itself is not read here: ``--resume`` alone on an unfinished run that
    never wrote a checkpoint is planned as a restart from epoch 1. ``location``
    is where the run really lives when ``run_dir`` is a local copy of one on object storage
    (recorded in the report and the model's metadata).
    """
    started = time.time()
    run_dir = Path(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    log.info(runtime.describe())
    checkpoint = resume_from
    data = build_data(cfg, runtime)
    try:
        run = build_setup(cfg, runtime, data, resuming=bool(checkpoint))
        state = restore(cfg, run, data, checkpoint)
        resolved = describe_run(cfg, runtime, data, run)
        callbacks = open_run(
            cfg, runtime, run_dir, data, run, resolved, state, started, extra_callbacks
        )
        timings["setup_s"] = time.perf_counter() - t0
        try:
            t = time.perf_counter()
            state = fit(
                run.setup,
                data.loaders,
                runtime,
                sink,
                FitOptions(
                    epochs=cfg.optim.epochs,
                    patience=cfg.optim.patience,
                    seed=cfg.run.seed,
                    num_classes=data.manifest.num_classes,
                    log_every=cfg.logging.log_every,
                    show_progress=runtime.is_main and progress_wanted(cfg.logging.quiet),
                ),
                RunMeta(
                    model_spec=run.spec.to_dict(),
                    classes=data.manifest.classes,
                    config=cfg.to_dict(),
                    resolved=resolved,
                ),
                state,
                callbacks,
            )
            timings["fit_s"] = time.perf_counter() - t
            t = time.perf_counter()
            test = evaluate_best(cfg, runtime, data, run, state)
            timings["test_s"] = time.perf_counter() - t
        except BaseException:
            callbacks.on_finish(failed=True)  # e.g. the W&B run is marked failed, not lost
            raise
    finally:
        data.loaders.close()

    report = {
        **scalars(test, "test"),
        "test_images_per_s": test["images_per_s"],
        "test_samples": test["samples"],
        "test_per_class_acc": dict(zip(data.manifest.classes, test["per_class_acc"], strict=True)),
        "test_confusion": test["confusion"],
        "classes": data.manifest.classes,
        "best_val_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.ended_early(cfg.optim.epochs),
        "wall_time_s": time.time() - started,
        # Wall-clock bounds of this function, for launcher benchmarks that split a process's
        # time into start-up, training and teardown (benchmarks/benchmark_launchers.py).
        "started_unix": started,
        "finished_unix": time.time(),
        "timings": timings,
        "run_dir": location or str(run_dir),
        "resolved": resolved,
    }
    if isinstance(run.setup.model, Compiled):  # --compile, and whether it fell back to eager
        report["compile_fallback"] = run.setup.model.failed
    publish(runtime, run_dir, data, run, report, callbacks, location)
    return report
