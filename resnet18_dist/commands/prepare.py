"""Prepare a dataset for training: validate, split 6:2:2 (stratified, seeded), write tar shards.

    resnet18-dist prepare --source path/to/imagefolder --out data/mydata
    resnet18-dist prepare --source data/cifar --download --out data/cifar10
    resnet18-dist prepare --source digits --out data/digits

JPEGs are stored upright: an EXIF orientation tag is applied here, so every decoder that reads
the shards (DALI, PIL, the exported model's preprocessing) sees the same image.
"""

from __future__ import annotations

import sys
from pathlib import Path

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.data.prepare import PrepareOptions


def main(argv: list[str] | None = None, prog: str = "resnet18-dist prepare") -> int:
    parser = build_parser(PrepareOptions, __doc__, prog=prog)
    opts = parse_options(PrepareOptions, parser, argv)

    from resnet18_dist.data.digits import DIGITS_SOURCE, prepare_digits
    from resnet18_dist.data.prepare import prepare_dataset
    from resnet18_dist.logs import setup_logging

    setup_logging()
    # ConfigError (an --out that is not ours to replace, a layout it cannot read): exit code 2;
    # SourceError and WriteError: one line and exit code 1 (commands.run).
    if opts.source == DIGITS_SOURCE:
        result = prepare_digits(
            Path(str(opts.out)),
            quiet=opts.quiet,
            split=opts.split,
            seed=opts.seed,
            shard_size=opts.shard_size,
            min_shards=opts.min_shards,
            workers=opts.workers,
        )
    else:
        result = prepare_dataset(opts)

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
