"""Ray Train, worker side: what runs inside each TorchTrainer worker.

``train_worker`` runs the shared training session with ``RayTrainRuntime`` (ranks and device
from Ray Train, DDP via ``ray.train.torch.prepare_model``) and ``RayTrainEpochSink``
(checkpoints through ``ray.train.report``, so Ray keeps, restores and fails over with them).
The driver side is ``ray_train.py``.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from resnet18_dist import storage
from resnet18_dist.cache import cache_root
from resnet18_dist.checkpoint_file import CHECKPOINT_FILE, checkpoint_dir_name, checkpoint_epoch
from resnet18_dist.config import TrainConfig
from resnet18_dist.engine.callbacks import Callback
from resnet18_dist.engine.rundir import (
    BEST_MODEL_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    REPORT_FILE,
    RUN_INFO_FILE,
)
from resnet18_dist.engine.runtime import TorchRuntime
from resnet18_dist.logs import setup_logging

if TYPE_CHECKING:  # the driver imports this module; the models it does not need
    from resnet18_dist.engine.checkpoint import TrainState

log = logging.getLogger(__name__)


class RayTrainRuntime(TorchRuntime):
    """Rank and device from Ray Train; its TorchTrainer already set up the process group."""

    name = "ray_train"

    def __init__(self, cfg: TrainConfig) -> None:
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
            cfg.device,
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            local_rank=ctx.get_local_rank(),
            local_world_size=ctx.get_local_world_size(),
            device=device,
            threads=cfg.cluster.cpus_per_worker or 1,  # what Ray reserved for this worker
        )

    def describe(self) -> str:
        # Nodes on one machine share a host name: the Ray node id tells them apart (and is
        # what `ray list nodes` / the dashboard show).
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
        return f"{super().describe()}, Ray node {node} ({ray.util.get_node_ip_address()})"

    def wrap_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        model = self.prepare_module(model)  # device and channels_last before DDP sees it
        return ray.train.torch.prepare_model(model, move_to_device=False)


class RayTrainEpochSink:
    """Every rank calls ``ray.train.report`` (Ray requires it of all workers); rank 0 brings
    the checkpoint.

    On local or shared-disk storage rank 0 writes the checkpoint straight into the run
    directory, atomically (temp file, fsync, rename), and hands Ray that directory with
    ``NO_UPLOAD``: nothing is copied, and no half-copied file can ever be left behind. On object
    storage (``s3://``) the file is written to a temporary directory and uploaded by Ray: one
    object, which the store publishes whole.
    """

    def __init__(self, run_dir: Path, location: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.location = location  # the run's s3:// / gs:// URI, when it lives there

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
        if self.location:
            return f"{self.location}/{name}/{CHECKPOINT_FILE}"
        return f"{storage.experiment_fs_path}/{name}/{CHECKPOINT_FILE}"


class RemoteRunMirror(Callback):
    """Rank 0 of a run on object storage writes its run files (config.yaml, run_info.json,
    metrics.jsonl, model.pt, report.json) to a local directory, as for any run, and this
    uploads them: the header and metrics at the start and after every epoch, the model and,
    last, report.json (a finished run's mark) after the test. Each upload is one object, seen
    whole or not at all. The checkpoints themselves go through Ray Train's own upload."""

    def __init__(self, local: Path, remote: str) -> None:
        self.local = Path(local)
        self.remote = remote

    def pull(self) -> None:
        """Make the local run files what the bucket holds, before the run opens them. A
        resumed run continues the metrics of the attempts before it; a new one (a first start,
        ``--fresh``, a start from another run's checkpoint) finds none there and starts an
        empty log. The local directory outlives its run (one per run URI and node): lines an
        earlier run of this name left in it would otherwise be kept by the resume logic and
        uploaded as this run's own. The other run files are rewritten by this run before they
        are uploaded; stale copies are removed all the same (offline W&B runs stay)."""
        source = storage.join(self.remote, METRICS_FILE)
        if storage.exists(source):
            storage.download(source, self.local / METRICS_FILE)
        else:
            (self.local / METRICS_FILE).unlink(missing_ok=True)
        for name in (CONFIG_FILE, RUN_INFO_FILE, BEST_MODEL_FILE, REPORT_FILE):
            (self.local / name).unlink(missing_ok=True)

    def _push(self, *names: str) -> None:
        for name in names:
            if (self.local / name).is_file():
                storage.upload_file(self.local / name, storage.join(self.remote, name))

    def on_start(self, info: dict[str, Any]) -> None:
        self._push(CONFIG_FILE, RUN_INFO_FILE, METRICS_FILE)

    def on_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        self._push(METRICS_FILE)

    def on_test(self, report: dict[str, Any]) -> None:
        self._push(METRICS_FILE, BEST_MODEL_FILE, REPORT_FILE)


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
    quiet_ray_train_logs(cfg.logging.verbose)
    location = loop_config["run_dir"]
    runtime = RayTrainRuntime(cfg)
    mirror = None
    if storage.is_remote(location):
        # Rank 0 writes the run's files locally, named as the run (W&B takes its name from it),
        # and mirrors them to the bucket; checkpoints go through Ray's storage.
        # One directory per run and node (not per attempt): a restarted group reuses it, and
        # offline W&B runs stay there for `wandb sync`.
        key = hashlib.sha256(location.encode()).hexdigest()[:12]
        run_dir = cache_root() / "remote-runs" / key / storage.split(location)[1]
        run_dir.mkdir(parents=True, exist_ok=True)
        mirror = RemoteRunMirror(run_dir, location)
        if runtime.is_main:
            mirror.pull()
    else:
        run_dir, location = Path(location), None
    callbacks = wandb_callbacks(
        cfg,
        runtime,
        run_dir,
        loop_config.get("wandb_mode", "disabled"),
        job_type=loop_config.get("wandb_job_type", "train"),
        location=location,
    ) + ([mirror] if mirror else [])
    resume_from = loop_config.get("resume_from")
    restored = ray.train.get_checkpoint()  # set when Ray restores the run or restarts a group
    sink = RayTrainEpochSink(run_dir, location)
    if (
        restored is not None
        and resume_from is not None
        and checkpoint_epoch(Path(str(resume_from)).parent) > checkpoint_epoch(Path(restored.path))
    ):
        # A driver killed between a checkpoint's write and Ray's (asynchronous) record of it:
        # Ray's snapshot names the one before; the launcher's plan found the newer file.
        log.info("resuming from %s, newer than Ray's record %s", resume_from, restored.path)
        restored = None
    if restored is not None:
        with restored.as_directory() as d:
            log.info("Ray Train restored checkpoint %s", restored.path)
            report = run_training(
                cfg,
                runtime,
                sink,
                run_dir,
                resume_from=Path(d) / CHECKPOINT_FILE,
                extra_callbacks=callbacks,
                location=location,
            )
    else:
        report = run_training(
            cfg,
            runtime,
            sink,
            run_dir,
            resume_from=resume_from,
            extra_callbacks=callbacks,
            location=location,
        )
    # A last report without checkpoint so Ray Tune sees the test metrics as the final result.
    ray.train.report({k: v for k, v in report.items() if isinstance(v, (int, float))})
    return report
