"""Export a training checkpoint: model.pt, model.onnx, model.int8.onnx (and a TensorRT engine on
a CUDA machine with tensorrt), each verified on the test split and measured side by side.

    python launch/export.py --checkpoint runs/<name> --out exports/<name>
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="A checkpoint file, checkpoint directory or run directory.",
    )
    parser.add_argument("--out", required=True, help="Output directory (replaced atomically).")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Prepared dataset for verification and calibration (default: the "
        "one the checkpoint was trained on).",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=512,
        help="Validation images for INT8 calibration (default 512).",
    )
    parser.add_argument(
        "--calibration-method",
        choices=("minmax", "entropy", "percentile"),
        default="minmax",
        help="INT8 calibration (default minmax).",
    )
    parser.add_argument(
        "--reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="7-bit INT8 weights. auto = on for x86 CPUs without VNNI, whose AVX2 int8 kernels "
        "would otherwise saturate (default auto).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="Intra-op threads for every measured runtime (default: all CPUs).",
    )
    parser.add_argument(
        "--latency-iters",
        type=int,
        default=200,
        help="Timed batch-1 runs per artifact (default 200).",
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=3.0,
        help="Seconds of batch-64 runs per artifact (default 3).",
    )
    parser.add_argument(
        "--max-test-images",
        type=int,
        default=0,
        help="Use only the first N test images (default 0 = all).",
    )
    parser.add_argument(
        "--no-tensorrt", action="store_true", help="Do not build a TensorRT engine."
    )
    parser.add_argument(
        "--wandb-mode",
        choices=("auto", "online", "offline", "disabled"),
        default="auto",
        help="Log the report table and the ONNX files to W&B (job_type export). auto = online "
        "with an API key, else offline (default auto).",
    )
    parser.add_argument("--wandb-project", default="resnet18-dist", help="W&B project.")
    parser.add_argument("--wandb-group", default="", help="W&B group (e.g. the training run's).")
    parser.add_argument("--quiet", action="store_true", help="Less output.")
    args = parser.parse_args(argv)
    for name in ("calibration_images", "threads", "latency_iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.throughput_seconds <= 0:
        parser.error("--throughput-seconds: must be > 0")
    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint: {args.checkpoint} does not exist")

    from resnet18_dist.atomic import WriteError
    from resnet18_dist.data.manifest import DatasetError
    from resnet18_dist.engine.checkpoint import CheckpointError
    from resnet18_dist.export.pipeline import ExportError, ExportOptions, export_artifacts
    from resnet18_dist.export.report import render_markdown
    from resnet18_dist.logs import setup_logging

    setup_logging()
    opts = ExportOptions(
        checkpoint=args.checkpoint,
        out=args.out,
        data_dir=args.data_dir,
        calibration_images=args.calibration_images,
        calibration_method=args.calibration_method,
        reduce_range=args.reduce_range,
        threads=args.threads,
        latency_iters=args.latency_iters,
        throughput_seconds=args.throughput_seconds,
        max_test_images=args.max_test_images,
        tensorrt=not args.no_tensorrt,
        quiet=args.quiet,
    )
    try:
        report = export_artifacts(opts)
    except (CheckpointError, DatasetError, ExportError, WriteError) as exc:
        print(f"error: {exc}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    print(render_markdown(report))
    print(f"artifacts in {args.out}")
    from resnet18_dist.integrations.wandb import log_export

    run_id = log_export(
        report,
        Path(args.out),
        mode=args.wandb_mode,
        project=args.wandb_project,
        name=f"export-{Path(args.out).name}",
        group=args.wandb_group,
    )
    if run_id:
        print(f"W&B run {run_id} (job_type export) in {Path(args.out) / 'wandb'}")
    checks = report["checks"]
    if not (checks["fp32_ok"] and checks["int8_ok"]):
        print("error: a verification check failed (see Checks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
