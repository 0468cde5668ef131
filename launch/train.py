"""Train ResNet18 with Ray Train (PyTorch DDP); with no options, on the built-in digits.

    python launch/train.py                                   # local Ray, digits, 1 worker
    python launch/train.py --num-workers 2 --epochs 20
    python launch/train.py --config my.yaml --lr 0.05        # flags override the YAML
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/train.py --num-workers 8 --data-dir /shared/data/mydata

Joins the cluster in RAY_ADDRESS / --address, or a running local one, else starts Ray in this
process. Writes config.yaml, run_info.json, metrics.jsonl, checkpoints and report.json to
--output-dir/--name, and prints the test-split report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Runnable from a fresh clone or a `ray job submit --working-dir .` upload without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.cli import build_parser, config_from_args
from resnet18_dist.config import ConfigError

# Heavier imports (torch, Ray) wait until the options are parsed, so a typo fails fast.


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0], prog="launch/train.py")
    cfg = config_from_args(parser, argv)

    from resnet18_dist.data.digits import ensure_digits_dataset
    from resnet18_dist.data.loaders import resolve_backend
    from resnet18_dist.data.manifest import DatasetError, Manifest
    from resnet18_dist.engine.checkpoint import latest_checkpoint_in
    from resnet18_dist.engine.session import REPORT_FILE, default_run_name, format_report
    from resnet18_dist.integrations import wandb as wandb_adapter
    from resnet18_dist.integrations.ray_train import (
        build_trainer,
        check_resources,
        start_ray,
    )
    from resnet18_dist.logs import setup_logging

    setup_logging()

    # Everything that can be checked before a worker starts is checked here (exit code 2).
    wandb_mode = wandb_adapter.resolve_mode(cfg.run.wandb_mode)
    if wandb_mode != "disabled" and not wandb_adapter.wandb_importable():
        if cfg.run.wandb_mode != "auto":
            parser.error(f"--wandb-mode {cfg.run.wandb_mode}: wandb is not installed")
        print("warning: wandb is not installed; W&B logging disabled", file=sys.stderr)
        wandb_mode = "disabled"
    try:
        import torch

        # The driver may have no GPU while the workers do; only DALI's presence is checked here.
        if cfg.data.data_backend == "dali":
            resolve_backend("dali", torch.device("cuda"))
        data_dir = Path(cfg.data.data_dir) if cfg.data.data_dir else ensure_digits_dataset()
        Manifest.load(data_dir)
    except (ConfigError, DatasetError) as exc:
        parser.error(str(exc))

    start_ray(cfg.run.address)
    try:
        use_gpu = check_resources(cfg.run)
    except ConfigError as exc:
        parser.error(str(exc))
    cfg.run.name = cfg.run.name or default_run_name()
    run_dir = Path(cfg.run.output_dir).resolve() / cfg.run.name
    print(
        f"Ray Train: {cfg.run.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}, "
        f"run directory {run_dir}",
        flush=True,
    )

    from ray.train import TrainingFailedError

    trainer = build_trainer(cfg, run_dir, use_gpu, wandb_mode)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        latest = latest_checkpoint_in(run_dir) if run_dir.is_dir() else None
        if latest is not None:
            print(
                f"The newest complete checkpoint is {latest}; continue with --resume {run_dir}",
                file=sys.stderr,
            )
        return 1
    report = result.return_value
    if report is None:  # e.g. a Ray version that does not return the worker's value
        report = json.loads((run_dir / REPORT_FILE).read_text())
    print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
