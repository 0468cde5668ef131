"""One training run, from config to test report; every launcher calls ``run_training``.

setup (data, model, optimizer, resume) -> ``loop.fit`` -> test split with the best weights ->
``report.json``. The launcher supplies the runtime (process / Ray Train / accelerate), the
reporter (run directory / Ray Train) and any extra rank-0 callbacks (W&B).
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch

from resnet18_dist import __version__
from resnet18_dist.atomic import atomic_write_text
from resnet18_dist.config import TrainConfig
from resnet18_dist.data.digits import ensure_digits_dataset
from resnet18_dist.data.loaders import build_loaders
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD, resolve_policy
from resnet18_dist.engine.callbacks import (
    Callback,
    CallbackList,
    ConsoleSummary,
    JsonlLogger,
    ProgressBar,
)
from resnet18_dist.engine.checkpoint import check_compatible, load_checkpoint
from resnet18_dist.engine.loop import LoopState, evaluate, fit, load_best_weights
from resnet18_dist.engine.optim import build_optimizer, build_scheduler
from resnet18_dist.engine.reporting import Reporter
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.engine.tasks import ClassificationTask, DistillationTask
from resnet18_dist.export.artifact import save_model_pt
from resnet18_dist.export.meta import ExportMeta
from resnet18_dist.metrics import scalars
from resnet18_dist.models import ModelSpec, build_model, count_parameters, resolve_stem
from resnet18_dist.models.finetune import apply_freeze, load_pretrained
from resnet18_dist.models.teacher import load_teacher
from resnet18_dist.seeding import seed_everything, set_rng_state

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
BEST_MODEL_FILE = "model.pt"


def resolve_data_dir(cfg: TrainConfig) -> Path:
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir)
    return ensure_digits_dataset()


def run_training(
    cfg: TrainConfig,
    runtime: TorchRuntime,
    reporter: Reporter,
    run_dir: Path,
    *,
    resume_from: str | Path | None = None,
    extra_callbacks: list[Callback] | None = None,
) -> dict[str, Any]:
    """Train, evaluate the test split with the best weights, write the run directory's files.

    Returns the test report (on every rank). ``resume_from`` overrides ``cfg.run.resume`` (Ray
    Train passes the checkpoint it restored after a failure).
    """
    started = time.time()
    run_dir = Path(run_dir)
    seed_everything(cfg.run.seed)  # identical initial weights on every rank

    manifest = Manifest.load(resolve_data_dir(cfg))
    policy = resolve_policy(cfg.data, manifest)
    spec = ModelSpec(
        arch=cfg.model.arch,
        num_classes=manifest.num_classes,
        se_reduction=cfg.model.se_reduction,
        stem=resolve_stem(cfg.model.stem, policy.image_size),
        dropout=cfg.model.dropout,
    )
    loaders = build_loaders(
        cfg.data,
        manifest,
        policy,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=cfg.run.seed,
        device=runtime.device,
        channels_last=runtime.channels_last,
        cpus_per_worker=cfg.run.cpus_per_worker,
    )
    try:
        model = build_model(spec)
        resume = resume_from or cfg.run.resume
        if cfg.model.pretrained and not resume:  # a resumed run has its own weights
            load_pretrained(model, cfg.model.pretrained)
        set_train_mode = apply_freeze(model, cfg.model.freeze)
        model = runtime.wrap_model(model)
        unwrapped = runtime.unwrap(model)
        optimizer = build_optimizer(unwrapped, cfg.optim, backbone_lr=cfg.optim.backbone_lr)
        scheduler = build_scheduler(optimizer, cfg.optim, len(loaders.train))
        teacher_info = None
        task: ClassificationTask | DistillationTask
        if cfg.distill.teacher:
            teacher, teacher_info = load_teacher(cfg.distill, manifest.classes)
            task = DistillationTask(
                runtime.prepare_module(teacher),  # same device and memory format; never DDP
                cfg.distill.temperature,
                cfg.distill.alpha,
                cfg.optim.label_smoothing,
            )
        else:
            task = ClassificationTask(cfg.optim.label_smoothing)

        state = LoopState()
        if resume:
            ckpt = load_checkpoint(resume)  # on CPU; load_state_dict moves to the device
            check_compatible(ckpt, spec, manifest.classes)
            unwrapped.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            # The schedule's shape comes from this run's config (so --epochs may be raised on
            # resume, re-planning the cosine over the new total); its position from the
            # checkpoint.
            n_groups = len(optimizer.param_groups)
            scheduler.load_state_dict({**ckpt["scheduler"], "lr_lambdas": [None] * n_groups})
            state = LoopState.from_checkpoint(ckpt)
            set_rng_state(ckpt["rng"])
            log.info("resumed from %s at epoch %d", ckpt["_path"], state.epoch)
            del ckpt

        resolved = {
            "data_dir": str(manifest.root),
            "image_size": policy.image_size,
            "augment": policy.augment,
            "stem": spec.stem,
            "data_backend": loaders.backend,
            "amp": "bf16" if runtime.amp else "off",
            "channels_last": runtime.channels_last,
            "device": str(runtime.device),
            "world_size": runtime.world_size,
            "runtime": runtime.name,
            "global_batch_size": cfg.data.batch_size * runtime.world_size,
            "steps_per_epoch": len(loaders.train),
            "parameters": count_parameters(unwrapped),
            "trainable_parameters": count_parameters(unwrapped, trainable_only=True),
            "task": task.name,
            "teacher": teacher_info,
            "pretrained": cfg.model.pretrained,
            "freeze": cfg.model.freeze,
        }
        callbacks = CallbackList()
        if runtime.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.dump_yaml(run_dir / CONFIG_FILE)
            info = {
                "resolved": resolved,
                "classes": manifest.classes,
                "model_spec": spec.to_dict(),
                "host": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "resnet18_dist": __version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            }
            atomic_write_text(run_dir / RUN_INFO_FILE, json.dumps(info, indent=1) + "\n")
            callbacks = CallbackList(
                [
                    JsonlLogger(run_dir / METRICS_FILE),
                    ProgressBar(cfg.optim.epochs, enabled=not cfg.run.quiet),
                    ConsoleSummary(cfg.optim.epochs),
                    *(extra_callbacks or []),
                ]
            )
            callbacks.on_start({"config": cfg.to_dict(), **info})
            log.info(
                f"training {spec.arch} ({resolved['parameters']:,} parameters, "
                f"{resolved['trainable_parameters']:,} trainable, stem {spec.stem}, "
                f"SE {spec.se_reduction or 'off'}) on {manifest.counts['train']} images of "
                f"{manifest.num_classes} classes, {policy.image_size}px, {runtime.world_size} "
                f"worker(s) on {runtime.device}, backend {loaders.backend}"
                + (f", distilling from {teacher_info}" if teacher_info else "")
            )

        try:
            state = fit(
                model,
                task,
                loaders,
                optimizer,
                scheduler,
                runtime,
                reporter,
                epochs=cfg.optim.epochs,
                patience=cfg.optim.patience,
                seed=cfg.run.seed,
                num_classes=manifest.num_classes,
                checkpoint_extra={
                    "format_version": 1,
                    "model_spec": spec.to_dict(),
                    "classes": manifest.classes,
                    "config": cfg.to_dict(),
                    "resolved": resolved,
                },
                state=state,
                callbacks=callbacks,
                log_every=cfg.run.log_every,
                set_train_mode=set_train_mode,
                show_progress=runtime.is_main and not cfg.run.quiet,
            )
            load_best_weights(unwrapped, state)
            test = evaluate(
                unwrapped,
                loaders.test,
                runtime,
                manifest.num_classes,
                progress=runtime.is_main and not cfg.run.quiet,
                desc="test",
            )
        except BaseException:
            callbacks.on_finish(failed=True)  # e.g. the W&B run is marked failed, not lost
            raise
    finally:
        loaders.close()

    report = {
        **scalars(test, "test"),
        "test_images_per_s": test["images_per_s"],
        "test_samples": test["samples"],
        "test_per_class_acc": dict(zip(manifest.classes, test["per_class_acc"], strict=True)),
        "test_confusion": test["confusion"],
        "classes": manifest.classes,
        "best_val_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "wall_time_s": time.time() - started,
        "run_dir": str(run_dir),
        "resolved": resolved,
    }
    if runtime.is_main:
        # The best-validation weights, deployable without the training state (export format).
        meta = ExportMeta(
            classes=manifest.classes,
            image_size=policy.image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            model_spec=spec.to_dict(),
            source_checkpoint=str(run_dir),
        )
        save_model_pt(unwrapped, meta, run_dir / BEST_MODEL_FILE)
        report["best_model_path"] = str(run_dir / BEST_MODEL_FILE)
        atomic_write_text(run_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
        callbacks.on_test(report)
        callbacks.on_finish()
    return report


def default_run_name() -> str:
    return time.strftime("train-%Y%m%d-%H%M%S")


def format_report(report: dict[str, Any]) -> str:
    """The test-split report as printed at the end of a run."""
    lines = [
        f"test report ({report['test_samples']} images, best epoch {report['best_epoch'] + 1} "
        f"of {report['epochs_run']}{', stopped early' if report['stopped_early'] else ''}):",
        f"  top-1 {report['test_top1']:.4f}   top-5 {report['test_top5']:.4f}   "
        f"macro-F1 {report['test_f1_macro']:.4f}   loss {report['test_loss']:.4f}",
        "  per-class accuracy: "
        + "  ".join(f"{c}={a:.3f}" for c, a in report["test_per_class_acc"].items()),
        f"  eval {report['test_images_per_s']:.0f} images/s; "
        f"wall time {report['wall_time_s']:.1f}s",
        f"  run directory: {report['run_dir']}",
    ]
    return "\n".join(lines)
