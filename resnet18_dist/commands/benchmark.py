"""Training speed on this machine's device: compute only, data only, and end to end.

    resnet18-dist benchmark                                  # 224 px and 32 px, the digits
    resnet18-dist benchmark --data-dir data/cifar10 --compile --out bench.json
    resnet18-dist benchmark --sizes 16 --batch-size 8 --steps 2 --warmup 1   # CI size

For each image size (the ImageNet stem above 64 px, the CIFAR stem at or below), in one process
on whatever device it finds (the first GPU, else the CPU), with the model, optimizer, task,
runtime and loaders that a training run builds (engine/session.py):

- compute only: the project's training step (engine/loop.py) on one synthetic batch already on
  the device, repeated: the ceiling for this model, precision and memory format;
- data only: the training loader alone (decode, augmentation, transfer), batches on the device;
- end to end: the project's training step fed by that loader.

It prints the three rates, end-to-end / compute and data / compute, and the device's name.
Rates are images per second over the measured steps after unmeasured warm-up steps (which
include torch.compile's compilation with --compile). The dataset is resized to each size, so
with small source images (the digits, CIFAR) the decoder has less to do than with photos.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.config import AMP_MODES, AUGMENT_POLICIES, BACKENDS, TRISTATE
from resnet18_dist.options import Options, opt


@dataclass
class BenchmarkOptions(Options):
    data_dir: str | None = opt(
        None,
        "Prepared dataset read by the data-only and end-to-end rates, resized to each size "
        "(a path, or s3:// / gs:// as for training). Default: the built-in digits.",
        path=True,
    )
    sizes: tuple[int, ...] = opt((224, 32), "Image sizes in px, comma-separated.", ge=8)
    batch_size: int = opt(256, "Training batch size.", ge=2)
    steps: int = opt(30, "Measured steps of each rate.", ge=1)
    warmup: int = opt(
        5, "Unmeasured steps before each rate (compilation, cuDNN autotuning, allocator).", ge=1
    )
    augment: str = opt("auto", "Augmentation policy, as for training.", choices=AUGMENT_POLICIES)
    data_backend: str = opt("auto", "Data loader, as for training.", choices=BACKENDS)
    loader_workers: int = opt(
        -1, "DataLoader worker processes / DALI threads. -1 = auto, as for training.", ge=-1
    )
    dali_prefetch: int = opt(2, "DALI prefetch queue depth, as for training.", ge=1)
    hw_decoder_load: float = opt(
        0.65, "DALI hardware JPEG decoder share, as for training.", ge=0, le=1
    )
    compile: bool = opt(False, "torch.compile the training step, as for training.")
    amp: str = opt("auto", "Mixed precision, as for training.", choices=AMP_MODES)
    channels_last: str = opt("auto", "channels_last, as for training.", choices=TRISTATE)
    use_gpu: str = opt("auto", "Use the first GPU: on, off, auto.", choices=TRISTATE)
    threads: int | None = opt(None, "CPU threads for the step. Default: all CPUs.", ge=1)
    out: str | None = opt(None, "Also write the figures to this JSON file.", path=True)


class _Repeat:
    """One batch, ``n`` times: the compute-only input (no loader, no transfer)."""

    def __init__(self, batch: tuple[Any, Any], n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for _ in range(self.n):
            yield self.batch

    def __len__(self) -> int:
        return self.n


class _Steps:
    """``n`` batches of a loader, running on into further epochs if one ends first."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n, self.epoch = loader, n, 0

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        left, full = self.n, 0
        while left:
            self.loader.set_epoch(self.epoch)
            self.epoch += 1
            for batch in self.loader:
                size = batch[1].shape[0]
                full = full or size
                if size < full:
                    # An epoch's short last batch (or the empty padding one) would be a new
                    # shape inside a measured window: a recompile under --compile, a cuDNN
                    # re-tune otherwise. Only full batches are timed.
                    continue
                yield batch
                left -= 1
                if not left:
                    return

    def __len__(self) -> int:
        return self.n


def _data_rate(loader: Any, steps: int, sync: Any) -> float:
    seen = 0
    start = time.perf_counter()
    for _, labels in loader:
        seen += labels.shape[0]
    sync()
    return seen / (time.perf_counter() - start)


