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


class WandbCallback(Callback):
    """One W&B run per training run: config, per-step and per-epoch metrics, the test report.

    ``group`` / ``job_type`` / ``tags`` are what W&B's comparison views group by; a sweep passes
    its name as the group so each trial is one run of that group.
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
        for prefix in ("train_*", "val_*", "lr", "peak_memory_mb", "best_val_top1"):
            self.run.define_metric(prefix, step_metric="epoch")
        log.info("W&B %s run %s in %s", self.mode, self.run.id, self.run_dir / "wandb")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log({f"step/{k}": v for k, v in metrics.items()} | {"global_step": step})

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                | {"epoch": epoch + 1}
            )

    def on_test(self, report: dict[str, Any]) -> None:
        if self.run is None:
            return
        for k, v in report.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.run.summary[k] = v

    def on_finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
