"""The torchvision loader backend: PIL decode + torchvision transforms in DataLoader workers.

Samples are read by random access into the tar shards through their DALI-format index, so
sharding is per sample, exactly like DALI's reader: each rank reads a disjoint subset, the
training split is reshuffled every epoch, and every rank runs the same number of steps.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from resnet18_dist.data.manifest import DatasetError, Manifest, SampleRef, parse_index
from resnet18_dist.data.policy import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ROTATION_DEGREES,
    DataPolicy,
    crop_padding,
)
from resnet18_dist.seeding import derive_seed


def train_transform(policy: DataPolicy) -> v2.Transform:
    size = policy.image_size
    steps: list[v2.Transform] = [v2.Resize((size, size), antialias=True)]
    if policy.augment == "seed":
        steps += [
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(ROTATION_DEGREES),
            v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
        ]
    elif policy.augment == "cifar":
        steps += [
            v2.RandomCrop(size, padding=crop_padding(size), padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
        ]
    return v2.Compose([*steps, *_to_normalized_tensor()])


def eval_transform(policy: DataPolicy) -> v2.Transform:
    size = policy.image_size
    return v2.Compose([v2.Resize((size, size), antialias=True), *_to_normalized_tensor()])


def _to_normalized_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


class ShardDataset(Dataset):
    """Map-style view of one split's shards; file handles are opened lazily per process."""

    def __init__(self, manifest: Manifest, split: str, transform: v2.Transform | None) -> None:
        self.paths = manifest.shard_paths(split)
        self.refs: list[SampleRef] = []
        for i, idx in enumerate(manifest.index_paths(split)):
            self.refs.extend(parse_index(idx, i))
        self.transform = transform
        self._files: dict[int, IO[bytes]] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.refs)

    def _file(self, shard: int) -> IO[bytes]:
        if self._pid != os.getpid():  # a forked DataLoader worker must not share offsets
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.paths[shard], "rb")  # noqa: SIM115 - cached handle
        return self._files[shard]

    def read(self, i: int) -> tuple[bytes, int]:
        ref = self.refs[i]
        f = self._file(ref.shard)
        f.seek(ref.image_offset)
        data = f.read(ref.image_size)
        f.seek(ref.label_offset)
        label_text = f.read(ref.label_size)
        try:
            return data, int(label_text)
        except ValueError as exc:
            raise DatasetError(
                f"{self.paths[ref.shard]}: sample {ref.key} has a malformed label {label_text!r}"
            ) from exc

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data, label = self.read(i)
        try:
            img = Image.open(io.BytesIO(data))
            img = img.convert("RGB")  # also forces the full decode
        except Exception as exc:  # PIL raises several types; all mean the same here
            ref = self.refs[i]
            raise DatasetError(
                f"corrupt image {ref.key}.jpg in shard {self.paths[ref.shard]}: {exc}"
            ) from exc
        return (self.transform(img) if self.transform else img), label


class TorchvisionLoader:
    """Batches on the device; same ``len`` on every rank for training (see module docstring)."""

    backend = "torchvision"

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        workers: int,
        device: torch.device,
        channels_last: bool,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator()
        if train:
            # drop_last in the sampler: ranks get equal, strictly disjoint sample sets (at most
            # world_size - 1 samples sit out an epoch, different ones each epoch).
            self.sampler: DistributedSampler | list[int] = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
        else:
            # No padding for evaluation: DistributedSampler would repeat samples to even out the
            # ranks and metrics would count them twice. Ranks may differ by one batch; evaluation
            # runs the unwrapped model, so no collective waits on the longer rank.
            self.sampler = list(range(rank, len(dataset), world_size))
        self.num_samples = len(self.sampler)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=train,  # a last batch of 1 would break BatchNorm
            generator=self.generator,
            persistent_workers=False,  # fresh workers per epoch pick up the per-epoch seed
            prefetch_factor=4 if workers > 0 else None,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        # Worker augmentation seeds come from this generator: deterministic per (seed, rank, epoch).
        self.generator.manual_seed(derive_seed(self.seed, self.rank, epoch, 1))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        nb = self.device.type == "cuda"
        for images, labels in self.loader:
            yield (
                images.to(self.device, non_blocking=nb, memory_format=self.memory_format),
                labels.to(self.device, non_blocking=nb),
            )

    def close(self) -> None:
        pass


def build_torchvision_loaders(
    manifest: Manifest,
    policy: DataPolicy,
    *,
    batch_size: int,
    eval_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    device: torch.device,
    channels_last: bool,
) -> dict[str, TorchvisionLoader]:
    common = dict(
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=workers,
        device=device,
        channels_last=channels_last,
    )
    return {
        "train": TorchvisionLoader(
            ShardDataset(manifest, "train", train_transform(policy)),
            train=True,
            batch_size=batch_size,
            **common,  # type: ignore[arg-type]
        ),
        "val": TorchvisionLoader(
            ShardDataset(manifest, "val", eval_transform(policy)),
            train=False,
            batch_size=eval_batch_size,
            **common,  # type: ignore[arg-type]
        ),
        "test": TorchvisionLoader(
            ShardDataset(manifest, "test", eval_transform(policy)),
            train=False,
            batch_size=eval_batch_size,
            **common,  # type: ignore[arg-type]
        ),
    }


def dataset_size_check(manifest: Manifest, batch_size: int, world_size: int) -> None:
    """Fail early, naming the options, when a rank would get no full training batch."""
    per_rank = manifest.counts["train"] // world_size
    if per_rank < batch_size:
        raise DatasetError(
            f"{Path(manifest.root)}: {manifest.counts['train']} training images over "
            f"{world_size} worker(s) is {per_rank} per worker, fewer than --batch-size "
            f"{batch_size}; lower --batch-size or --num-workers"
        )
