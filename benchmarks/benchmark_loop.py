"""Benchmark: the project's training loop against a plain hand-written PyTorch loop.

Same model (ResNet18), same prepared shards, same transforms, batch size, threads and process;
the two loops alternate epoch by epoch so that machine drift hits both alike. Prints training
images/s for each and their ratio (project / plain).

    python benchmarks/benchmark_loop.py                       # built-in digits, 8 px
    python benchmarks/benchmark_loop.py --data-dir data/cifar10 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet18_dist.options import absolute_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--data-dir", type=absolute_path, default=None, help="Prepared dataset (default: digits)."
    )
    parser.add_argument("--epochs", type=int, default=4, help="Measured epochs per loop.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=0, help="Cap steps per epoch (0 = all).")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores).")
    args = parser.parse_args(argv)

    import os

    import torch
    from torch.nn import functional as F

    from resnet18_dist.config import DataConfig, DeviceConfig, OptimConfig
    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.data.loaders import build_loaders, loader_settings
    from resnet18_dist.data.manifest import Manifest
    from resnet18_dist.data.policy import resolve_policy
    from resnet18_dist.data.torch_loader import ShardDataset, train_transform
    from resnet18_dist.engine.callbacks import CallbackList
    from resnet18_dist.engine.checkpoint import LoopState
    from resnet18_dist.engine.loop import TrainingSetup, train_one_epoch
    from resnet18_dist.engine.optim import build_optimizer, build_scheduler
    from resnet18_dist.engine.runtime import TorchRuntime
    from resnet18_dist.engine.tasks import ClassificationTask
    from resnet18_dist.machine import machine_description
    from resnet18_dist.models import ModelSpec, build_model, resolve_stem

    threads = args.threads or os.cpu_count() or 1
    data_dir = dataset_dir(args.data_dir)
    manifest = Manifest.load(data_dir)
    data_cfg = DataConfig(data_dir=str(data_dir), batch_size=args.batch_size, loader_workers=0)
    policy = resolve_policy(data_cfg, manifest)
    spec = ModelSpec(num_classes=manifest.num_classes, stem=resolve_stem("auto", policy.image_size))
    runtime = TorchRuntime(DeviceConfig(use_gpu="auto"), threads=threads)
    device = runtime.device

    # --- the project's loop: runtime, loader backend, task, scheduler, callbacks
    torch.manual_seed(0)
    model_a = runtime.wrap_model(build_model(spec))
    settings = loader_settings(
        data_cfg,
        rank=0,
        world_size=1,
        seed=0,
        device=device,
        channels_last=runtime.channels_last,
        cpus_per_worker=threads,
    )
    loaders = build_loaders(data_cfg, manifest, policy, settings)
    optim_cfg = OptimConfig(epochs=args.epochs + 1)
    opt_a = build_optimizer(model_a, optim_cfg)
    sched_a = build_scheduler(opt_a, optim_cfg, len(loaders.train))
    state, callbacks = LoopState(), CallbackList()
    setup = TrainingSetup(
        model=model_a,
        unwrapped=runtime.unwrap(model_a),
        task=ClassificationTask(),
        optimizer=opt_a,
        scheduler=sched_a,
    )

    class Capped:
        """Caps the steps of an epoch (for quick runs on large datasets)."""

        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if args.max_steps and i >= args.max_steps:
                    return
                yield batch

        def __len__(self):
            return min(len(self.loader), args.max_steps or len(self.loader))

    def project_epoch(epoch: int) -> float:
        loaders.train.set_epoch(epoch)
        out = train_one_epoch(setup, Capped(loaders.train), runtime, state, callbacks, log_every=10)
        return out["train_images_per_s"]

    # --- a plain PyTorch loop: DataLoader, model, SGD, cross-entropy. Nothing else.
    torch.manual_seed(0)
    model_b = build_model(spec).to(device)
    if runtime.channels_last:
        model_b = model_b.to(memory_format=torch.channels_last)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    plain_loader = torch.utils.data.DataLoader(
        ShardDataset(manifest, "train", train_transform(policy)),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )

    def plain_epoch(epoch: int) -> float:
        model_b.train()
        seen, start = 0, time.perf_counter()
        for i, (x, y) in enumerate(plain_loader):
            if args.max_steps and i >= args.max_steps:
                break
            x, y = x.to(device), y.to(device)
            if runtime.channels_last:
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.amp):
                loss = F.cross_entropy(model_b(x), y)
            opt_b.zero_grad(set_to_none=True)
            loss.backward()
            opt_b.step()
            seen += y.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)

    print(f"machine: {machine_description(threads)}")
    print(
        f"data: {data_dir} ({manifest.counts['train']} train images, {policy.image_size}px, "
        f"augment {policy.augment}), batch {args.batch_size}, device {device}, "
        f"amp {runtime.amp}, channels_last {runtime.channels_last}"
    )
    project_epoch(0)  # warm-up (allocator, oneDNN kernels), not measured
    plain_epoch(0)
    a, b = [], []
    for epoch in range(1, args.epochs + 1):
        a.append(project_epoch(epoch))
        b.append(plain_epoch(epoch))
        print(f"  epoch {epoch}: project {a[-1]:8.1f} img/s   plain {b[-1]:8.1f} img/s")
    ma, mb = statistics.mean(a), statistics.mean(b)
    print(f"project loop: {ma:8.1f} images/s (min {min(a):.1f}, max {max(a):.1f})")
    print(f"plain loop:   {mb:8.1f} images/s (min {min(b):.1f}, max {max(b):.1f})")
    print(f"ratio project/plain: {ma / mb:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
