"""Benchmark how well each loader backend shuffles: the correlation between a sample's position in
one epoch and in the next, for DALI and torchvision side by side on the same split (0 for
independent permutations; 1 for the same order every epoch).

    python benchmarks/benchmark_shuffle.py --data-dir data/cifar10  # 30,000 training images

The order is recovered from the loaders' own output: every decoded training image (augmentation
off) is matched to its index by its pixels, so the same script measures any version of the
loaders, including the commit before a change to them.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet18_dist.options import absolute_path


def _settings_or_kwargs(batch_size: int, threads: int):
    """Loader arguments for this version of the loaders (LoaderSettings since the issue-10
    refactor, keyword arguments before it), so that 'before' and 'after' run one script."""
    import torch

    try:
        from resnet18_dist.data.batching import LoaderSettings
    except ImportError:
        kwargs = {"batch_size": batch_size, "rank": 0, "world_size": 1, "seed": 0}
        kwargs |= {"device": torch.device("cpu"), "channels_last": False}
        return None, kwargs, threads
    settings = LoaderSettings(batch_size, batch_size, 0, 1, 0, threads, torch.device("cpu"), False)
    return settings, {}, threads


def _loader(backend: str, manifest, policy, train: bool, batch_size: int, threads: int):
    from resnet18_dist.data.torch_loader import ShardDataset, TorchvisionLoader, eval_transform

    settings, kwargs, threads = _settings_or_kwargs(batch_size, threads)
    if backend == "dali":
        from resnet18_dist.data.dali import DaliLoader

        if settings is not None:
            return DaliLoader(manifest, "train", policy, settings, train=train)
        return DaliLoader(manifest, "train", policy, train=train, threads=threads, **kwargs)
    dataset = ShardDataset(manifest, "train", eval_transform(policy))
    if settings is not None:
        return TorchvisionLoader(dataset, settings, train=train)
    return TorchvisionLoader(dataset, train=train, workers=threads, **kwargs)


def _digests(loader) -> list[bytes]:
    """One digest per image, in the order the loader yields them (pixels rounded to 0..255)."""
    import torch

    from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for images, _ in loader:
        px = ((images.float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        out += [hashlib.blake2b(img.numpy().tobytes(), digest_size=12).digest() for img in px]
    return out


def _pearson(a: list[int], b: list[int]) -> float:
    import numpy as np

    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--data-dir", type=absolute_path, required=True, help="A prepared dataset.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs to read (pairs = this - 1).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / loader workers.")
    parser.add_argument("--backends", default="torchvision,dali")
    args = parser.parse_args(argv)

    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.data.manifest import Manifest
    from resnet18_dist.data.policy import DataPolicy
    from resnet18_dist.machine import machine_description

    manifest = Manifest.load(dataset_dir(args.data_dir))  # a bucket URI is fetched first
    policy = DataPolicy(manifest.native_size or 32, "none")  # the order, not augmentation
    n = manifest.counts["train"]
    print(f"machine: {machine_description(args.threads)}")
    print(
        f"data: {args.data_dir}, train split {n} images in {len(manifest.shards['train'])} "
        f"shards; 1 rank, {args.epochs} epochs"
    )
    results = {}
    for backend in args.backends.split(","):
        start = time.perf_counter()
        # The split in its stored order (evaluation reads it unshuffled) names each image.
        reference = _digests(_loader(backend, manifest, policy, False, args.batch_size, 1))
        index: dict[bytes, int] = {}
        dup = set()
        for i, d in enumerate(reference):
            if d in index:
                dup.add(d)  # identical images (CIFAR has a few): left out of the measure
            index[d] = i
        loader = _loader(backend, manifest, policy, True, args.batch_size, args.threads)
        positions = []
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            order = _digests(loader)
            assert sorted(order) == sorted(reference), f"{backend}: epoch {epoch} != the split"
            positions.append({index[d]: pos for pos, d in enumerate(order) if d not in dup})
        loader.close()
        keys = sorted(positions[0])
        corr = [
            _pearson([positions[e][k] for k in keys], [positions[e + 1][k] for k in keys])
            for e in range(args.epochs - 1)
        ]
        results[backend] = corr
        print(
            f"  {backend:12s} epoch-to-epoch position correlation: "
            + ", ".join(f"{c:+.4f}" for c in corr)
            + f"   (mean |r| {statistics.mean(abs(c) for c in corr):.4f}; "
            f"{len(keys)} images; {time.perf_counter() - start:.0f}s)"
        )
    if {"dali", "torchvision"} <= set(results):
        d = statistics.mean(abs(c) for c in results["dali"])
        t = statistics.mean(abs(c) for c in results["torchvision"])
        print(f"  mean |r| dali / torchvision: {d / t:.1f}x  (dali {d:.4f}, torchvision {t:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
