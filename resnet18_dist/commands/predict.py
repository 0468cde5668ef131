"""Classify image files with an exported model (ONNX Runtime; no torch needed).

    resnet18-dist predict --model exports/<name> cat.jpg dog.png
    resnet18-dist predict --model exports/<name> --int8 --top-k 3 *.jpg

A file that cannot be classified (unreadable, not an image, too large) is reported by name and
the rest are still classified; the exit code is 1 if any failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.options import ConfigError, Options, opt


@dataclass
class PredictOptions(Options):
    images: list[str] = opt(
        [], "Image files (any format PIL reads).", positional=True, nargs="+", path=True
    )
    model: str | None = opt(
        None,
        "An export directory (from resnet18-dist export) or a .onnx file, or an export on "
        "object storage (s3://, gs://: fetched once into the cache and checked against its "
        "report).",
        required=True,
        path=True,
    )
    top_k: int = opt(5, "Classes to print per image.", ge=1)
    int8: bool = opt(False, "Use model.int8.onnx.")
    threads: int = opt(0, "Intra-op threads (0 = ONNX Runtime's default).", ge=0)
    device: str = opt(
        "cpu",
        "Run the model on the CPU, or on a CUDA GPU (ONNX Runtime's CUDA provider: "
        "onnxruntime-gpu).",
        choices=("cpu", "cuda"),
    )


def main(argv: list[str] | None = None, prog: str = "resnet18-dist predict") -> int:
    parser = build_parser(PredictOptions, __doc__, prog=prog, config_file=False)
    opts = parse_options(PredictOptions, parser, argv)

    from resnet18_dist.export.bucket import BucketExportError, local_export
    from resnet18_dist.model_meta import MODEL_INT8_ONNX, MODEL_ONNX
    from resnet18_dist.serve.classifier import DeviceError, OnnxClassifier, PredictError

    try:
        model = local_export(str(opts.model), [MODEL_INT8_ONNX if opts.int8 else MODEL_ONNX])
    except BucketExportError as exc:  # a partial or changed export: an option error (exit 2)
        raise ConfigError("--model", str(exc)) from exc
    try:
        clf = OnnxClassifier.load(model, int8=opts.int8, threads=opts.threads, device=opts.device)
    except DeviceError as exc:  # an option error (exit code 2)
        raise ConfigError("--device", str(exc)) from exc
    except PredictError as exc:  # the model, not an image: an option error (exit code 2)
        raise ConfigError("--model", str(exc)) from exc
    failed = 0
    for path in opts.images:
        try:
            top = clf.predict_file(path, top_k=opts.top_k)
        except PredictError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
