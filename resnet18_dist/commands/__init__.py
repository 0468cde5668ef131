"""The ``resnet18-dist`` console command: ``resnet18-dist train|train-accelerate|prepare|export|
predict|serve|compare|sweep [options]``. Each subcommand is a module here with ``main(argv,
prog)``; the ``launch/*.py`` scripts call the same functions, so both take the same options."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NoReturn

COMMANDS = {
    "train": ("train", "Train with Ray Train (PyTorch DDP); the main job."),
    "train-accelerate": ("train_accelerate", "Train without Ray, under accelerate/torchrun."),
    "prepare": ("prepare", "Validate, split and shard an image dataset."),
    "export": ("export", "Export a checkpoint to ONNX, INT8 (and TensorRT) and measure them."),
    "predict": ("predict", "Classify image files with an exported model."),
    "serve": ("serve", "Serve an exported model over HTTP with Ray Serve."),
    "compare": ("compare", "Compare training runs side by side."),
    "sweep": ("sweep", "Sweep the recipe with Ray Tune and ASHA; export the best trial."),
    "benchmark": ("benchmark", "Training speed here: compute only, data only, end to end."),
}


def usage() -> str:
    lines = ["usage: resnet18-dist COMMAND [options]   (resnet18-dist COMMAND --help)", ""]
    lines += [f"  {name:17s} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        from resnet18_dist.cli import package_version

        print(f"resnet18-dist {package_version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"resnet18-dist: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"resnet18_dist.commands.{COMMANDS[name][0]}")
    return int(module.main(rest, prog=f"resnet18-dist {name}") or 0)


def exit_now(rc: int) -> NoReturn:
    """End a command's process once its work is done and written: flush the output, stop Ray
    if this process uses it, and skip Python's interpreter teardown, which only frees memory the
    OS is about to reclaim and takes about 0.9 s after torch and Ray are loaded (measured on
    2 cores: `import ray.train.torch`, then a normal exit against os._exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # a private local Ray stops with its driver, as at a normal exit
    logging.shutdown()
    os._exit(rc)


def console() -> NoReturn:
    """The ``resnet18-dist`` entry point."""
    exit_now(main())
