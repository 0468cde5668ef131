"""Compare training runs without W&B: config differences, best val top-1, test metrics and
images/s side by side, and a PNG of validation top-1 and loss per epoch.

    python launch/compare.py runs/a runs/b runs/c --plot compare.png
    python launch/compare.py --sweep runs/my-sweep
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet18_dist.compare import (
    CompareError,
    format_table,
    load_run,
    plot_runs,
    runs_in_sweep,
    summary_rows,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="Run directories.")
    parser.add_argument("--sweep", help="A directory whose run directories (any depth) to compare.")
    parser.add_argument("--plot", default="compare.png", help="PNG to write (default compare.png).")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.sweep):
        parser.error("give run directories or --sweep DIR (one of the two)")
    try:
        paths = runs_in_sweep(args.sweep) if args.sweep else [Path(p) for p in args.runs]
        runs = [load_run(p) for p in paths]
    except CompareError as exc:
        parser.error(str(exc))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same basename in different places: show more of the path
        for r in runs:
            r.name = str(r.path)
    header, rows = summary_rows(runs)
    print(format_table(header, rows))
    plot_runs(runs, Path(args.plot))
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
