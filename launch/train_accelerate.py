"""`python launch/train_accelerate.py` = `resnet18-dist train-accelerate`: runnable from a
fresh clone, or under `accelerate launch`/`torchrun`, without installing the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.commands import exit_now, run


def main(argv: list[str] | None = None) -> int:
    return run("train-accelerate", argv, prog="launch/train_accelerate.py")


if __name__ == "__main__":
    exit_now(main())
