"""Classify image files with an exported model (ONNX Runtime; no torch needed).

python launch/predict.py --model exports/<name> cat.jpg dog.png
python launch/predict.py --model exports/<name> --int8 --top-k 3 *.jpg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="An export directory (from launch/export.py) or a .onnx file.",
    )
    parser.add_argument("images", nargs="+", help="Image files (any format PIL reads).")
    parser.add_argument("--top-k", type=int, default=5, help="Classes to print per image.")
    parser.add_argument("--int8", action="store_true", help="Use model.int8.onnx.")
    parser.add_argument("--threads", type=int, default=0, help="Intra-op threads (0 = default).")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k: must be >= 1")

    from resnet18_dist.serve.classifier import OnnxClassifier, PredictError

    try:
        clf = OnnxClassifier.load(args.model, int8=args.int8, threads=args.threads)
    except PredictError as exc:
        parser.error(f"--model: {exc}")
    failed = 0
    for path in args.images:
        try:
            top = clf.predict_file(path, top_k=args.top_k)
        except PredictError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
