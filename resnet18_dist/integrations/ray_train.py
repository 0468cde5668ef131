"""Ray Train adapter: a TorchTrainer whose workers run the shared training session.

Driver side: ``start_ray`` / ``check_resources`` / ``build_trainer``. Worker side:
``RayTrainRuntime`` (device from ``ray.train.torch.get_device()``, DDP via
``ray.train.torch.prepare_model``) and ``RayTrainReporter`` (checkpoints through
``ray.train.report``, so Ray keeps, restores and fails over with them).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet18_dist.config import ConfigError, RunConfig, TrainConfig
from resnet18_dist.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint
from resnet18_dist.engine.reporting import checkpoint_dir_name
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.logs import setup_logging

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ worker side
class RayTrainRuntime(TorchRuntime):
    """Rank and device from Ray Train; its TorchTrainer already set up the process group."""

    name = "ray_train"

    def __init__(self, run: RunConfig) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        # Every worker on a node sees all of its GPUs; Ray knows which one is this worker's.
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            # Ray reports "cpu:0"; tensors saved from it are tagged so and other runtimes
            # could not map them back.
            self.device = torch.device("cpu")
        self._configure(run)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        model = self.prepare_module(model)  # device and channels_last before DDP sees it
        return ray.train.torch.prepare_model(model, move_to_device=False)


class RayTrainReporter:
    """Rank 0 saves the checkpoint into a temporary directory that ``ray.train.report`` persists
    into the run's storage; every rank calls report (Ray requires it of all workers)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> str | None:
        import ray.train

        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        if checkpoint is None:
            ray.train.report(scalars)
            return None
        name = checkpoint_dir_name(int(metrics["epoch"]))
        with tempfile.TemporaryDirectory(prefix="r18d-ckpt-") as tmp:
            save_checkpoint(checkpoint, Path(tmp))
            ray.train.report(
                scalars,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        return str(self.run_dir / name / CHECKPOINT_FILE)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs."""
    import ray.train

    from resnet18_dist.engine.session import run_training
    from resnet18_dist.integrations.wandb import WandbCallback, run_tags

    setup_logging()
    cfg = TrainConfig.from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    runtime = RayTrainRuntime(cfg.run)
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    log.info(
        f"DDP worker rank {runtime.rank}/{runtime.world_size} (local rank {runtime.local_rank}) "
        f"on {runtime.device}, process group {backend}, host {os.uname().nodename}"
    )
    callbacks = []
    if runtime.is_main and loop_config.get("wandb_mode", "disabled") != "disabled":
        callbacks.append(
            WandbCallback(
                mode=loop_config["wandb_mode"],
                project=cfg.run.wandb_project,
                run_dir=run_dir,
                name=run_dir.name,
                group=cfg.run.wandb_group or None,
                tags=run_tags(cfg, "ray_train", runtime.world_size),
            )
        )

    restored = ray.train.get_checkpoint()  # set when Ray restarts the group after a failure
    if restored is not None:
        with restored.as_directory() as d:
            log.info("Ray Train restored checkpoint %s", d)
            report = run_training(
                cfg,
                runtime,
                RayTrainReporter(run_dir),
                run_dir,
                resume_from=Path(d) / CHECKPOINT_FILE,
                extra_callbacks=callbacks,
            )
    else:
        report = run_training(
            cfg, runtime, RayTrainReporter(run_dir), run_dir, extra_callbacks=callbacks
        )
    # A last report without checkpoint so Ray Tune sees the test metrics as the final result.
    ray.train.report({k: v for k, v in report.items() if isinstance(v, (int, float))})
    return report


# ------------------------------------------------------------------------------ driver side
def start_ray(address: str | None) -> None:
    """Join RAY_ADDRESS / --address / a running local cluster, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        log_to_driver=True,
        # Workers import this package from the driver's checkout even when it is not installed
        # (a fresh clone, or a `ray job submit --working-dir` upload that already sets this).
        runtime_env=None if os.environ.get("RAY_JOB_ID") else _local_runtime_env(),
    )


def _local_runtime_env() -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": pythonpath}}


def cluster_capacity() -> tuple[float, float, float]:
    """(total CPUs, the most CPUs on one node, total GPUs) of the live nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    gpus = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    return sum(cpus), max(cpus, default=0.0), gpus


def resolve_use_gpu(run: RunConfig, gpus: float) -> bool:
    if run.use_gpu == "on":
        return True
    if run.use_gpu == "off":
        return False
    return gpus > 0


def check_resources(run: RunConfig) -> bool:
    """Refuse, naming the option, a request the cluster cannot place; returns use_gpu.

    A Ray autoscaler could add nodes, but this project's clusters do not autoscale yet
    (a later issue), so the live nodes are the capacity.
    """
    total, per_node, gpus = cluster_capacity()
    use_gpu = resolve_use_gpu(run, gpus)
    if run.cpus_per_worker > per_node:
        raise ConfigError(
            "--cpus-per-worker",
            f"{run.cpus_per_worker} CPUs per worker, but no node of the cluster has more than "
            f"{per_node:g}",
        )
    need = run.num_workers * run.cpus_per_worker
    if need > total:
        raise ConfigError(
            "--num-workers",
            f"{run.num_workers} workers x {run.cpus_per_worker} CPU(s) = {need} CPUs, but the "
            f"cluster has {total:g}; lower --num-workers or --cpus-per-worker",
        )
    if use_gpu and run.num_workers > gpus:
        raise ConfigError(
            "--num-workers",
            f"{run.num_workers} GPU workers, but the cluster has {gpus:g} GPU(s)"
            + ("" if run.use_gpu == "on" else "; pass --use-gpu off to train on CPUs"),
        )
    return use_gpu


def build_trainer(cfg: TrainConfig, run_dir: Path, use_gpu: bool, wandb_mode: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "wandb_mode": wandb_mode,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
    )
