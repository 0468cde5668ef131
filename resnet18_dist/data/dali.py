"""The NVIDIA DALI loader backend: decode and augment on the GPU, or the same graph on the CPU.

One pipeline definition, ``image_pipeline``: with a ``device_id`` it decodes with nvJPEG
(``device="mixed"``) and augments on the GPU; with ``device_id=None`` every operator runs on the
CPU, which is how CI tests this exact code. It reads the prepared WebDataset shards with
``fn.readers.webdataset`` (the ``.idx`` files from preparation), sharded by global rank.

Epoch semantics (the same as the torchvision backend):
- every sample of a split is read exactly once per epoch across the ranks: the reader pads each
  rank's part to equal length (``pad_last_batch``) and the iterator drops the padding
  (``LastBatchPolicy.PARTIAL``), so every rank yields the same number of batches and only the
  last one may be short;
- the training pipeline is rebuilt every epoch with a seed derived from (run seed, rank, epoch)
  and reads part ``(rank + epoch) % world`` of the pre-shuffled shards through a shuffle buffer,
  so a resumed epoch draws the same samples and augmentations as an uninterrupted one.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from resnet18_dist.data.integrity import describe_corruption, undecodable_samples, verify_split
from resnet18_dist.data.manifest import IMAGE_EXT, LABEL_EXT, DatasetError, Manifest
from resnet18_dist.data.policy import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ROTATION_DEGREES,
    DataPolicy,
    crop_padding,
)
from resnet18_dist.seeding import derive_seed

log = logging.getLogger(__name__)
READER = "Reader"


def _pipeline_def():  # DALI is imported here so that this module loads without it
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=False)
    def image_pipeline(
        paths: list[str],
        index_paths: list[str],
        image_size: int,
        augment: str,
        train: bool,
        shard_id: int,
        num_shards: int,
        gpu: bool,
        channels_last: bool,
        half: bool,
        reader_seed: int,
    ):
        jpegs, labels = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=[IMAGE_EXT, LABEL_EXT],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=True,
            stick_to_shard=True,  # the part is chosen per epoch by the rebuild, not by DALI
            random_shuffle=train,
            initial_fill=1024,
            seed=reader_seed,
            name=READER,
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(
            images,
            resize_x=image_size,
            resize_y=image_size,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        mirror: Any = 0
        if train and augment == "seed":
            images = fn.rotate(
                images,
                angle=fn.random.uniform(range=(-ROTATION_DEGREES, ROTATION_DEGREES)),
                keep_size=True,
                fill_value=0,
                interp_type=types.INTERP_LINEAR,
            )
            lo, hi = 1.0 - JITTER, 1.0 + JITTER
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=(lo, hi)),
                contrast=fn.random.uniform(range=(lo, hi)),
                saturation=fn.random.uniform(range=(lo, hi)),
            )
            mirror = fn.random.coin_flip(probability=0.5)
        elif train and augment == "cifar":
            pad = crop_padding(image_size)
            # Random crop of the reflect-padded image = a window shifted by up to `pad` px,
            # reflected where it leaves the image ("reflect_101" is torch's "reflect").
            anchor = fn.random.uniform(values=list(range(-pad, pad + 1)), shape=2)
            images = fn.slice(
                images,
                start=fn.cast(anchor, dtype=types.INT32),
                shape=[image_size, image_size],
                axes=[0, 1],
                out_of_bounds_policy="reflect_101",
            )
            mirror = fn.random.coin_flip(probability=0.5)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT16 if half else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=mirror,
        )
        return images, labels

    return image_pipeline


def labels_from_ascii(raw: torch.Tensor, check: bool = False) -> torch.Tensor:
    """(N, D) uint8 zero-padded ASCII digits (the shards' ``.cls`` members) -> (N,) int64.

    ``check`` validates the digits (a host sync, so the loader does it on an epoch's first batch
    only)."""
    digits = raw.long() - ord("0")
    if check and digits.numel() and (digits.min() < 0 or digits.max() > 9):
        raise DatasetError("a label member of a shard is not zero-padded ASCII digits")
    powers = 10 ** torch.arange(raw.shape[1] - 1, -1, -1, device=raw.device)
    return digits @ powers


class DaliLoader:
    """Batches from a DALI pipeline, on the training device, with this project's epoch rules."""

    backend = "dali"

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        policy: DataPolicy,
        *,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        threads: int,
        device: torch.device,
        channels_last: bool,
        half: bool = False,
        verify_shards: str = "auto",
    ) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy

        self.manifest = manifest
        self.split = split
        self.policy = policy
        self.train = train
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.threads = max(1, threads)
        self.device = device
        self.gpu = device.type == "cuda"
        self.channels_last = channels_last
        self.half = half
        self._policy = LastBatchPolicy.PARTIAL
        self.paths = [str(p) for p in manifest.shard_paths(split)]
        self.index_paths = [str(p) for p in manifest.index_paths(split)]
        n = manifest.counts[split]
        if n < world_size:
            raise DatasetError(f"{manifest.root}: {n} {split} images for {world_size} workers")
        # Before DALI sees any byte: its decoder may crash instead of raising on a bad image.
        verify_split(manifest, split, verify_shards)
        self._n = n
        self._batches = math.ceil(math.ceil(n / world_size) / batch_size)
        self._pipe: Any = None
        self._iter: Any = None
        self._epoch = 0
        self._built_for: int | None = None

    def __len__(self) -> int:
        return self._batches

    def _part(self, epoch: int) -> int:
        return (self.rank + epoch) % self.world_size if self.train else self.rank

    @property
    def num_samples(self) -> int:
        """This rank's samples this epoch: DALI splits a split into `world_size` contiguous
        parts of floor/ceil(n / world) samples."""
        part, n, w = self._part(self._epoch), self._n, self.world_size
        return (part + 1) * n // w - part * n // w

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _build(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch = self._epoch if self.train else 0
        if self._pipe is not None and self._built_for == epoch:
            return
        self.close()
        shard = self._part(epoch)
        pipe_seed = derive_seed(self.seed, self.rank, epoch, 2) % (2**31)
        self._pipe = _pipeline_def()(
            paths=self.paths,
            index_paths=self.index_paths,
            image_size=self.policy.image_size,
            augment=self.policy.augment,
            train=self.train,
            shard_id=shard,
            num_shards=self.world_size,
            gpu=self.gpu,
            channels_last=self.channels_last,
            half=self.half,
            reader_seed=derive_seed(self.seed, epoch, 3) % (2**31),
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if self.gpu else None,
            seed=pipe_seed,
            prefetch_queue_depth=2,
        )
        self._pipe.build()
        self._iter = DALIGenericIterator(
            [self._pipe],
            ["images", "labels"],
            reader_name=READER,
            last_batch_policy=self._policy,
            auto_reset=True,
        )
        self._built_for = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._build()
        produced = 0
        try:
            for out in self._iter:
                images, raw_labels = out[0]["images"], out[0]["labels"]
                labels = labels_from_ascii(raw_labels, check=produced == 0)
                labels = labels.to(self.device, non_blocking=True)
                if self.channels_last:  # NHWC memory is NCHW channels_last, without a copy
                    images = images.permute(0, 3, 1, 2)
                images = images.to(self.device, non_blocking=True)
                produced += 1
                yield images, labels
        except RuntimeError as exc:
            raise DatasetError(self._describe_failure(exc)) from exc
        if self.train:
            self.close()  # the next epoch rebuilds with its own seed and part
        # A rank whose part ran out one batch early still takes part in the last step.
        while produced < self._batches:
            produced += 1
            yield self._empty_batch()

    def _empty_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.policy.image_size
        dtype = torch.float16 if self.half else torch.float32
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = torch.empty(0, 3, size, size, dtype=dtype, device=self.device, memory_format=fmt)
        return images, torch.empty(0, dtype=torch.long, device=self.device)

    def _describe_failure(self, exc: RuntimeError) -> str:
        """DALI's message names the operator, not the sample: find the sample with PIL."""
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "failure" in ln or "rror" in ln), lines[-1:] or [""])
        found = [
            describe_corruption(self.manifest, self.split, i)
            for i in range(len(self.paths))
            if undecodable_samples(self.manifest, self.split, i)
        ]
        where = "; ".join(found) if found else "no undecodable image found by PIL"
        return (
            f"DALI failed reading the {self.split} split of {self.manifest.root} (rank "
            f"{self.rank}): {cause}; {where}. Re-prepare the dataset (launch/prepare_data.py)."
        )

    def close(self) -> None:
        """Release the pipeline (and DALI's pooled memory) so runs and trials do not pile up."""
        if self._pipe is None:
            return
        self._iter = None
        self._pipe = None
        self._built_for = None
        gc.collect()
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()
        except ImportError:  # older DALI
            pass


def build_dali_loaders(
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
    verify_shards: str = "auto",
) -> dict[str, DaliLoader]:
    def make(split: str, bs: int) -> DaliLoader:
        return DaliLoader(
            manifest,
            split,
            policy,
            train=split == "train",
            batch_size=bs,
            rank=rank,
            world_size=world_size,
            seed=seed,
            threads=max(1, workers),
            device=device,
            channels_last=channels_last,
            verify_shards=verify_shards,
        )

    return {
        "train": make("train", batch_size),
        "val": make("val", eval_batch_size),
        "test": make("test", eval_batch_size),
    }
