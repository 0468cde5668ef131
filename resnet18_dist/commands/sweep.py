"""Sweep the training recipe with Ray Tune and ASHA; export the best trial.

    python launch/sweep.py --num-samples 8 --max-epochs 10       # digits, local Ray
    python launch/sweep.py --lr-range 0.01,0.5 --se-choices 0,16 --search optuna
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/sweep.py --num-workers 2 --output-dir /shared/sweeps --name s1

Searches the peak learning rate (log-uniform), weight decay (log-uniform), SE reduction (a
choice) and, with --teacher, the distillation temperature (uniform); every other training option
is fixed for all trials. ASHA stops hopeless trials by validation top-1 per epoch. Writes
--output-dir/--name/: one run directory per trial, trials.csv, sweep.png and best/ (the best
trial by validation top-1, exported). The same command again continues an interrupted sweep
(finished trials are not rerun).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.options import ConfigError
from resnet18_dist.tuning.space import SweepConfig


def main(argv: list[str] | None = None, prog: str = "resnet18-dist sweep") -> int:
    parser = build_parser(SweepConfig, __doc__, prog=prog)
    cfg = parse_options(SweepConfig, parser, argv)

    from resnet18_dist.config import RESUME_THIS_RUN
    from resnet18_dist.launching.preflight import preflight
    from resnet18_dist.launching.ray_cluster import check_resources, require_train_v2, start_ray
    from resnet18_dist.logs import setup_logging
    from resnet18_dist.run_location import RunLocation, unique_name
    from resnet18_dist.tuning.sweep import (
        SWEEP_CONFIG,
        build_tuner,
        check_same_sweep,
        check_search,
        default_sweep_name,
        finish_sweep,
        plan_trials,
    )

    setup_logging()
    started = time.time()
    # Everything that can be checked before Ray starts is checked here (a ConfigError: exit
    # code 2, commands.run). The preflight refuses a bucket as --output-dir: Tune's trials
    # write their run directories through our local file layout.
    check_search(cfg)
    checked = preflight(cfg.train_config(), "sweep")
    wandb_mode = checked.wandb_mode
    require_train_v2()
    # Every trial copies the dataset version pinned here, and the sweep gets its name (a
    # timestamp; a second sweep in the same second gets a suffix).
    name = cfg.run.name
    if not name:
        base = default_sweep_name()
        name = unique_name(RunLocation.of(cfg.run.output_dir, base), base)
    cfg = replace(
        cfg,
        data=replace(cfg.data, manifest_sha256=checked.config.data.manifest_sha256),
        run=replace(cfg.run, name=name),
    )
    sweep = RunLocation.of(cfg.run.output_dir, cfg.run.name)
    sweep_dir = Path(sweep.path)
    if cfg.run.resume not in (None, RESUME_THIS_RUN):
        raise ConfigError("--resume", "a sweep resumes itself: give --resume alone (or nothing)")
    if cfg.run.resume == RESUME_THIS_RUN and not (sweep_dir / SWEEP_CONFIG).is_file():
        raise ConfigError("--resume", f"{sweep_dir} holds no sweep to resume")
    check_same_sweep(cfg, sweep_dir)  # a rerun continues the sweep it started, unchanged
    if cfg.sweep.publish_best:  # a missing bucket or a prefix holding other objects: now
        from resnet18_dist.export.bucket import check_remote_out

        check_remote_out(cfg.sweep.publish_best, option="--publish-best")
    start_ray(
        cfg.cluster.address, cfg.logging.verbose
    )  # with the dashboard: Train V2 needs its API
    use_gpu = check_resources(cfg.cluster, cfg.device, trial_waits=True)
    plan = plan_trials(cfg, use_gpu)
    # Only once the cluster can run it: --fresh moves the old sweep aside.
    if cfg.run.fresh and sweep.exists():
        print(f"--fresh: the previous sweep is kept in {sweep.move_aside().path}", flush=True)
    print(plan.describe(), flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not (sweep_dir / SWEEP_CONFIG).is_file():
        cfg.dump_yaml(sweep_dir / SWEEP_CONFIG)
    tuner, restored = build_tuner(cfg, sweep_dir, plan, use_gpu, wandb_mode)
    print(
        f"{'continuing' if restored else 'new'} sweep {sweep_dir}: {cfg.sweep.num_samples} "
        f"trial(s) of up to {cfg.epochs} epoch(s), {cfg.sweep.search} search, ASHA on "
        f"validation top-1",
        flush=True,
    )
    grid = tuner.fit()
    import ray

    ray.shutdown()  # the export below runs in this process; Ray's CPUs are free again
    if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < cfg.sweep.num_samples:
        # Tune returns normally on Ctrl-C: a partial sweep is neither summarised nor exported.
        print(
            f"error: the sweep was interrupted ({grid.num_terminated} of "
            f"{cfg.sweep.num_samples} trial(s) done); run the same command again to continue it",
            file=sys.stderr,
        )
        return 1
    return finish_sweep(cfg, grid, sweep_dir, wandb_mode, started)


if __name__ == "__main__":
    sys.exit(main())
