"""What the training launchers share before any worker starts: checks that exit with code 2,
and the run-name rule applied and announced."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnet18_dist import storage
from resnet18_dist.config import TrainConfig
from resnet18_dist.engine.rundir import RunPlan, default_run_name, plan_run
from resnet18_dist.options import ConfigError


def check_data(cfg: TrainConfig, gpu_workers_possible: bool) -> None:
    """The dataset is prepared and readable, and DALI is present if asked for (ConfigError)."""
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
            data, _ = read_remote_manifest(cfg.data.data_dir)
            cfg.data.manifest_sha256 = manifest_sha256(data)
        else:
            Manifest.load(dataset_dir(cfg.data.data_dir))
    except DatasetError as exc:
        raise ConfigError("--data-dir", str(exc)) from exc


def plan_or_exit(
    parser: argparse.ArgumentParser, cfg: TrainConfig, dry_run: bool = False
) -> RunPlan:
    """Name the run, apply the run-name rule (exit code 2 to refuse), print what it decided;
    ``dry_run`` only checks it (nothing moved, nothing printed)."""
    try:
        return _plan(parser, cfg, dry_run)
    except storage.StorageError as exc:  # a bucket that is not there, no credentials, ...
        parser.error(f"--output-dir: {exc}")


def _plan(parser: argparse.ArgumentParser, cfg: TrainConfig, dry_run: bool) -> RunPlan:
    if not cfg.run.name:
        # A timestamp; a second run started in the same second gets a suffix, not a resume.
        base, n = default_run_name(), 1
        cfg.run.name = base
        while _run_exists(cfg.run.output_dir, cfg.run.name):
            n += 1
            cfg.run.name = f"{base}-{n}"
    try:
        plan = plan_run(cfg.run, cfg.optim.epochs, dry_run=dry_run)
    except ConfigError as exc:
        parser.error(str(exc))
    if plan.describe() and not dry_run:
        print(plan.describe(), flush=True)
    return plan


def _run_exists(output_dir: str, name: str) -> bool:
    if storage.is_remote(output_dir):
        return bool(storage.list_files(storage.join(output_dir, name)))
    return (Path(output_dir) / name).exists()


def refuse_remote_output(output_dir: str, launcher: str) -> None:
    """Object storage is written through Ray Train's storage layer; other launchers need a
    local or shared file system."""
    if storage.is_remote(output_dir):
        raise ConfigError(
            "--output-dir",
            f"{output_dir}: object storage is supported by launch/train.py (Ray Train); "
            f"{launcher} needs a local or shared path",
        )
