"""One Tune trial: a Ray Train driver that fits the same TorchTrainer as ``launch/train.py``.

Ray Train V2's pattern: the Tune trial function builds and fits a ``TorchTrainer``; rank 0's
reports reach Tune through ``TuneReportCallback`` in the Train run config. Each trial's Train run
has a stable name (``trial-NNNNN`` from the trial's index) under the sweep's directory, so a
restored trial finds its run directory and continues from its newest checkpoint, and each trial
directory is a run directory like ``launch/train.py``'s (``launch/compare.py`` and ``--resume``
work on it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resnet18_dist.atomic import atomic_write_text
from resnet18_dist.engine.rundir import REPORT_FILE, finished_epochs, plan_run

# ASHA's time attribute: epochs finished by this trial's run, counted from 1 by our own
# reports (Tune's training_iteration restarts when a restored trial reruns its function).
TIME_ATTR = "epochs_done"
METRIC = "val_top1"


def trial_run_name(trial_id: str) -> str:
    """``trial-00003`` for Tune's trial id ``ab12c_00003`` (the index is stable on restore)."""
    return "trial-" + trial_id.rsplit("_", 1)[-1]


def tune_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A Train report as Tune sees it: per-epoch reports gain ``epochs_done``; the final report
    (the test figures) gains ``val_top1`` = the best validation top-1, which Tune requires of
    every result."""
    out = dict(metrics)
    if "epoch" in out:
        out[TIME_ATTR] = int(out["epoch"]) + 1
    else:
        out.setdefault(METRIC, out.get("best_val_top1", 0.0))
        out[TIME_ATTR] = int(out.get("epochs_run", 0))
        out["final"] = True
    return out


def epoch_report_callback() -> Any:
    """A ``TuneReportCallback`` that adds our epoch count (built inside the trial)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            first = tune_metrics(metrics[0]) if metrics else {}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReportCallback()


def run_trial(
    sampled: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep_dir: str,
    use_gpu: bool,
    wandb_mode: str,
) -> None:
    """The Tune trainable: ``sampled`` is Tune's config (the searched values)."""
    import ray.tune

    from resnet18_dist.integrations.ray_train import build_trainer
    from resnet18_dist.tuning.space import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, sampled)
    cfg.run.name = trial_run_name(trial_id)
    cfg.run.output_dir = sweep_dir
    cfg.run.resume = None
    cfg.run.fresh = False
    run_dir = Path(sweep_dir) / cfg.run.name
    record = Path(sweep_dir) / "trial_configs" / f"{cfg.run.name}.json"
    if record.is_file() and json.loads(record.read_text()).get("trial_id") != trial_id:
        # Left by an earlier attempt whose Tune state was never saved: not this trial's run.
        cfg.run.fresh = True
    record.parent.mkdir(exist_ok=True)
    # Atomic: a driver killed mid-write must not leave a record that no later attempt can read.
    atomic_write_text(record, json.dumps({"trial_id": trial_id, "sampled": sampled}, indent=1))
    if not cfg.run.fresh and finished_epochs(run_dir) is not None:
        # Finished, but the driver was lost before Tune recorded it: report what it wrote.
        report = json.loads((run_dir / REPORT_FILE).read_text())
        scalars = {k: v for k, v in report.items() if isinstance(v, (int, float))}
        ray.tune.report(tune_metrics(scalars))
        return
    plan = plan_run(cfg.run, cfg.optim.epochs)
    trainer = build_trainer(
        cfg,
        plan.run_dir,
        use_gpu,
        wandb_mode,
        plan.resume_from,
        callbacks=[epoch_report_callback()],
        wandb_job_type="trial",
    )
    trainer.fit()
