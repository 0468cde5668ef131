"""Export a training checkpoint: model.pt, model.onnx, model.int8.onnx (and a TensorRT engine on
a CUDA machine with tensorrt), each verified on the test split and measured side by side.

    resnet18-dist export --checkpoint runs/<name> --out exports/<name>
"""

from __future__ import annotations

import sys
from pathlib import Path

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.export.pipeline import ExportOptions


def main(argv: list[str] | None = None, prog: str = "resnet18-dist export") -> int:
    parser = build_parser(ExportOptions, __doc__, prog=prog)
    opts = parse_options(ExportOptions, parser, argv)
    from resnet18_dist import storage

    if storage.is_remote(opts.checkpoint):
        from resnet18_dist.checkpoint_file import CheckpointError, resolve_checkpoint_path

        try:  # fetched into the local cache now, so a missing object is an option error
            resolve_checkpoint_path(opts.checkpoint)
        except CheckpointError as exc:
            parser.error(f"--checkpoint: {exc}")
    elif not Path(str(opts.checkpoint)).exists():
        parser.error(f"--checkpoint: {opts.checkpoint} does not exist")

    from resnet18_dist.atomic import WriteError
    from resnet18_dist.checkpoint_file import CheckpointError
    from resnet18_dist.data.manifest import DatasetError
    from resnet18_dist.export.pipeline import ExportError, export_artifacts
    from resnet18_dist.export.report import render_markdown
    from resnet18_dist.integrations.wandb import log_export
    from resnet18_dist.logs import setup_logging
    from resnet18_dist.options import ConfigError

    setup_logging()
    out = Path(str(opts.out))
    try:
        report = export_artifacts(opts)
    except ConfigError as exc:  # an --out that is not an earlier export, checked first
        parser.error(str(exc))  # exits 2
    except (CheckpointError, DatasetError, ExportError, WriteError) as exc:
        print(f"error: {exc}\nnothing was written to {out}", file=sys.stderr)
        return 1
    print(render_markdown(report))
    print(f"artifacts in {out}")
    run_id = log_export(
        report,
        out,
        mode=opts.wandb_mode,
        project=opts.wandb_project,
        name=f"export-{out.name}",
        group=opts.wandb_group,
    )
    if run_id:
        print(f"W&B run {run_id} (job_type export) in {out / 'wandb'}")
    checks = report["checks"]
    if not checks["int8_ok"]:
        print(
            f"error: INT8 loses {checks['int8_top1_drop']:.2f} points of test top-1 against "
            f"FP32, more than --max-int8-drop {checks['max_int8_drop']:g} (the artifacts are in "
            f"{out}; see Checks above)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