def measure_size(opts: BenchmarkOptions, size: int, runtime: Any) -> dict[str, Any]:
    import torch

    from resnet18_dist.config import (
        DataConfig,
        DeviceConfig,
        LoggingConfig,
        OptimConfig,
        TrainConfig,
    )
    from resnet18_dist.engine.callbacks import CallbackList
    from resnet18_dist.engine.checkpoint import LoopState
    from resnet18_dist.engine.compiling import Compiled
    from resnet18_dist.engine.loop import train_one_epoch
    from resnet18_dist.engine.optim import impl_name
    from resnet18_dist.engine.session import build_data, build_setup

    cfg = TrainConfig(
        data=DataConfig(
            data_dir=opts.data_dir,
            image_size=size,
            augment=opts.augment,
            batch_size=opts.batch_size,
            eval_batch_size=opts.batch_size,
            loader_workers=opts.loader_workers,
            data_backend=opts.data_backend,
            dali_prefetch=opts.dali_prefetch,
            hw_decoder_load=opts.hw_decoder_load,
        ),
        optim=OptimConfig(epochs=1, warmup_epochs=0, patience=0),
        device=DeviceConfig(compile=opts.compile),
        logging=LoggingConfig(quiet=True, wandb_mode="disabled"),
    )
    data = build_data(cfg, runtime)
    try:
        run = build_setup(cfg, runtime, data, resuming=False)
        setup, device = run.setup, runtime.device

        def sync() -> None:
            runtime.synchronize()

        def step_rate(loader: Any) -> float:
            out = train_one_epoch(setup, loader, runtime, LoopState(), CallbackList(), 10**9)
            return float(out["train_images_per_s"])

        fmt = torch.channels_last if runtime.channels_last else torch.contiguous_format
        images = torch.randn(opts.batch_size, 3, size, size, device=device).contiguous(
            memory_format=fmt
        )
        labels = torch.randint(0, data.manifest.num_classes, (opts.batch_size,), device=device)
        step_rate(_Repeat((images, labels), opts.warmup))
        compute = step_rate(_Repeat((images, labels), opts.steps))

        train = data.loaders.train
        _data_rate(_Steps(train, opts.warmup), opts.warmup, sync)
        data_only = _data_rate(_Steps(train, opts.steps), opts.steps, sync)

        step_rate(_Steps(train, opts.warmup))
        end_to_end = step_rate(_Steps(train, opts.steps))
        compiled = isinstance(setup.model, Compiled) and setup.model.active
        return {
            "size": size,
            "stem": run.spec.stem,
            "augment": data.policy.augment,
            "data_backend": data.loaders.backend,
            "loader_workers": data.loaders.workers,
            "compiled": compiled,
            "optimizer_impl": impl_name(setup.optimizer),
            "compute_images_per_s": compute,
            "data_images_per_s": data_only,
            "end_to_end_images_per_s": end_to_end,
            "end_to_end_over_compute": end_to_end / compute,
            "data_over_compute": data_only / compute,
        }
    finally:
        data.loaders.close()


def device_name(device: Any) -> str:
    import torch

    from resnet18_dist.machine import cpu_model

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}, {torch.get_num_threads()} thread(s)"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device_name']} ({result['device']}); torch {result['torch']}; "
        f"amp {result['amp']}, channels_last {result['channels_last']}, "
        f"compile {'on' if result['compile'] else 'off'}; batch {result['batch_size']}, "
        f"{result['steps']} measured steps after {result['warmup']} warm-up steps",
        f"{'size':>5}  {'stem':8}  {'backend':11}  {'compute img/s':>13}  {'data img/s':>10}  "
        f"{'end-to-end img/s':>16}  {'e2e/compute':>11}  {'data/compute':>12}",
    ]
    for r in result["sizes"]:
        lines.append(
            f"{r['size']:>5}  {r['stem']:8}  {r['data_backend']:11}  "
            f"{r['compute_images_per_s']:>13.1f}  {r['data_images_per_s']:>10.1f}  "
            f"{r['end_to_end_images_per_s']:>16.1f}  {r['end_to_end_over_compute']:>11.3f}  "
            f"{r['data_over_compute']:>12.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "resnet18-dist benchmark") -> int:
    parser = build_parser(BenchmarkOptions, __doc__, prog=prog, config_file=False)
    opts = parse_options(BenchmarkOptions, parser, argv)

    import torch

    from resnet18_dist.config import DeviceConfig, TrainConfig
    from resnet18_dist.engine.runtime import TorchRuntime, available_cpus
    from resnet18_dist.launching.preflight import check_data, check_paths
    from resnet18_dist.logs import setup_logging
    from resnet18_dist.machine import machine_description

    setup_logging()
    probe = TrainConfig()
    probe.data.data_dir, probe.data.data_backend = opts.data_dir, opts.data_backend
    probe.data.batch_size = opts.batch_size
    threads = opts.threads or available_cpus()
    # An unusable dataset or --amp is a ConfigError (exit code 2, commands.run).
    check_paths(probe)
    check_data(probe, gpu_workers_possible=torch.cuda.is_available(), world_size=1)
    runtime = TorchRuntime(  # refuses an --amp this device cannot do
        DeviceConfig(use_gpu=opts.use_gpu, amp=opts.amp, channels_last=opts.channels_last),
        threads=threads,
        rank=0,
        world_size=1,
        local_rank=0,
        local_world_size=1,
    )
    result: dict[str, Any] = {
        "device": str(runtime.device),
        "device_name": device_name(runtime.device),
        "machine": machine_description(threads),
        "torch": torch.__version__,
        "amp": runtime.amp_mode,
        "channels_last": runtime.channels_last,
        "compile": opts.compile,
        "batch_size": opts.batch_size,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "data_dir": opts.data_dir or "digits",
        "sizes": [],
    }
    for size in opts.sizes:
        result["sizes"].append(measure_size(opts, size, runtime))
        print(
            f"{size} px: compute {result['sizes'][-1]['compute_images_per_s']:.1f}, data "
            f"{result['sizes'][-1]['data_images_per_s']:.1f}, end to end "
            f"{result['sizes'][-1]['end_to_end_images_per_s']:.1f} images/s",
            flush=True,
        )
    print(format_table(result), flush=True)
    if opts.out:
        from pathlib import Path

        from resnet18_dist.atomic import atomic_write_text

        atomic_write_text(Path(opts.out), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
