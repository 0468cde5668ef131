"""Weights & Biases logging from rank 0, as a loop callback (wandb is imported lazily).

Mode ``auto`` logs online when an API key is configured and offline otherwise, so nothing ever
needs an account or the network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from resnet18_dist.engine.callbacks import Callback

log = logging.getLogger(__name__)


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | disabled. An explicit WANDB_MODE in the environment wins over auto."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    return "online" if api_key_configured() else "offline"


def wandb_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def launcher_mode(requested: str) -> str:
    """The mode a launcher uses: ``requested`` resolved, and disabled (with a warning) when
    wandb is not installed and the mode was auto; an explicit mode without wandb is an error."""
    mode = resolve_mode(requested)
    if mode != "disabled" and not wandb_importable():
        if requested != "auto":
            from resnet18_dist.options import ConfigError

            raise ConfigError("--wandb-mode", f"{requested}: wandb is not installed")
        log.warning("wandb is not installed; W&B logging disabled")
        return "disabled"
    return mode


def wandb_callbacks(
    cfg: Any, runtime: Any, run_dir: Path, mode: str, job_type: str = "train"
) -> list[Callback]:
    """The W&B observer of a training run, on rank 0 only (every launcher builds it here)."""
    if not runtime.is_main or mode == "disabled" or not wandb_importable():
        return []
    return [
        WandbCallback(
            mode=mode,
            project=cfg.run.wandb_project,
            run_dir=run_dir,
            name=run_dir.name,
            group=cfg.run.wandb_group or None,
            job_type=job_type,
            tags=run_tags(cfg, runtime.name, runtime.world_size),
        )
    ]


def run_tags(cfg: Any, runtime: str, world_size: int) -> list[str]:
    """Tags that W&B's comparison views can filter and group by."""
    tags = [runtime, f"workers{world_size}", cfg.model.arch, f"se{cfg.model.se_reduction}"]
    if cfg.distill.teacher:
        tags.append("distilled")
    if cfg.model.pretrained:
        tags.append("pretrained")
    if cfg.model.freeze != "none":
        tags.append(f"freeze-{cfg.model.freeze}")
    return tags


class WandbCallback(Callback):
    """One W&B run per training run, on rank 0.

    Logs the config, per-step loss / lr / throughput (every --log-every steps), per-epoch train
    and validation metrics with peak memory, the test report as W&B tables and the best model
    as an artifact. ``group`` / ``job_type`` / ``tags`` are what W&B's comparison views group
    by; a sweep passes its name as the group so that each trial is one run of that group.
    """

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        run_dir: Path,
        name: str,
        group: str | None = None,
        job_type: str = "train",
        tags: list[str] | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.project = project
        self.run_dir = Path(run_dir)
        self.name = name
        self.group = group or None
        self.job_type = job_type
        self.tags = tags or []
        self.run: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        if self.mode == "disabled":
            return
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            name=self.name,
            group=self.group,
            job_type=self.job_type,
            tags=self.tags,
            dir=str(self.run_dir),
            mode=self.mode,
            config={**info["config"], "resolved": info["resolved"], "classes": info["classes"]},
            reinit="create_new",  # a Tune worker process may host several trials in turn
        )
        self.run.define_metric("epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        for pattern in ("train_*", "val_*", "lr", "peak_memory_mb", "best_val_top1", "system/*"):
            self.run.define_metric(pattern, step_metric="epoch")
        log.info("W&B %s run %s in %s", self.mode, self.run.id, self.run_dir / "wandb")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({f"step/{k}": v for k, v in metrics.items()} | {"global_step": step})

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.run is None:
            return
        scalars = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        system = {"system/peak_memory_mb": metrics["peak_memory_mb"]}
        # Epochs are counted from 1 in W&B, as in the console log and the test report.
        epochs = {"epoch": epoch + 1, "best_epoch": metrics["best_epoch"] + 1}
        self.run.log(scalars | system | epochs)

    def on_test(self, report: dict[str, Any]) -> None:
        if self.run is None:
            return
        import wandb

        for k, v in report.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.run.summary[k] = v + 1 if k == "best_epoch" else v
        classes = report["classes"]
        per_class = wandb.Table(columns=["class", "test_accuracy"])
        for c in classes:
            per_class.add_data(c, report["test_per_class_acc"][c])
        confusion = wandb.Table(columns=["true \\ predicted", *classes])
        for c, row in zip(classes, report["test_confusion"], strict=True):
            confusion.add_data(c, *row)
        scalars = [k for k in ("test_top1", "test_top5", "test_f1_macro", "test_loss")]
        summary = wandb.Table(columns=scalars, data=[[report[k] for k in scalars]])
        self.run.log(
            {"test/report": summary, "test/per_class": per_class, "test/confusion": confusion}
        )
        model_file = report.get("best_model_path")
        if model_file and Path(model_file).is_file():
            artifact = wandb.Artifact(
                f"model-{self.name}",
                type="model",
                metadata={
                    "best_epoch": report["best_epoch"] + 1,
                    "best_val_top1": report["best_val_top1"],
                    "test_top1": report["test_top1"],
                },
            )
            artifact.add_file(model_file)
            self.run.log_artifact(artifact, aliases=["best"])

    def on_finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def log_export(
    report: dict[str, Any],
    out_dir: Path,
    *,
    mode: str,
    project: str,
    name: str,
    group: str | None = None,
) -> str | None:
    """One W&B run (job_type "export"): the artifact table, the checks, the ONNX files."""
    mode = resolve_mode(mode)
    if mode == "disabled" or not wandb_importable():
        return None
    import wandb

    run = wandb.init(
        project=project,
        name=name,
        group=group or None,
        job_type="export",
        tags=["export"],
        dir=str(out_dir),
        mode=mode,
        config={
            k: report[k]
            for k in ("checkpoint", "image_size", "threads", "calibration_method", "machine")
        },
        reinit="create_new",
    )
    columns = [
        "artifact",
        "file",
        "size_bytes",
        "top1",
        "top5",
        "f1_macro",
        "top1_agreement_vs_fp32",
        "latency_p50_ms",
        "latency_p95_ms",
        "throughput_images_per_s",
        "peak_rss_mb",
    ]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in report["rows"]])
    run.log({"export/report": table})
    for k, v in report["checks"].items():
        run.summary[f"checks/{k}"] = v
    for file in ("model.onnx", "model.int8.onnx"):
        artifact = wandb.Artifact(
            f"{name}-{file.replace('.', '-')}", type="model", metadata={"checks": report["checks"]}
        )
        artifact.add_file(str(Path(out_dir) / file))
        run.log_artifact(artifact)
    run_id = run.id
    run.finish()
    return run_id
