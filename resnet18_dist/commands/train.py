"""Train ResNet18 with Ray Train (PyTorch DDP); with no options, on the built-in digits.

    python launch/train.py                                   # local Ray, digits, 1 worker
    python launch/train.py --num-workers 2 --epochs 20
    python launch/train.py --config my.yaml --lr 0.05        # flags override the YAML
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/train.py --num-workers 8 --data-dir /shared/data/mydata

Joins the cluster in RAY_ADDRESS / --address, or a running local one, else starts Ray in this
process. Writes config.yaml, run_info.json, metrics.jsonl, checkpoints and report.json to
--output-dir/--name, and prints the test-split report. The same --name again resumes an
unfinished run, refuses a finished one (see --resume and --fresh).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import PurePosixPath

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.config import TrainConfig
from resnet18_dist.run_files import REPORT_FILE

# Heavier imports (torch, Ray) wait until the options are parsed, so a typo fails fast.


def _import_trainer() -> None:
    import ray.train.torch  # noqa: F401  (imports torch)


def main(argv: list[str] | None = None, prog: str = "launch/train.py") -> int:
    parser = build_parser(TrainConfig, __doc__, prog=prog)
    cfg = parse_options(TrainConfig, parser, argv)

    from resnet18_dist.engine.summary import format_test_report
    from resnet18_dist.integrations.ray_train import build_trainer
    from resnet18_dist.launching.preflight import preflight
    from resnet18_dist.launching.ray_cluster import check_resources, require_train_v2, start_ray
    from resnet18_dist.logs import setup_logging

    setup_logging()
    # Everything that can be checked before a worker starts is checked here (a ConfigError:
    # exit code 2, commands.run); the run-name rule is only checked: --fresh moves later.
    require_train_v2()
    checked = preflight(cfg, "ray")

    # A private local Ray's processes start while this one loads torch and the TorchTrainer
    # (about two seconds of imports that would otherwise come before or after). When joining a
    # cluster, torch is imported first: in a `ray job submit --working-dir` driver, importing
    # torch after (or while) ray.init() connects aborted the process with "Intel oneMKL FATAL
    # ERROR: Cannot load libtorch_cpu.so" (Ray 2.60, torch 2.14.1; tests/test_multinode.py).
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        _import_trainer()
        start_ray(cfg.cluster.address, cfg.logging.verbose)
    else:
        preload = threading.Thread(target=_import_trainer, name="preload", daemon=True)
        preload.start()
        start_ray(cfg.cluster.address, cfg.logging.verbose)
        preload.join()
    # The cluster can run it: now apply the run-name rule.
    launch = checked.planned(use_gpu=check_resources(cfg.cluster, cfg.device))
    plan = launch.plan
    cluster = cfg.cluster
    print(
        f"Ray Train: {cluster.num_workers} worker(s){' (elastic)' if cluster.elastic else ''}, "
        f"{'GPU' if launch.use_gpu else 'CPU'}, "
        f"placement {cluster.placement}, run directory {plan.run_dir}",
        flush=True,
    )

    from ray.train import TrainingFailedError

    from resnet18_dist.engine.rundir import (
        newest_checkpoint,
        prune_untracked_checkpoints,
        read_run_file,
    )

    trainer = build_trainer(
        launch.config, plan.run_dir, launch.use_gpu, launch.wandb_mode, plan.resume_from
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        try:
            latest = newest_checkpoint(plan.run_dir)
        except OSError:  # the bucket cannot be listed now: the error above is what matters
            latest = None
        if latest is not None:
            print(
                f"The newest complete checkpoint is {latest}. Run the same command again to "
                f"resume from it, or continue with --resume {plan.run_dir}",
                file=sys.stderr,
            )
        return 1
    # Ray keeps the newest --keep-checkpoints it registered; one written but never registered
    # (a driver killed in between, then resumed) is removed here.
    tracked = {PurePosixPath(c.path).name for c, _ in result.best_checkpoints}
    for name in prune_untracked_checkpoints(plan.run_dir, tracked):
        print(f"removed {name}: a checkpoint Ray Train did not register (--keep-checkpoints)")
    report = result.return_value
    if report is None:  # the worker's return value did not come back: read what it wrote
        report = json.loads(read_run_file(plan.run_dir, REPORT_FILE))
    print(format_test_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
