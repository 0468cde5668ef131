"""Weights & Biases logging from rank 0, as a loop callback (wandb is imported lazily).

Mode ``auto`` logs online when an API key is configured and offline otherwise, so nothing ever
needs an account or the network; ``wandb sync <run_dir>/wandb/offline-run-*`` uploads later.
W&B's own console output is silenced but for ``--verbose``; a run prints one line instead.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path, PurePosixPath
from typing import Any

from resnet18_dist import storage
from resnet18_dist.engine.callbacks import Callback
from resnet18_dist.engine.rundir import BEST_MODEL_FILE

log = logging.getLogger(__name__)

# The W&B run id of a training run, in its run directory: a resumed run, or one Ray Train
# restarts after a failure, continues the same W&B run.
WANDB_ID_FILE = "wandb_id"


def wandb_settings(verbose: bool) -> Any:
    """W&B's own console output (its header, the run history and summary: about 40 lines a run)
    only with --verbose; otherwise silent, its warnings going to its debug log."""
    import wandb

    return wandb.Settings(silent=not verbose)


def source_model_artifact(checkpoint: str) -> str | None:
    """The W&B model artifact a training run logs (``model-<run name>:best``) for one of its
    checkpoint files (``<run>/checkpoint_epochNNNN/checkpoint.pt``, local or on a bucket)."""
    parent = PurePosixPath(str(checkpoint)).parent
    if not parent.name.startswith("checkpoint_") or not parent.parent.name:
        return None
    return f"model-{parent.parent.name}:best"


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
    cfg: Any,
    runtime: Any,
    run_dir: Path,
    mode: str,
    job_type: str = "train",
    location: str | None = None,
) -> list[Callback]:
    """The W&B observer of a training run, on rank 0 only (every launcher builds it here).
    ``location``: where the run lives when ``run_dir`` is this node's copy of one on object
    storage (its W&B run id is kept there too, for a restart on another node)."""
    if not runtime.is_main or mode == "disabled" or not wandb_importable():
        return []
    return [
        WandbCallback(
            mode=mode,
            project=cfg.logging.wandb_project,
            run_dir=run_dir,
            name=run_dir.name,
            group=cfg.logging.wandb_group or None,
            job_type=job_type,
            tags=run_tags(cfg, runtime.name, runtime.world_size),
            verbose=cfg.logging.verbose,
            location=location,
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
    The W&B run id is kept in the run directory (``wandb_id``): a resumed or restarted run
    continues its W&B run.
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
        verbose: bool = False,
        location: str | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.project = project
        self.run_dir = Path(run_dir)
        self.name = name
        self.group = group or None
        self.job_type = job_type
        self.tags = tags or []
        self.verbose = verbose
        self.location = location
        self.run: Any = None
        self.where = ""  # the one line printed at the end (unless --verbose)

    def _stored_id(self) -> str | None:
        if self.location:
            # A run on object storage: the bucket's copy, which a restart on another node finds
            # too; this node's directory outlives its run and may hold an older run's id.
            try:
                remote = storage.join(self.location, WANDB_ID_FILE)
                if storage.exists(remote):
                    return storage.read_bytes(remote).decode().strip() or None
            except storage.StorageError as exc:
                log.warning("cannot read the W&B run id from %s: %s", self.location, exc)
            return None
        local = self.run_dir / WANDB_ID_FILE
        return (local.read_text().strip() or None) if local.is_file() else None

    def _store_id(self, run_id: str) -> None:
        from resnet18_dist.atomic import atomic_write_text

        atomic_write_text(self.run_dir / WANDB_ID_FILE, run_id + "\n")
        if self.location:
            try:
                storage.write_bytes(storage.join(self.location, WANDB_ID_FILE), run_id.encode())
            except storage.StorageError as exc:
                log.warning("cannot keep the W&B run id in %s: %s", self.location, exc)

    def on_start(self, info: dict[str, Any]) -> None:
        if self.mode == "disabled":
            return
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        stored = self._stored_id()
        self.run = wandb.init(
            project=self.project,
            name=self.name,
            group=self.group,
            job_type=self.job_type,
            tags=self.tags,
            dir=str(self.run_dir),
            mode=self.mode,
            id=stored,
            resume="allow",  # the stored id's run continues; a new id starts one
            reinit="create_new",  # a Tune worker process may host several trials in turn
            settings=wandb_settings(self.verbose),
        )
        # A resumed run's config may differ (a larger --epochs, --resume itself): the new one.
        self.run.config.update(
            {**info["config"], "resolved": info["resolved"], "classes": info["classes"]},
            allow_val_change=True,
        )
        if stored != self.run.id:
            self._store_id(self.run.id)
        self.run.define_metric("epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        for pattern in ("train_*", "val_*", "lr", "peak_memory_mb", "best_val_top1", "system/*"):
            self.run.define_metric(pattern, step_metric="epoch")
        if self.mode == "offline":
            # Each process of the run writes its own offline-run-*-<id> directory; `wandb sync`
            # uploads them in order, as one run.
            pattern = self.run_dir / "wandb" / f"offline-run-*-{self.run.id}"
            self.where = (
                f"W&B offline run {self.run.id} in {self.run.settings.sync_dir}; upload it "
                f"with: wandb sync {pattern}"
            )
        else:
            self.where = f"W&B run {self.run.id}: {self.run.url}"
        log.debug("W&B %s run %s in %s", self.mode, self.run.id, self.run_dir / "wandb")

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
        # A run on object storage wrote model.pt here first and mirrored it to the bucket: the
        # artifact is uploaded from this copy, and names where the run keeps it.
        local = (
            self.run_dir / BEST_MODEL_FILE
            if storage.is_remote(model_file)
            else Path(model_file or self.run_dir / BEST_MODEL_FILE)
        )
        if local.is_file():
            artifact = wandb.Artifact(
                f"model-{self.name}",
                type="model",
                metadata={
                    "best_epoch": report["best_epoch"] + 1,
                    "best_val_top1": report["best_val_top1"],
                    "test_top1": report["test_top1"],
                    "location": model_file or str(local),
                },
            )
            artifact.add_file(str(local), name=BEST_MODEL_FILE)
            self.run.log_artifact(artifact, aliases=["best"])
        else:
            log.warning("W&B: no %s to log as the model artifact", local)

    def on_finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
            if not self.verbose:
                print(self.where, flush=True)


def log_export(
    report: dict[str, Any],
    out_dir: Path,
    *,
    mode: str,
    project: str,
    name: str,
    group: str | None = None,
    verbose: bool = False,
) -> str | None:
    """One W&B run (job_type "export"): the artifact table, the checks, the ONNX files; online,
    it uses the training run's model artifact, so W&B shows where the export came from."""
    mode = resolve_mode(mode)
    if mode == "disabled" or not wandb_importable():
        return None
    import wandb

    source = source_model_artifact(report["checkpoint"])
    run = wandb.init(
        project=project,
        name=name,
        group=group or None,
        job_type="export",
        tags=["export"],
        dir=str(out_dir),
        mode=mode,
        config={
            **{
                k: report[k]
                for k in ("checkpoint", "image_size", "threads", "calibration_method", "machine")
            },
            "source_model_artifact": source,
        },
        reinit="create_new",
        settings=wandb_settings(verbose),
    )
    if source and mode == "online":  # W&B refuses use_artifact offline
        try:
            run.use_artifact(source)
        except (wandb.errors.Error, ValueError) as exc:  # trained without W&B, another project
            log.warning("W&B: the training run's model artifact %s is not there: %s", source, exc)
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
