"""Ray Train, driver side: the TorchTrainer of one run. The workers run
``ray_worker.train_worker``; joining or starting Ray is ``launching/ray_cluster.py``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet18_dist.config import TrainConfig


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path | str,
    use_gpu: bool,
    wandb_mode: str,
    resume_from: Path | str | None = None,
    callbacks: list[Any] | None = None,
    wandb_job_type: str = "train",
) -> Any:
    """The TorchTrainer of one run. ``callbacks`` are Ray Train callbacks for its RunConfig (a
    sweep's trial passes Tune's ``TuneReportCallback``); ``wandb_job_type`` is the W&B run's
    job type (``trial`` in a sweep)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from resnet18_dist.integrations.ray_worker import train_worker
    from resnet18_dist.run_location import RunLocation

    storage_path, name = RunLocation.at(run_dir).parent_and_name()
    resources: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker or 1}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "wandb_mode": wandb_mode,
            "resume_from": str(resume_from) if resume_from else None,
            "wandb_job_type": wandb_job_type,
        },
        scaling_config=ScalingConfig(
            num_workers=(
                (cfg.cluster.min_workers, cfg.cluster.max_workers)
                if cfg.cluster.elastic
                else cfg.cluster.max_workers
            ),
            elastic_resize_monitor_interval_s=cfg.cluster.resize_interval_s,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            # Ray's placement-group strategies; SPREAD is best effort (a one-node cluster
            # still runs), as STRICT_SPREAD would wait forever for nodes that never come.
            placement_strategy=cfg.cluster.placement.upper(),
        ),
        run_config=RunConfig(
            name=name,
            # A local/shared path, or s3:// / gs://: Ray Train writes the checkpoints there
            # through pyarrow (credentials and AWS_ENDPOINT_URL from the environment).
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            # Ray Train's own INFO lines (checkpoints registered, worker groups) for --verbose.
            logging_config=LoggingConfig(log_level="INFO" if cfg.logging.verbose else "WARNING"),
            callbacks=callbacks,
        ),
    )
