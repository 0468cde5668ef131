"""Train without Ray: the same loop, options and outputs, under Hugging Face accelerate.

    accelerate launch --multi_gpu --num_processes 4 launch/train_accelerate.py --epochs 30
    torchrun --nproc_per_node 2 launch/train_accelerate.py        # 2 CPU processes (DDP, gloo)
    python launch/train_accelerate.py                             # one process

Options are those of launch/train.py; the process count comes from the launcher, so the
Ray-only options (--num-workers, --address, --max-failures) are ignored. Checkpoints are the same
as under Ray Train: `--resume` takes a run directory from either launcher.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.cli import build_parser, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0], prog="launch/train_accelerate.py")
    cfg = config_from_args(parser, argv)

    from accelerate.utils import broadcast_object_list

    from resnet18_dist.data.manifest import DatasetError
    from resnet18_dist.engine.checkpoint import CheckpointError
    from resnet18_dist.engine.reporting import LocalReporter
    from resnet18_dist.engine.session import default_run_name, format_report, run_training
    from resnet18_dist.integrations import wandb as wandb_adapter
    from resnet18_dist.integrations.accelerate import AcceleratorRuntime, build_accelerator
    from resnet18_dist.logs import setup_logging

    setup_logging()
    accelerator = build_accelerator(cfg.run)
    runtime = AcceleratorRuntime(cfg.run, accelerator)
    # Every rank must write into the same run directory: rank 0 picks the name.
    name = [cfg.run.name or default_run_name()]
    broadcast_object_list(name, from_process=0)
    cfg.run.name = name[0]
    run_dir = Path(cfg.run.output_dir).resolve() / cfg.run.name
    if runtime.is_main:
        print(
            f"accelerate: {runtime.world_size} process(es), {accelerator.distributed_type}, "
            f"device {runtime.device}, mixed precision {accelerator.mixed_precision}, "
            f"run directory {run_dir}",
            flush=True,
        )
    import logging

    logging.getLogger("resnet18_dist").info(
        f"DDP worker rank {runtime.rank}/{runtime.world_size} (local rank {runtime.local_rank}) "
        f"on {runtime.device} (accelerate)"
    )

    callbacks = []
    mode = wandb_adapter.resolve_mode(cfg.run.wandb_mode)
    if runtime.is_main and mode != "disabled" and wandb_adapter.wandb_importable():
        callbacks.append(
            wandb_adapter.WandbCallback(
                mode=mode,
                project=cfg.run.wandb_project,
                run_dir=run_dir,
                name=run_dir.name,
                group=cfg.run.wandb_group or None,
                tags=wandb_adapter.run_tags(cfg, "accelerate", runtime.world_size),
            )
        )
    try:
        report = run_training(
            cfg,
            runtime,
            LocalReporter(run_dir, keep=cfg.run.keep_checkpoints, is_main=runtime.is_main),
            run_dir,
            extra_callbacks=callbacks,
        )
    except (DatasetError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        runtime.shutdown()
    if runtime.is_main:
        print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
