"""Compare training runs without W&B: config differences, best val top-1, test metrics and
images/s side by side, and a PNG of validation top-1 and loss per epoch.

    resnet18-dist compare runs/a runs/b runs/c --plot compare.png
    resnet18-dist compare --sweep runs/my-sweep
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.options import ConfigError, Options, opt


@dataclass
class CompareOptions(Options):
    runs: list[str] = opt(
        [], "Run directories (local, or s3:// / gs:// runs).", positional=True, nargs="*", path=True
    )
    sweep: str | None = opt(
        None, "A directory whose run directories (any depth) to compare.", path=True
    )
    plot: str = opt("compare.png", "PNG to write.", path=True)

    def validate(self) -> None:
        if bool(self.runs) == bool(self.sweep):
            raise ConfigError("RUNS", "give run directories or --sweep DIR (one of the two)")


def main(argv: list[str] | None = None, prog: str = "resnet18-dist compare") -> int:
    parser = build_parser(CompareOptions, __doc__, prog=prog, config_file=False)
    opts = parse_options(CompareOptions, parser, argv)

    from resnet18_dist.compare import (
        CompareError,
        format_table,
        load_run,
        plot_runs,
        runs_in_sweep,
        summary_rows,
    )

    try:
        paths = runs_in_sweep(opts.sweep) if opts.sweep else list(opts.runs)
        runs = [load_run(p) for p in paths]
    except CompareError as exc:  # a run that is not there: an option error (exit code 2)
        option = "--sweep" if opts.sweep else "RUNS"
        raise ConfigError(option, str(exc).removeprefix("--sweep ")) from exc
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same basename in different places: show more of the path
        for r in runs:
            r.name = str(r.path)
    header, rows = summary_rows(runs)
    print(format_table(header, rows))
    plot_runs(runs, Path(opts.plot))
    print(f"\nplot: {opts.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
