"""Ray Train, worker side: what runs inside each TorchTrainer worker.

``train_worker`` runs the shared training session with ``RayTrainRuntime`` (ranks and device
from Ray Train, DDP via ``ray.train.torch.prepare_model``) and ``RayTrainReporter``
(checkpoints through ``ray.train.report``, so Ray keeps, restores and fails over with them).
The driver side is ``ray_train.py``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resnet18_dist.checkpoint_file import CHECKPOINT_FILE
from resnet18_dist.config import RunConfig, TrainConfig
from resnet18_dist.engine.reporting import checkpoint_dir_name
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.logs import setup_logging

if TYPE_CHECKING:  # the driver imports this module; the models it does not need
    from resnet18_dist.engine.checkpoint import TrainState

log = logging.getLogger(__name__)


class RayTrainRuntime(TorchRuntime):
    """Rank and device from Ray Train; its TorchTrainer already set up the process group."""

    name = "ray_train"

    def __init__(self, run: RunConfig) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        # Every worker on a node sees all of its GPUs; Ray knows which one is this worker's.
        device = ray.train.torch.get_device()
        if device.type == "cpu":
            # Ray reports "cpu:0"; tensors saved from it are tagged so and other runtimes
            # could not map them back.
            device = torch.device("cpu")
        super().__init__(
            run,
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            local_rank=ctx.get_local_rank(),
            local_world_size=ctx.get_local_world_size(),
            device=device,
            threads=run.cpus_per_worker or 1,  # what Ray reserved for this worker
        )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        model = self.prepare_module(model)  # device and channels_last before DDP sees it
        return ray.train.torch.prepare_model(model, move_to_device=False)


class RayTrainReporter:
    """Every rank calls ``ray.train.report`` (Ray requires it of all workers); rank 0 brings
    the checkpoint.

    On local or shared-disk storage rank 0 writes the checkpoint straight into the run
    directory, atomically (temp file, fsync, rename), and hands Ray that directory with
    ``NO_UPLOAD``: nothing is copied, and no half-copied file can ever be left behind. On object
    storage (``s3://``) the file is written to a temporary directory and uploaded by Ray: one
    object, which the store publishes whole.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def report(self, metrics: dict[str, Any], checkpoint: TrainState | None) -> str | None:
        import ray.train

        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))}
        if checkpoint is None:
            ray.train.report(scalars)
            return None
        name = checkpoint_dir_name(int(metrics["epoch"]))
        storage = ray.train.get_context().get_storage()
        if type(storage.storage_filesystem).__name__ == "LocalFileSystem":
            directory = Path(storage.experiment_fs_path) / name
            checkpoint.save(directory)
            ray.train.report(
                scalars,
                checkpoint=ray.train.Checkpoint(
                    str(directory), filesystem=storage.storage_filesystem
                ),
                checkpoint_dir_name=name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
            )
            return str(directory / CHECKPOINT_FILE)
        with tempfile.TemporaryDirectory(prefix="r18d-ckpt-") as tmp:
            checkpoint.save(Path(tmp))
            ray.train.report(
                scalars,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )
        return f"{storage.experiment_fs_path}/{name}/{CHECKPOINT_FILE}"


def quiet_ray_train_logs(verbose: bool) -> None:
    """Ray Train's per-report INFO line ("Reporting training result N: TrainingReport(...)")
    comes from a logger named after its file, in every worker; keep it for --verbose."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs."""
    import ray.train

    from resnet18_dist.engine.session import run_training
    from resnet18_dist.integrations.wandb import wandb_callbacks

    setup_logging()
    cfg = TrainConfig.from_dict(loop_config["config"])
    quiet_ray_train_logs(cfg.run.verbose)
    run_dir = Path(loop_config["run_dir"])
    runtime = RayTrainRuntime(cfg.run)
    callbacks = wandb_callbacks(
        cfg,
        runtime,
        run_dir,
        loop_config.get("wandb_mode", "disabled"),
        job_type=loop_config.get("wandb_job_type", "train"),
    )
    resume_from = loop_config.get("resume_from")
    restored = ray.train.get_checkpoint()  # set when Ray restores the run or restarts a group
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
            cfg,
            runtime,
            RayTrainReporter(run_dir),
            run_dir,
            resume_from=resume_from,
            extra_callbacks=callbacks,
        )
    # A last report without checkpoint so Ray Tune sees the test metrics as the final result.
    ray.train.report({k: v for k, v in report.items() if isinstance(v, (int, float))})
    return report
