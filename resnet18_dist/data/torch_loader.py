"""The torchvision loader backend: PIL decode + torchvision transforms in DataLoader workers.

Samples are read by random access into the tar shards through their DALI-format index, so
sharding is per sample: each rank reads a disjoint part, every sample is read exactly once per
epoch across the ranks, the training split is reshuffled every epoch, and every rank yields the
same number of batches (only the last one may be short).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from resnet18_dist.data.batching import LoaderSettings, batches_per_rank, empty_batch
from resnet18_dist.data.manifest import DatasetError, Manifest, SampleRef, parse_index
from resnet18_dist.data.policy import (
    AUTO_AUG_FILL,
    AUTO_AUG_POLICIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ROTATION_DEGREES,
    DataPolicy,
    autoaugment_policy,
    crop_padding,
    erase_side,
)
from resnet18_dist.imaging import BadImage, decode_upright
from resnet18_dist.preprocessing import PHOTO_RATIO, PHOTO_SCALE
from resnet18_dist.seeding import derive_seed


def train_transform(policy: DataPolicy) -> v2.Transform:
    size = policy.image_size
    steps: list[v2.Transform]
    if policy.random_crop:  # photo: the crop and flip of torchvision's ImageNet reference
        steps = [
            v2.RandomResizedCrop(size, scale=PHOTO_SCALE, ratio=PHOTO_RATIO, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:  # squash, or photo with augment none: evaluation's geometry
        steps = _eval_geometry(policy)
    if policy.augment == "seed":
        steps += [
            *([] if policy.random_crop else [v2.RandomHorizontalFlip()]),
            # Bilinear, as the DALI backend rotates (torchvision's default is nearest).
            v2.RandomRotation(ROTATION_DEGREES, interpolation=v2.InterpolationMode.BILINEAR),
            v2.ColorJitter(brightness=JITTER, contrast=JITTER, saturation=JITTER),
        ]
    elif policy.augment in ("cifar", *AUTO_AUG_POLICIES):
        if policy.base_crop:
            steps.append(v2.RandomCrop(size, padding=crop_padding(size), padding_mode="reflect"))
        if not policy.random_crop:
            steps.append(v2.RandomHorizontalFlip())
        if policy.augment == "trivialaugment":
            steps.append(
                v2.TrivialAugmentWide(
                    interpolation=v2.InterpolationMode.BILINEAR, fill=AUTO_AUG_FILL
                )
            )
        elif policy.augment == "autoaugment":
            steps.append(
                v2.AutoAugment(
                    v2.AutoAugmentPolicy(autoaugment_policy(size)),
                    interpolation=v2.InterpolationMode.BILINEAR,
                    fill=AUTO_AUG_FILL,
                )
            )
    steps += _to_normalized_tensor()
    if policy.random_erasing > 0:
        # A fixed square (scale = side^2 / size^2, ratio 1), placed uniformly inside the image,
        # erased to 0 after normalisation (the mean colour), as the DALI backend erases.
        area = erase_side(size) ** 2 / size**2
        steps.append(
            v2.RandomErasing(p=policy.random_erasing, scale=(area, area), ratio=(1, 1), value=0)
        )
    return v2.Compose(steps)


def eval_transform(policy: DataPolicy) -> v2.Transform:
    return v2.Compose([*_eval_geometry(policy), *_to_normalized_tensor()])


def _eval_geometry(policy: DataPolicy) -> list[v2.Transform]:
    size = policy.image_size
    if policy.photo:  # the shorter side to size / 0.875, then the centre (preprocessing.py)
        return [v2.Resize(policy.eval_resize, antialias=True), v2.CenterCrop(size)]
    return [v2.Resize((size, size), antialias=True)]


def _to_normalized_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


class ShardDataset(Dataset):
    """Map-style view of one split's shards; file handles are opened lazily per process."""

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform: v2.Transform | None,
        image_size: int = 0,
    ) -> None:
        self.image_size = image_size  # of the transformed images (for empty batches)
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
            img = decode_upright(data).convert("RGB")  # upright, as DALI decodes it
        except BadImage as exc:
            ref = self.refs[i]
            raise DatasetError(
                f"corrupt image {ref.key}.jpg in shard {self.paths[ref.shard]}: {exc}"
            ) from exc
        return (self.transform(img) if self.transform else img), label


class EpochPartSampler(Sampler[int]):
    """This rank's part of an epoch: every sample exactly once across the ranks.

    torch's DistributedSampler either repeats samples to even the ranks out or drops some;
    here the ranks' parts differ by at most one sample and the loader evens out the batch
    count instead (see ``data/batching.py``). Training parts come from a permutation
    seeded by (seed, epoch), shared by every rank; evaluation parts are strided, unshuffled.
    """

    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        return iter(order[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def collate_channels_last(batch: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """The default collate, in channels_last: the layout change happens here, in the loader's
    worker processes, so the transfer to the device is a plain copy and the training step
    never converts a batch."""
    images, labels = default_collate(batch)
    return [images.contiguous(memory_format=torch.channels_last), labels]


class TorchvisionLoader:
    """Batches on the device; the same number of batches on every rank (see data/batching.py)."""

    backend = "torchvision"

    def __init__(self, dataset: ShardDataset, settings: LoaderSettings, *, train: bool) -> None:
        self.dataset = dataset
        self.settings = settings
        device = settings.device
        self.memory_format = (
            torch.channels_last if settings.channels_last else torch.contiguous_format
        )
        self.generator = torch.Generator()
        self.sampler = EpochPartSampler(
            len(dataset), settings.rank, settings.world_size, settings.seed, shuffle=train
        )
        self.num_samples = len(self.sampler)
        batch_size = settings.batch_size_for(train)
        self._batches = batches_per_rank(len(dataset), settings.world_size, batch_size)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=settings.workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
            generator=self.generator,
            persistent_workers=False,  # fresh workers per epoch pick up the per-epoch seed
            prefetch_factor=4 if settings.workers > 0 else None,
            collate_fn=collate_channels_last if settings.channels_last else None,
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        # Worker augmentation seeds come from this generator: deterministic per (seed, rank, epoch).
        self.generator.manual_seed(derive_seed(self.settings.seed, self.settings.rank, epoch, 1))

    def __len__(self) -> int:
        return self._batches

    def sample_order(self, epoch: int) -> list[str]:
        """The sample keys this rank reads in ``epoch``, in order (for shuffle measurements)."""
        self.sampler.set_epoch(epoch)
        return [self.dataset.refs[i].key for i in self.sampler]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.settings.device
        nb = device.type == "cuda"
        produced = 0
        for images, labels in self.loader:
            produced += 1
            yield (
                images.to(device, non_blocking=nb, memory_format=self.memory_format),
                labels.to(device, non_blocking=nb),
            )
        while produced < self._batches:  # this rank's part ran out first (see data/batching.py)
            produced += 1
            yield empty_batch(self.dataset.image_size, device, self.settings.channels_last)

    def close(self) -> None:
        pass


def build_torchvision_loaders(
    manifest: Manifest, policy: DataPolicy, settings: LoaderSettings
) -> dict[str, TorchvisionLoader]:
    def make(split: str, transform: v2.Transform) -> TorchvisionLoader:
        dataset = ShardDataset(manifest, split, transform, policy.image_size)
        return TorchvisionLoader(dataset, settings, train=split == "train")

    return {
        "train": make("train", train_transform(policy)),
        "val": make("val", eval_transform(policy)),
        "test": make("test", eval_transform(policy)),
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
