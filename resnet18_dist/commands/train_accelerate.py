"""Train without Ray: the same loop, options and outputs, under Hugging Face accelerate.

    accelerate launch --multi_gpu --num_processes 4 launch/train_accelerate.py --epochs 30
    torchrun --nproc_per_node 2 launch/train_accelerate.py        # 2 CPU processes (DDP, gloo)
    python launch/train_accelerate.py                             # one process

Options are those of launch/train.py; the process count comes from the launcher, so the
Ray-only options (--num-workers, --address, --max-failures) are ignored. Checkpoints are the same
as under Ray Train: `--resume` takes a run directory from either launcher.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.config import TrainConfig
from resnet18_dist.options import ConfigError

# How long rank 0 of a refused run waits for the launcher to stop it (see `exit_refused`).
REFUSAL_LINGER_S = 10.0


def on_stop_exit_with(code: int) -> None:
    """Exit with ``code`` when the launcher stops this process (SIGTERM): torchrun stops every
    other rank as soon as one exits, and a refused run's ranks are all leaving with ``code``."""

    def handler(signum: int, frame: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    signal.signal(signal.SIGTERM, handler)


def exit_refused(code: int, rank: int, world_size: int) -> NoReturn:
    """Every rank leaves a refused run with the refusal's exit code (2), none killed by the
    launcher in between. Rank 0, which printed why, leaves last: it waits until the launcher
    stops it (after another rank's exit), or for REFUSAL_LINGER_S under a launcher that does
    not stop ranks. torchrun / `accelerate launch` still exit 1 themselves for any failed rank;
    their failure report shows each rank's code."""
    on_stop_exit_with(code)
    if rank == 0 and world_size > 1:
        time.sleep(REFUSAL_LINGER_S)
    # Not sys.exit: the interpreter's teardown destroys the gloo process group while its
    # threads still run, and about one rank in three then aborted ("terminate called without
    # an active exception", exit code -6) instead of exiting with ``code``. Nothing of the
    # run exists yet that a normal exit would have to close.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def refuse_everywhere(parser: argparse.ArgumentParser, exc: ConfigError) -> NoReturn:
    """A refusal every rank reaches by itself (the same check on each): rank 0 prints it."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    on_stop_exit_with(2)
    if rank == 0:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr, flush=True)
    exit_refused(2, rank, world_size)


def main(argv: list[str] | None = None, prog: str = "launch/train_accelerate.py") -> int:
    parser = build_parser(TrainConfig, __doc__, prog=prog)
    cfg = parse_options(TrainConfig, parser, argv)

    from accelerate.utils import broadcast_object_list

    from resnet18_dist.engine.epoch_sink import LocalEpochSink
    from resnet18_dist.engine.session import run_training
    from resnet18_dist.engine.summary import format_test_report
    from resnet18_dist.integrations import wandb as wandb_adapter
    from resnet18_dist.integrations.accelerate import AcceleratorRuntime, build_accelerator
    from resnet18_dist.launching.preflight import preflight
    from resnet18_dist.logs import setup_logging

    setup_logging()
    try:  # the same on every rank (an --amp this device cannot do)
        accelerator = build_accelerator(cfg.device)
        runtime = AcceleratorRuntime(cfg.device, accelerator, threads=cfg.cluster.cpus_per_worker)
    except ConfigError as exc:
        refuse_everywhere(parser, exc)
    # Rank 0 checks the options and applies the run-name rule (it may move a directory aside);
    # every rank then trains with the launch it decided (the same run directory, checkpoint and
    # dataset version), or leaves with rank 0's refusal: its exit code instead of the launch.
    decision: list = [None]
    if runtime.is_main:
        try:
            try:
                launch = preflight(
                    cfg,
                    "accelerate",
                    gpu_workers_possible=runtime.device.type == "cuda",
                    world_size=runtime.world_size,
                ).planned(use_gpu=runtime.device.type == "cuda")
            except ConfigError as exc:
                parser.error(str(exc))
        except SystemExit as refused:  # parser.error has printed why; every rank exits so
            code = refused.code if isinstance(refused.code, int) else 2
            on_stop_exit_with(code)
            decision = [code]
        else:
            decision = [launch]
            print(
                f"accelerate: {runtime.world_size} process(es), {accelerator.distributed_type}, "
                f"device {runtime.device}, mixed precision {accelerator.mixed_precision}, "
                f"run directory {launch.plan.run_dir}",
                flush=True,
            )
    broadcast_object_list(decision, from_process=0)
    if isinstance(decision[0], int):
        exit_refused(decision[0], runtime.rank, runtime.world_size)
    launch = decision[0]
    run_dir = Path(launch.plan.run_dir)
    try:
        report = run_training(
            launch.config,
            runtime,
            LocalEpochSink(run_dir, keep=cfg.run.keep_checkpoints, is_main=runtime.is_main),
            run_dir,
            resume_from=launch.plan.resume_from,
            extra_callbacks=wandb_adapter.wandb_callbacks(
                launch.config, runtime, run_dir, launch.wandb_mode
            ),
        )
    finally:  # a DatasetError or CheckpointError: one line and exit code 1 (commands.run)
        runtime.shutdown()
    if runtime.is_main:
        print(format_test_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
