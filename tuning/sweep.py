"""The sweep's driver: plan the resources, run (or restore) the Tuner, write the trials table and
picture, export the best trial.

Layout of ``<output-dir>/<name>/``: Tune's experiment state and its own trial directories,
one run directory per trial (``trial-NNNNN``, the layout of a ``launch/train.py`` run),
``trials.csv``, ``sweep.png`` and ``best/`` (the export of the best trial by validation top-1,
with ``trial.json``: its config and sampled values).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet18_dist.cli import absolute_paths
from resnet18_dist.config import with_split_run_section
from resnet18_dist.model_meta import REPORT_JSON
from resnet18_dist.options import ConfigError, coerce, default_of, flag, read_yaml
from resnet18_dist.run_files import CONFIG_FILE, REPORT_FILE
from resnet18_dist.tuning.space import SEARCHED, SweepConfig, format_value, param_space
from resnet18_dist.tuning.trial import METRIC, TIME_ATTR, run_trial, trial_run_name

BEST_DIR = "best"
TRIALS_CSV = "trials.csv"
SWEEP_PNG = "sweep.png"
SWEEP_CONFIG = "sweep_config.yaml"


def default_sweep_name() -> str:
    return time.strftime("sweep-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class TrialPlan:
    """What one trial holds on the cluster, and how many fit at once."""

    cpus: float  # its driver's CPU + its workers'
    gpus: float
    workers: int
    cpus_per_worker: int
    fits: int  # trials at once on the live nodes
    concurrent: int  # what the sweep runs at once
    total_cpus: float
    total_gpus: float
    autoscaler: str | None = None  # "v1" / "v2" where the cluster can add nodes
    most: int | None = None  # trials at once on the largest cluster its autoscaler can make

    def describe(self) -> str:
        gpu = f" and {self.gpus:g} GPU(s)" if self.gpus else ""
        text = (
            f"Each trial needs {self.cpus:g} CPU(s){gpu}: 1 CPU for its Train driver + "
            f"{self.workers} worker(s) x {self.cpus_per_worker} CPU"
            f"{' + 1 GPU' if self.gpus else ''}. The cluster has {self.total_cpus:g} CPU(s)"
            f"{f' and {self.total_gpus:g} GPU(s)' if self.gpus else ''}"
        )
        if self.most is not None:
            return (
                f"{text} on its live nodes ({self.fits} trial(s) at once); its autoscaler "
                f"({self.autoscaler}) can add nodes for {self.most}: running {self.concurrent} "
                "at once."
            )
        if self.autoscaler:
            return (
                f"{text}: {self.fits} trial(s) fit at once on the live nodes; running "
                f"{self.concurrent} at once (autoscaler {self.autoscaler} reports no maximum: "
                "--max-concurrent runs more, for it to add nodes for)."
            )
        return f"{text}: {self.fits} trial(s) fit at once; running {self.concurrent} at once."


def plan_trials(cfg: SweepConfig, use_gpu: bool) -> TrialPlan:
    """How many trials run at once; refuses (ConfigError, exit code 2) a sweep whose single
    trial cannot be placed. On a cluster whose autoscaler can add nodes, a trial the live nodes
    cannot hold is waited for (--wait-for-resources), and the concurrency is what the largest
    cluster it can make holds (autoscaler v2's verdicts), not what is up now: a trial started
    beyond that would hold its driver's CPU while its workers wait for CPUs that never come."""
    from resnet18_dist.launching.autoscaler import autoscaler_kind, most_that_fit, wait_for_nodes
    from resnet18_dist.launching.ray_cluster import cluster_capacity

    total, _per_node, gpus = cluster_capacity()
    cpw = cfg.cluster.cpus_per_worker or 1
    need = 1 + cfg.cluster.max_workers * cpw
    need_gpus = cfg.cluster.max_workers if use_gpu else 0
    trial = [{"CPU": 1.0}] + [
        {"CPU": float(cpw), **({"GPU": 1.0} if use_gpu else {})}
    ] * cfg.cluster.max_workers

    def live_fits() -> int:
        n = int(total // need)
        return min(n, int(gpus // need_gpus)) if use_gpu and need_gpus else n

    fits = live_fits()
    # --wait-for-resources 0: the live nodes only, as on a cluster without an autoscaler.
    scaler = autoscaler_kind() if cfg.cluster.wait_for_resources > 0 else None
    if fits < 1:
        message = (
            f"one trial needs {need} CPUs (1 for its Train driver + {cfg.cluster.max_workers} "
            f"worker(s) x {cpw} CPU), but the cluster has {total:g}; lower --num-workers or "
            "--cpus-per-worker"
        )
        if scaler is None:
            raise ConfigError("--num-workers", message)
        wait_for_nodes(
            trial, "PACK", cfg.cluster.wait_for_resources, scaler, "--num-workers", message
        )
        total, _per_node, gpus = cluster_capacity()
        fits = max(1, live_fits())
    wanted = cfg.sweep.max_concurrent or cfg.sweep.num_samples
    most = None
    if scaler == "v2":
        most = max(1, most_that_fit(trial, wanted)) if wanted > fits else fits
        concurrent = min(wanted, max(most, fits))
    elif scaler == "v1":  # no verdicts: what --max-concurrent asks for, else the live nodes
        concurrent = cfg.sweep.max_concurrent or fits
    else:
        concurrent = min(cfg.sweep.max_concurrent or fits, fits)
    return TrialPlan(
        need,
        need_gpus,
        cfg.cluster.max_workers,
        cpw,
        fits,
        concurrent,
        total,
        gpus,
        autoscaler=scaler,
        most=most,
    )


# Options that say how this invocation runs, not what the sweep is: a rerun may change them.
RUN_CONTROLS = {
    ("run", "name"),
    ("run", "output_dir"),  # with --name, where the sweep is: the same directory
    ("run", "resume"),
    ("run", "fresh"),
    ("logging", "quiet"),
    ("logging", "verbose"),
    ("cluster", "address"),
    ("cluster", "wait_for_resources"),  # how long this invocation waits for an autoscaler
    ("logging", "wandb_mode"),
    ("data", "fetch_threads"),  # how a node copies a bucket's dataset, not which data
    ("sweep", "max_int8_drop"),  # the export's gate, applied when the sweep ends
    ("sweep", "latency_iters"),  # the export's measuring, too
    ("sweep", "throughput_seconds"),
    ("sweep", "publish_best"),  # where the finished sweep's best/ is published, too
}


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def check_same_sweep(cfg: SweepConfig, sweep_dir: Path) -> None:
    """Refuse (ConfigError, exit code 2) to continue the sweep in ``sweep_dir`` with other
    options than those it started with (its sweep_config.yaml): Tune would run the remaining
    trials with the new ones and rank them with the old under one "best". ``--fresh`` starts
    over, so there is nothing to compare. Tune's restore cannot add trials to a sweep either, so
    another ``--num-samples`` is refused the same way."""
    saved_file = sweep_dir / SWEEP_CONFIG
    if cfg.run.fresh or not saved_file.is_file():
        return
    try:
        # Made absolute as the command line's are (a sweep saved before that held them as
        # typed, relative to where it was started: this directory, when rerun as it was), and
        # an older file's cluster, device and logging options moved out of its `run` section.
        saved = absolute_paths(SweepConfig, with_split_run_section(read_yaml(saved_file)))
    except ConfigError as exc:
        raise ConfigError(
            "--name",
            f"{saved_file} cannot be read ({exc.message}); --fresh starts the sweep over (the "
            "old one is kept, renamed)",
        ) from exc
    now = cfg.to_dict()
    differ: list[tuple[str, str, str]] = []  # (flag, then, now)
    for section, f, ftype in SweepConfig.option_fields():
        if (section, f.name) in RUN_CONTROLS:
            continue
        where = saved.get(section) if section else saved
        if not isinstance(where, dict) or f.name not in where:
            then = default_of(f)  # an option newer than the sweep: it ran as the default
        else:
            try:
                then = coerce(where[f.name], ftype, flag(f.name), f.metadata.get("choices"))
            except ConfigError:
                then = where[f.name]
        value = now[section][f.name] if section else now[f.name]
        if then == value:
            continue
        if f.name == "manifest_sha256":  # not an option: the pinned version of --data-dir
            differ.append(("--data-dir", f"manifest sha256 {then}", f"{value} (re-uploaded)"))
        else:
            differ.append((flag(f.name), _shown(then), _shown(value)))
    if not differ:
        return
    details = "; ".join(f"{name} was {then}, now {value}" for name, then, value in differ)
    extra = ""
    if any(name == "--num-samples" for name, _, _ in differ):
        extra = " (Tune cannot add trials to a sweep it has started)"
    raise ConfigError(
        ", ".join(dict.fromkeys(name for name, _, _ in differ)),
        f"{sweep_dir} holds a sweep started with other options: {details}{extra}. Give the "
        "options it started with to continue it, --fresh to start it over (the old one is "
        "kept, renamed), or another --name for a new sweep",
    )


def check_search(cfg: SweepConfig) -> None:
    if cfg.cluster.elastic:
        # ASHA compares trials epoch by epoch; a trial that changes size mid-way is not
        # comparable, and Tune reserves each trial's resources up front anyway.
        raise ConfigError(
            "--num-workers", "a sweep's trials have a fixed size: give N, not MIN:MAX"
        )
    if cfg.sweep.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("--search", "optuna is not installed: pip install '.[optuna]'")


def asha_scheduler(epochs: int, grace_period: int, reduction_factor: int) -> Any:
    """ASHA whose rungs all lie before the last epoch.

    ASHA places rungs at grace x rf^k up to and including ``max_t``; a rung at the last epoch
    would stop a trial that has trained every epoch before its test report and model.pt. So
    ``max_t`` is the epoch before the last, and a trial that passes every rung ends by itself
    (``stop_last_trials=False``). With the grace period at the last epoch there is nothing to
    compare early, and no trial is stopped.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if grace_period >= epochs:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        max_t=epochs - 1,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        stop_last_trials=False,
    )


def _search_alg(cfg: SweepConfig, concurrent: int) -> Any:
    """Random search (seeded by --seed) or OptunaSearch, both limited to ``concurrent`` trials
    at once: a trial started beyond what the cluster holds would keep its driver's CPU while its
    workers wait for CPUs that never come."""
    if cfg.sweep.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.run.seed), max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # max_concurrent_trials in TuneConfig does not apply to this generator; its own does.
    return BasicVariantGenerator(random_state=cfg.run.seed, max_concurrent=concurrent)


def build_tuner(
    cfg: SweepConfig, sweep_dir: Path, plan: TrialPlan, use_gpu: bool, wandb_mode: str
) -> tuple[Any, bool]:
    """A new Tuner, or Tune's own restore of this sweep's directory (never another's: restore
    unpickles its state). Returns (tuner, restored)."""
    from ray import tune

    base = cfg.train_config().to_dict()
    base["logging"]["wandb_group"] = cfg.logging.wandb_group or sweep_dir.name
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=base,
            sweep_dir=str(sweep_dir),
            use_gpu=use_gpu,
            wandb_mode=wandb_mode,
        ),
        {"cpu": 1},
    )
    if tune.Tuner.can_restore(str(sweep_dir)):
        tuner = tune.Tuner.restore(
            str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner, True
    scheduler = asha_scheduler(cfg.epochs, cfg.sweep.grace_period, cfg.sweep.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            search_alg=_search_alg(cfg, plan.concurrent),
            num_samples=cfg.sweep.num_samples,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            verbose=0 if cfg.logging.quiet else 1,
        ),
    )
    return tuner, False


# ------------------------------------------------------------------------------ the results
@dataclass
class TrialRow:
    trial: str
    trial_id: str
    sampled: dict[str, Any]
    best_val_top1: float
    epochs_run: int
    stopped: bool  # stopped by ASHA (before its test report)
    status: str
    test_top1: float | None
    wall_time_s: float
    run_dir: Path
    epochs_val: list[float]


def collect_trials(grid: Any, sweep_dir: Path, epochs: int) -> list[TrialRow]:
    """One row per trial from Tune's results (not from a log)."""
    rows = []
    for result in grid:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        per_epoch = None
        if df is not None and len(df):
            per_epoch = df[df["final"].isna()] if "final" in df.columns else df
        vals: list[float] = []
        done = 0
        if per_epoch is not None and len(per_epoch) and METRIC in per_epoch.columns:
            vals = [float(v) for v in per_epoch[METRIC].tolist()]
            done = int(per_epoch[TIME_ATTR].max())
        final = bool(metrics.get("final"))
        if final:
            done = int(metrics.get("epochs_run", done))
        error = result.error is not None
        status = "error" if error else ("finished" if final else "stopped")
        rows.append(
            TrialRow(
                trial=trial_run_name(trial_id),
                trial_id=trial_id,
                sampled={k: result.config.get(k) for k in SEARCHED if k in result.config},
                best_val_top1=max(vals) if vals else float("nan"),
                epochs_run=done,
                # ASHA is what ends a trial without its test report (at a rung, the last
                # included: max_t can be a rung).
                stopped=not error and not final,
                status=status,
                test_top1=metrics.get("test_top1") if final else None,
                wall_time_s=float(metrics.get("time_total_s", float("nan"))),
                run_dir=sweep_dir / trial_run_name(trial_id),
                epochs_val=vals,
            )
        )
    return sorted(rows, key=lambda r: r.trial)


def write_trials_csv(rows: list[TrialRow], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.sampled}, key=list(SEARCHED).index)
    header = [
        "trial",
        *keys,
        "best_val_top1",
        "epochs_run",
        "stopped_by_asha",
        "status",
        "test_top1",
        "wall_time_s",
        "run_dir",
    ]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow(
                [
                    r.trial,
                    *[r.sampled.get(k, "") for k in keys],
                    f"{r.best_val_top1:.4f}",
                    r.epochs_run,
                    r.stopped,
                    r.status,
                    "" if r.test_top1 is None else f"{r.test_top1:.4f}",
                    f"{r.wall_time_s:.1f}",
                    str(r.run_dir),
                ]
            )
    tmp.replace(path)


def trials_table(rows: list[TrialRow], best: TrialRow | None) -> str:
    from resnet18_dist.compare import format_table

    keys = sorted({k for r in rows for k in r.sampled}, key=list(SEARCHED).index)
    header = ["trial", *keys, "best val top-1", "epochs", "status", "test top-1", "wall s"]
    table = []
    for r in rows:
        table.append(
            [
                r.trial + (" *" if best is not None and r.trial == best.trial else ""),
                *[format_value(k, r.sampled.get(k, "")) for k in keys],
                "-" if math.isnan(r.best_val_top1) else f"{r.best_val_top1:.4f}",
                str(r.epochs_run),
                "stopped by ASHA" if r.stopped else r.status,
                "-" if r.test_top1 is None else f"{r.test_top1:.4f}",
                f"{r.wall_time_s:.0f}",
            ]
        )
    return format_table(header, table)


SHORT = {"lr": "lr", "weight_decay": "wd", "se_reduction": "se", "temperature": "T"}


def plot_sweep(rows: list[TrialRow], path: Path) -> None:
    """Validation top-1 per epoch, one line per trial (read with compare's run reader); a trial
    ASHA stopped is dashed and ends in a cross where it was cut short."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    from resnet18_dist.atomic import atomic_write
    from resnet18_dist.compare import CompareError, load_run

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, r in enumerate(rows):
        try:
            rec = load_run(r.run_dir)
        except CompareError:
            continue
        xs = [e["epoch"] + 1 for e in rec.epochs]
        ys = [e.get("val_top1") for e in rec.epochs]
        values = " ".join(f"{SHORT[k]}={format_value(k, v)}" for k, v in r.sampled.items())
        label = f"{r.trial} {values}" + (" (stopped by ASHA)" if r.stopped else "")
        color = f"C{i % 10}"
        ax.plot(xs, ys, ls="--" if r.stopped else "-", marker="o", ms=4, color=color, label=label)
        if r.stopped and xs:
            ax.plot(xs[-1], ys[-1], marker="x", ms=12, mew=2.5, color=color)
    ax.set(title="Sweep: validation top-1 per trial", xlabel="epoch", ylabel="val top-1")
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def pick_best(rows: list[TrialRow]) -> TrialRow | None:
    """By validation top-1, never by test."""
    ok = [r for r in rows if not math.isnan(r.best_val_top1) and r.status != "error"]
    return max(ok, key=lambda r: r.best_val_top1) if ok else None


def export_best(cfg: SweepConfig, best: TrialRow, sweep_dir: Path, wandb_mode: str) -> int:
    """The best trial's best-validation weights through the export (made, shown, logged, gated:
    the export command's own way) into best/, with the trial's config and sampled values beside
    them. Returns the exit code."""
    from resnet18_dist.atomic import atomic_write_text
    from resnet18_dist.export.pipeline import ExportOptions
    from resnet18_dist.export.publish import export_and_gate

    def trial_files(out: Path) -> None:
        info = {
            "trial": best.trial,
            "trial_id": best.trial_id,
            "run_dir": str(best.run_dir),
            "sampled": best.sampled,
            "best_val_top1": best.best_val_top1,
            "epochs_run": best.epochs_run,
            "stopped_by_asha": best.stopped,
        }
        trial_report = best.run_dir / REPORT_FILE
        if trial_report.is_file():
            t = json.loads(trial_report.read_text())
            info["test"] = {
                k: v for k, v in t.items() if k.startswith("test_") and k != "test_confusion"
            }
        atomic_write_text(out / "trial.json", json.dumps(info, indent=1))
        if (best.run_dir / CONFIG_FILE).is_file():
            atomic_write_text(out / "trial_config.yaml", (best.run_dir / CONFIG_FILE).read_text())

    group = cfg.logging.wandb_group or sweep_dir.name
    opts = ExportOptions(
        checkpoint=str(best.run_dir),
        out=str(sweep_dir / BEST_DIR),
        max_int8_drop=cfg.sweep.max_int8_drop,
        latency_iters=cfg.sweep.latency_iters,
        throughput_seconds=cfg.sweep.throughput_seconds,
        wandb_mode=wandb_mode,
        wandb_project=cfg.logging.wandb_project,
        wandb_group=group,
        quiet=True,
    )
    code = export_and_gate(
        opts,
        wandb_name=f"export-{group}",
        show_report=not cfg.logging.quiet,
        verbose=cfg.logging.verbose,
        beside=trial_files,
    )
    best_dir = sweep_dir / BEST_DIR
    if cfg.sweep.publish_best and code == 0 and (best_dir / REPORT_JSON).is_file():
        # Not when the INT8 gate failed: the prefix may hold a served export (best/ is kept).
        from resnet18_dist.export.bucket import BucketExportError, upload_export

        try:
            upload_export(best_dir, cfg.sweep.publish_best)
        except BucketExportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"best trial's export published to {cfg.sweep.publish_best}", flush=True)
    return code


def finish_sweep(
    cfg: SweepConfig, grid: Any, sweep_dir: Path, wandb_mode: str, started: float
) -> int:

    rows = collect_trials(grid, sweep_dir, cfg.epochs)
    best = pick_best(rows)
    write_trials_csv(rows, sweep_dir / TRIALS_CSV)
    plot_sweep(rows, sweep_dir / SWEEP_PNG)
    print(trials_table(rows, best), flush=True)
    stopped = sum(r.stopped for r in rows)
    print(
        f"{len(rows)} trial(s), {stopped} stopped early by ASHA, "
        f"{sum(r.status == 'error' for r in rows)} failed; sweep wall time "
        f"{time.time() - started:.0f} s",
        flush=True,
    )
    print(f"trials: {sweep_dir / TRIALS_CSV}\npicture: {sweep_dir / SWEEP_PNG}", flush=True)
    if best is None:
        print("error: no trial reported a validation top-1; nothing to export", file=sys.stderr)
        return 1
    print(
        f"best trial (by validation top-1): {best.trial} "
        f"val top-1 {best.best_val_top1:.4f}"
        + ("" if best.test_top1 is None else f", test top-1 {best.test_top1:.4f}"),
        flush=True,
    )
    try:
        return export_best(cfg, best, sweep_dir, wandb_mode)
    except ConfigError as exc:  # best/ exists and is not an earlier export (check_output_dir)
        print(f"error: exporting the best trial failed: {exc}", file=sys.stderr)
        return 1
