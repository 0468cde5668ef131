"""Benchmark the data backends: DALI against torchvision, side by side in one run.

Same prepared shards, same augmentation policy, same image size, batch size and thread count
(DALI threads = DataLoader worker processes). Prints images/s for each and the ratio.
With --train it also measures training fed by each backend against compute-only training on
a synthetic batch already on the device (bf16 + channels_last on a GPU).

    python benchmarks/benchmark_data.py --data-dir data/cifar10 --threads 2
    python benchmarks/benchmark_data.py --data-dir data/cifar10 --image-size 224 --augment seed \\
        --threads 16 --batch-size 256 --train          # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resnet18_dist.options import absolute_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--data-dir", type=absolute_path, default=None, help="Prepared dataset (default: digits)."
    )
    parser.add_argument("--image-size", type=int, default=0, help="0 = the data's native size.")
    parser.add_argument(
        "--augment",
        default="auto",
        choices=("auto", "seed", "cifar", "trivialaugment", "autoaugment", "none"),
    )
    parser.add_argument("--threads", type=int, default=2, help="DALI threads = loader workers.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="Timed batches per run.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternating runs per backend.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--train",
        action="store_true",
        help="Also time training steps fed by each backend vs compute only.",
    )
    parser.add_argument(
        "--dali-prefetch",
        default="2",
        help="DALI prefetch queue depths, comma-separated: the first is the `dali` row, each "
        "other one more row, all in the same alternation.",
    )
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.dali_prefetch.split(",")]

    import torch

    from resnet18_dist.config import DataConfig
    from resnet18_dist.data.batching import LoaderSettings
    from resnet18_dist.data.digits import dataset_dir
    from resnet18_dist.data.manifest import Manifest
    from resnet18_dist.data.policy import resolve_policy
    from resnet18_dist.data.torch_loader import ShardDataset, TorchvisionLoader, train_transform
    from resnet18_dist.machine import machine_description
    from resnet18_dist.models import ModelSpec, build_model, resolve_stem

    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    gpu = device.type == "cuda"
    data_dir = dataset_dir(args.data_dir)
    manifest = Manifest.load(data_dir)
    policy = resolve_policy(DataConfig(image_size=args.image_size, augment=args.augment), manifest)
    channels_last = gpu

    settings = LoaderSettings(
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        rank=0,
        world_size=1,
        seed=0,
        workers=args.threads,  # DataLoader worker processes / DALI threads
        device=device,
        channels_last=channels_last,
    )

    def torchvision_loader() -> TorchvisionLoader:
        dataset = ShardDataset(manifest, "train", train_transform(policy), policy.image_size)
        return TorchvisionLoader(dataset, settings, train=True)

    def dali_loader(prefetch: int = depths[0]):
        import dataclasses

        from resnet18_dist.data.dali import DaliLoader

        depth = dataclasses.replace(settings, prefetch=prefetch)
        return DaliLoader(manifest, "train", policy, depth, train=True)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def rate(make, step=None) -> float:
        """Images/s over `--batches` batches after 3 warm-up batches (epochs wrap)."""
        loader, epoch, seen = make(), 0, 0
        it = iter(loader)

        def next_batch():
            nonlocal it, epoch
            try:
                return next(it)
            except StopIteration:
                epoch += 1
                loader.set_epoch(epoch)
                it = iter(loader)
                return next(it)

        for _ in range(3):
            batch = next_batch()
            if step:
                step(*batch)
        sync()
        start = time.perf_counter()
        for _ in range(args.batches):
            images, labels = next_batch()
            if step:
                step(images, labels)
            seen += labels.shape[0]
        sync()
        elapsed = time.perf_counter() - start
        loader.close()
        return seen / elapsed

    backends = {"torchvision": torchvision_loader, "dali": dali_loader}
    for d in depths[1:]:
        backends[f"dali-prefetch{d}"] = lambda d=d: dali_loader(d)
    results: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.repeats):
        for name, make in backends.items():
            results[name].append(rate(make))

    print(f"machine: {machine_description(args.threads)}; device {device}")
    print(
        f"data: {data_dir} ({manifest.counts['train']} train images), {policy.image_size} px, "
        f"augment {policy.augment}, batch {args.batch_size}, {args.threads} threads/workers, "
        f"{args.batches} batches x {args.repeats} runs each"
    )
    summary = {name: statistics.mean(v) for name, v in results.items()}
    for name, values in results.items():
        print(
            f"  {name:12s} {summary[name]:9.0f} images/s  (runs: "
            + ", ".join(f"{v:.0f}" for v in values)
            + ")"
        )
    print(f"  ratio dali/torchvision: {summary['dali'] / summary['torchvision']:.2f}")
    for d in depths[1:]:
        ratio = summary[f"dali-prefetch{d}"] / summary["dali"]
        print(f"  ratio dali prefetch {d} / prefetch {depths[0]}: {ratio:.2f}")
    out = {
        "machine": machine_description(args.threads),
        "device": str(device),
        "image_size": policy.image_size,
        "augment": policy.augment,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "dali_prefetch": depths,
        "loader": summary,
    }

    if args.train:
        spec = ModelSpec(
            num_classes=manifest.num_classes, stem=resolve_stem("auto", policy.image_size)
        )
        model = build_model(spec).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        amp = gpu and torch.cuda.is_bf16_supported()

        def step(images, labels) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fixed = torch.randn(args.batch_size, 3, policy.image_size, policy.image_size, device=device)
        if channels_last:
            fixed = fixed.to(memory_format=torch.channels_last)
        fixed_labels = torch.randint(0, manifest.num_classes, (args.batch_size,), device=device)

        class Synthetic:
            def __iter__(self):
                while True:
                    yield fixed, fixed_labels

            def set_epoch(self, epoch: int) -> None: ...
            def close(self) -> None: ...

        train = {
            "compute only": rate(Synthetic, step),
            "dali-fed": rate(dali_loader, step),
            "torchvision-fed": rate(torchvision_loader, step),
        }
        print(f"training (bf16 {amp}, channels_last {channels_last}):")
        for name, value in train.items():
            print(
                f"  {name:16s} {value:9.0f} images/s  ({value / train['compute only']:.0%} of "
                "compute only)"
            )
        out["train"] = train
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
