"""`python launch/benchmark.py` = `resnet18-dist benchmark`: training speed on this machine's
device (compute only, data only, end to end) at 224 px and 32 px."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.commands import exit_now, run


def main(argv: list[str] | None = None) -> int:
    return run("benchmark", argv, prog="launch/benchmark.py")


if __name__ == "__main__":
    exit_now(main())
