"""An export as a command finishes it: made, shown, logged to W&B, then held to its gates (INT8,
and with --mobile the ExecuTorch and LiteRT models).
`resnet18-dist export` and a sweep's best trial (tuning/sweep.py) both end this way, so its
error handling, its messages and its exit code are written once, here."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from resnet18_dist import storage
from resnet18_dist.atomic import WriteError
from resnet18_dist.cache import cache_root
from resnet18_dist.checkpoint_file import CheckpointError
from resnet18_dist.data.manifest import DatasetError
from resnet18_dist.export.bucket import BucketExportError, check_remote_out, upload_export
from resnet18_dist.export.pipeline import ExportError, ExportOptions, export_artifacts
from resnet18_dist.export.report import render_markdown
from resnet18_dist.integrations.wandb import log_export


def gate_message(report: dict[str, Any], out: Path | str) -> str | None:
    """The one line that fails an export whose INT8 (or, with --mobile, ExecuTorch or LiteRT)
    model loses too much test top-1 against FP32; None when all pass."""
    checks = report["checks"]
    failed = []
    if not checks["int8_ok"]:
        failed.append(
            f"INT8 loses {checks['int8_top1_drop']:.2f} points of test top-1 against FP32, "
            f"more than --max-int8-drop {checks['max_int8_drop']:g}"
        )
    for kind, name in (("executorch", "ExecuTorch"), ("litert", "LiteRT")):
        if not checks.get(f"{kind}_ok", True):
            failed.append(
                f"{name} loses {checks['mobile_top1_drop'][kind]:.2f} points of test top-1 "
                f"against FP32, more than --max-mobile-drop {checks['max_mobile_drop']:g}"
            )
    if not failed:
        return None
    return f"error: {'; '.join(failed)} (the artifacts are in {out}; see Checks above)"


def export_and_gate(
    opts: ExportOptions,
    *,
    wandb_name: str,
    show_report: bool = True,
    verbose: bool = False,
    beside: Callable[[Path], None] | None = None,
) -> int:
    """Export ``opts.checkpoint`` into ``opts.out``, print the report, log the export to W&B
    (``opts.wandb_mode``, project and group) and apply the gates. Returns the exit code: 0,
    or 1 after one ``error:`` line on stderr (a checkpoint, dataset, export, write or upload
    error, which leaves nothing a reader takes for an export in ``opts.out``; or the gate, which
    leaves the artifacts for a look). ``beside`` writes the caller's own files into the finished
    export before W&B logs it (a sweep's trial.json). An ``--out`` on object storage (``s3://``,
    ``gs://``) is made in a local staging directory and then published there, its report last
    (export/bucket.py). A ConfigError (an ``--out`` that is not an earlier export) is the
    caller's: an option error there, exit 2."""
    shown = str(opts.out)
    if not storage.is_remote(shown):
        return _export(opts, Path(shown), shown, wandb_name, show_report, verbose, beside, None)
    check_remote_out(shown)
    staging = cache_root() / "exports-out"
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot stage the export in {staging}: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix=".export-", dir=staging) as tmp:
        local = Path(tmp) / storage.split(shown)[1]
        local_opts = dataclasses.replace(opts, out=str(local))
        return _export(local_opts, local, shown, wandb_name, show_report, verbose, beside, shown)


def _export(
    opts: ExportOptions,
    out: Path,
    shown: str,
    wandb_name: str,
    show_report: bool,
    verbose: bool,
    beside: Callable[[Path], None] | None,
    upload_to: str | None,
) -> int:
    try:
        report = export_artifacts(opts)
    except (CheckpointError, DatasetError, ExportError, WriteError) as exc:
        print(f"error: {exc}\nnothing was written to {shown}", file=sys.stderr)
        return 1
    if show_report:
        print(render_markdown(report))
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
    failed = gate_message(report, shown)
    if upload_to is not None and failed:
        # Publishing replaces the export at --out, which may be serving: a model that fails the
        # gate is kept on this machine for a look instead.
        kept = Path(
            tempfile.mkdtemp(
                prefix=f"{out.name}-failed-gate-{time.strftime('%Y%m%d-%H%M%S')}-",
                dir=out.parent.parent,
            )
        )
        os.replace(out, kept)  # onto the new, empty directory: a unique name
        print(
            f"{gate_message(report, kept)}; nothing was published to {upload_to}", file=sys.stderr
        )
        return 1
    if upload_to is not None:
        try:
            upload_export(out, upload_to)
        except BucketExportError as exc:
            print(f"error: {exc}\nno export was published at {upload_to}", file=sys.stderr)
            return 1
    print(f"artifacts in {shown}", flush=True)
    if run_id:
        print(f"W&B run {run_id} (job_type export) in {shown}/wandb")
    if failed:
        print(failed, file=sys.stderr)
        return 1
    return 0
