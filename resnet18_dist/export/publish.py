"""An export as a command finishes it: made, shown, logged to W&B, then held to the INT8 gate.
`resnet18-dist export` and a sweep's best trial (tuning/sweep.py) both end this way, so its
error handling, its messages and its exit code are written once, here."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet18_dist.atomic import WriteError
from resnet18_dist.checkpoint_file import CheckpointError
from resnet18_dist.data.manifest import DatasetError
from resnet18_dist.export.pipeline import ExportError, ExportOptions, export_artifacts
from resnet18_dist.export.report import render_markdown
from resnet18_dist.integrations.wandb import log_export


def gate_message(report: dict[str, Any], out: Path) -> str | None:
    """The one line that fails an export whose INT8 model loses too much; None when it passes."""
    checks = report["checks"]
    if checks["int8_ok"]:
        return None
    return (
        f"error: INT8 loses {checks['int8_top1_drop']:.2f} points of test top-1 against FP32, "
        f"more than --max-int8-drop {checks['max_int8_drop']:g} (the artifacts are in {out}; "
        "see Checks above)"
    )


def export_and_gate(
    opts: ExportOptions,
    *,
    wandb_name: str,
    show_report: bool = True,
    verbose: bool = False,
    beside: Callable[[Path], None] | None = None,
) -> int:
    """Export ``opts.checkpoint`` into ``opts.out``, print the report, log the export to W&B
    (``opts.wandb_mode``, project and group) and apply the INT8 gate. Returns the exit code: 0,
    or 1 after one ``error:`` line on stderr (a checkpoint, dataset, export or write error,
    which leaves nothing in ``opts.out``; or the gate, which leaves the artifacts for a look).
    ``beside`` writes the caller's own files into the finished export before W&B logs it (a
    sweep's trial.json). A ConfigError (an ``--out`` that is not an earlier export) is the
    caller's: an option error there, exit 2."""
    out = Path(str(opts.out))
    try:
        report = export_artifacts(opts)
    except (CheckpointError, DatasetError, ExportError, WriteError) as exc:
        print(f"error: {exc}\nnothing was written to {out}", file=sys.stderr)
        return 1
    if show_report:
        print(render_markdown(report))
    print(f"artifacts in {out}", flush=True)
    if beside is not None:
        beside(out)
    run_id = log_export(
        report,
        out,
        mode=opts.wandb_mode,
        project=opts.wandb_project,
        name=wandb_name,
        group=opts.wandb_group,
        verbose=verbose,
    )
    if run_id:
        print(f"W&B run {run_id} (job_type export) in {out / 'wandb'}")
    failed = gate_message(report, out)
    if failed:
        print(failed, file=sys.stderr)
        return 1
    return 0
