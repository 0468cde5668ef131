"""Export a training checkpoint: model.pt, model.onnx, model.int8.onnx (and a TensorRT engine on
a CUDA machine with tensorrt), each verified on the test split and measured side by side.

    resnet18-dist export --checkpoint runs/<name> --out exports/<name>
"""

from __future__ import annotations

import sys
from pathlib import Path

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.export.pipeline import ExportOptions
from resnet18_dist.options import ConfigError


def main(argv: list[str] | None = None, prog: str = "resnet18-dist export") -> int:
    parser = build_parser(ExportOptions, __doc__, prog=prog)
    opts = parse_options(ExportOptions, parser, argv)
    from resnet18_dist import storage

    if storage.is_remote(opts.checkpoint):
        from resnet18_dist.checkpoint_file import CheckpointError, resolve_checkpoint_path

        try:  # fetched into the local cache now, so a missing object is an option error
            resolve_checkpoint_path(opts.checkpoint)
        except CheckpointError as exc:
            raise ConfigError("--checkpoint", str(exc)) from exc
    elif not Path(str(opts.checkpoint)).exists():
        raise ConfigError("--checkpoint", f"{opts.checkpoint} does not exist")

    from resnet18_dist.export.publish import export_and_gate
    from resnet18_dist.logs import setup_logging

    setup_logging()
    # An --out that is not an earlier export is a ConfigError (exit code 2, commands.run).
    return export_and_gate(opts, wandb_name=f"export-{Path(str(opts.out)).name}")


if __name__ == "__main__":
    sys.exit(main())
