"""What the training launchers share before any worker starts: checks that exit with code 2,
and the run-name rule applied and announced."""

from __future__ import annotations

from resnet18_dist import storage
from resnet18_dist.config import RESUME_THIS_RUN, TrainConfig
from resnet18_dist.engine.rundir import RunPlan, default_run_name, plan_run
from resnet18_dist.options import ConfigError
from resnet18_dist.run_location import RunLocation, unique_name


def check_data(cfg: TrainConfig, gpu_workers_possible: bool, world_size: int | None = None) -> None:
    """The dataset is prepared and readable, holds a full training batch for each of
    ``world_size`` workers (default: --num-workers' MAX), and DALI is present if asked for
    (ConfigError)."""
    # Light imports only: a Ray launcher starts Ray before torch has loaded.
    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.data.manifest import DatasetError, Manifest

    # The driver may have no GPU while the workers do; only DALI's presence is checked here.
    if cfg.data.data_backend == "dali":
        import torch

        from resnet18_dist.data.loaders import resolve_backend  # torchvision: only if needed

        device = torch.device("cuda" if gpu_workers_possible else "cpu")
        resolve_backend("dali", device)
    try:
        if storage.is_remote(cfg.data.data_dir):
            from resnet18_dist.data.remote import manifest_sha256, read_remote_manifest

            # Only the manifest: each node's workers copy the shards into their own cache, of
            # this version (pinned here, so a re-upload mid-run cannot split the nodes).
            data, manifest = read_remote_manifest(cfg.data.data_dir)
            cfg.data.manifest_sha256 = manifest_sha256(data)
        else:
            manifest = Manifest.load(dataset_dir(cfg.data.data_dir))
    except DatasetError as exc:
        raise ConfigError("--data-dir", str(exc)) from exc
    # The workers would find this too, but only after Ray and torch have started, as a
    # traceback per worker. An elastic run's global batch is --batch-size x MAX at any size.
    world = world_size or cfg.run.max_workers
    train = manifest.counts.get("train", 0)
    if train // world < cfg.data.batch_size:
        raise ConfigError(
            "--batch-size",
            f"{cfg.data.data_dir or 'the digits'} has {train} training images: "
            f"{train // world} per worker over {world} worker(s), fewer than --batch-size "
            f"{cfg.data.batch_size}; lower --batch-size or --num-workers",
        )


def plan_and_announce(cfg: TrainConfig, dry_run: bool = False) -> RunPlan:
    """Name the run, apply the run-name rule (a ConfigError refuses it), print what it decided;
    ``dry_run`` only checks it (nothing moved, nothing printed)."""
    try:
        if not cfg.run.name:
            # A timestamp; a second run started in the same second gets a suffix, not a resume.
            base = default_run_name()
            cfg.run.name = unique_name(RunLocation.of(cfg.run.output_dir, base), base)
        plan = plan_run(cfg.run, cfg.optim.epochs, dry_run=dry_run)
    except storage.StorageError as exc:  # a bucket that is not there, no credentials, ...
        raise ConfigError("--output-dir", str(exc)) from exc
    if plan.describe() and not dry_run:
        print(plan.describe(), flush=True)
    if not dry_run and cfg.run.resume not in (None, RESUME_THIS_RUN):
        # --fresh may have moved the typed --resume PATH aside with the run: the workers (which
        # validate the options again) and config.yaml get the checkpoint the plan resolved.
        cfg.run.resume = None if plan.resume_from is None else str(plan.resume_from)
    return plan


def refuse_remote_output(output_dir: str, launcher: str) -> None:
    """Object storage is written through Ray Train's storage layer; other launchers need a
    local or shared file system."""
    if storage.is_remote(output_dir):
        raise ConfigError(
            "--output-dir",
            f"{output_dir}: object storage is supported by launch/train.py (Ray Train); "
            f"{launcher} needs a local or shared path",
        )
