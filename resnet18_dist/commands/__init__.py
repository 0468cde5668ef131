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
    return run(name, rest, prog=f"resnet18-dist {name}")


def run(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run one command; its errors are mapped to exit codes here, once for every command and
    launcher: an option error (ConfigError) exits 2 with the usage line and the option named;
    a domain error (errors.UserError: a checkpoint, dataset, export, write, storage ...) prints
    one ``error:`` line and exits 1; anything else is a bug: one line too, and its traceback
    with ``--verbose`` (or RESNET18_DIST_VERBOSE=1)."""
    from resnet18_dist.cli import command_parser
    from resnet18_dist.errors import UserError
    from resnet18_dist.options import ConfigError

    args = sys.argv[1:] if argv is None else list(argv)
    prog = prog or f"resnet18-dist {name}"
    module = importlib.import_module(f"resnet18_dist.commands.{COMMANDS[name][0]}")
    try:
        return int(module.main(args, prog=prog) or 0)
    except ConfigError as exc:
        parser = command_parser()
        if parser is None:  # raised before the command built its parser
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        parser.error(str(exc))  # usage + message; SystemExit(2)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours (Python's
        # own advice: point stdout at devnull so the flush at exit does not raise again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a command killed by SIGPIPE
    except Exception as exc:
        if "--verbose" in args or os.environ.get("RESNET18_DIST_VERBOSE") == "1":
            raise
        print(
            f"error: {type(exc).__name__}: {exc} (an unexpected error: --verbose or "
            "RESNET18_DIST_VERBOSE=1 shows its traceback)",
            file=sys.stderr,
        )
        return 1
    raise AssertionError("unreachable")


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
