"""`python launch/compare.py` = `resnet18-dist compare`: runnable from a fresh clone, or from a
`ray job submit --working-dir .` upload, without installing the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.commands import exit_now, run


def main(argv: list[str] | None = None) -> int:
    return run("compare", argv, prog="launch/compare.py")


if __name__ == "__main__":
    exit_now(main())
