"""Prepare a dataset for training: validate, split 6:2:2 (stratified, seeded), write tar shards.

python launch/prepare_data.py --source path/to/imagefolder --out data/mydata
python launch/prepare_data.py --source data/cifar --download --out data/cifar10
python launch/prepare_data.py --source digits --out data/digits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a fresh clone or a `ray job submit --working-dir .` upload without installing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.atomic import WriteError
from resnet18_dist.config import ConfigError
from resnet18_dist.data.digits import DIGITS_SOURCE, prepare_digits
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.data.sources import SourceError
from resnet18_dist.logs import setup_logging


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected three fractions like 0.6,0.2,0.2: {text}"
        ) from exc
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions like 0.6,0.2,0.2: {text}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        required=True,
        help="An ImageFolder directory (root/<class>/<image>), CIFAR-10's cifar-10-batches-py "
        "directory (or its parent), or `digits` for scikit-learn's bundled digits.",
    )
    parser.add_argument("--out", required=True, help="Output directory (replaced atomically).")
    parser.add_argument(
        "--download",
        action="store_true",
        help="Download CIFAR-10 into --source with torchvision first (needs the internet).",
    )
    parser.add_argument(
        "--split",
        type=_split,
        default=(0.6, 0.2, 0.2),
        help="train,val,test fractions (default 0.6,0.2,0.2). If the source has its own test "
        "split it is kept, and the rest is divided train:val in the train:val ratio.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Split and shuffle seed (default 0).")
    parser.add_argument("--shard-size", type=int, default=2000, help="Max samples per shard.")
    parser.add_argument(
        "--min-shards", type=int, default=8, help="Min shards per split (default 8)."
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Decode processes (default: all CPUs)."
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        kwargs = {} if args.workers is None else {"workers": args.workers}
        opts = PrepareOptions(
            source=args.source,
            out=args.out,
            split=args.split,
            seed=args.seed,
            shard_size=args.shard_size,
            min_shards=args.min_shards,
            download=args.download,
            quiet=args.quiet,
            **kwargs,
        )
    except ConfigError as exc:
        parser.error(str(exc))

    try:
        if args.source == DIGITS_SOURCE:
            result = prepare_digits(
                Path(args.out),
                quiet=args.quiet,
                split=opts.split,
                seed=opts.seed,
                shard_size=opts.shard_size,
                min_shards=opts.min_shards,
                workers=opts.workers,
            )
        else:
            result = prepare_dataset(opts)
    except (SourceError, WriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    print(f"prepared {result.out} in {result.seconds:.1f}s")
    for split, n in result.counts.items():
        print(f"  {split:5s} {n:7d} images in {result.num_shards[split]} shards")
    print(f"  rejected {len(result.rejects)} file(s); listed in {result.out / 'rejects.json'}")
    for r in result.rejects[:20]:
        print(f"    {r['path']}: {r['reason']}")
    if len(result.rejects) > 20:
        print(f"    ... and {len(result.rejects) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
