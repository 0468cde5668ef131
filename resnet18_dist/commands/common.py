"""What the training launchers share before any worker starts: checks that exit with code 2,
and the run-name rule applied and announced."""

from __future__ import annotations

import argparse
from pathlib import Path

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
        Manifest.load(dataset_dir(cfg.data.data_dir))
    except DatasetError as exc:
        raise ConfigError("--data-dir", str(exc)) from exc


def plan_or_exit(
    parser: argparse.ArgumentParser, cfg: TrainConfig, dry_run: bool = False
) -> RunPlan:
    """Name the run, apply the run-name rule (exit code 2 to refuse), print what it decided;
    ``dry_run`` only checks it (nothing moved, nothing printed)."""
    if not cfg.run.name:
        # A timestamp; a second run started in the same second gets a suffix, not a resume.
        name = default_run_name()
        taken = Path(cfg.run.output_dir) / name
        n = 1
        while taken.exists():
            n += 1
            taken = Path(cfg.run.output_dir) / f"{name}-{n}"
        cfg.run.name = taken.name
    try:
        plan = plan_run(cfg.run, cfg.optim.epochs, dry_run=dry_run)
    except ConfigError as exc:
        parser.error(str(exc))
    if plan.describe() and not dry_run:
        print(plan.describe(), flush=True)
    return plan
