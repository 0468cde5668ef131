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
- the training pipeline is rebuilt every epoch with a seed derived from (run seed, rank, epoch),
  reads blocks of consecutive samples in an order permuted per (run seed, epoch) and shuffles
  through a buffer (see ``_epoch_order``), so a resumed epoch draws the same samples and
  augmentations as an uninterrupted one.
"""

from __future__ import annotations

import gc
import logging
import math
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from resnet18_dist.data.batching import LoaderSettings, batches_per_rank, empty_batch
from resnet18_dist.data.integrity import describe_corruption, undecodable_samples, verify_split
from resnet18_dist.data.manifest import IMAGE_EXT, LABEL_EXT, DatasetError, Manifest
from resnet18_dist.data.policy import (
    AUTO_AUG_FILL,
    AUTO_AUG_POLICIES,
    AUTOAUGMENT_MAX_SHIFT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    ROTATION_DEGREES,
    DataPolicy,
    autoaugment_policy,
    crop_padding,
    erase_side,
)
from resnet18_dist.preprocessing import PHOTO_RATIO, PHOTO_SCALE
from resnet18_dist.seeding import derive_seed

log = logging.getLogger(__name__)
READER = "Reader"
# Samples held by the reader's shuffle buffer: encoded JPEGs, so ~100 MB of photos per reader.
SHUFFLE_BUFFER = 1024
# Training reads each epoch's blocks of consecutive samples in a new order (see _reader). More
# blocks shuffle better; each is a path DALI's reader opens, so they are capped.
MAX_BLOCKS = 4096
MIN_BLOCK = 64


def _pipeline_def():  # DALI is imported here so that this module loads without it
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import auto_augment, trivial_augment

    # Conditionals: auto_aug picks each sample's operation with DALI's `if`, and random erasing
    # applies to a coin-flipped part of the batch. (Python-level ifs on the arguments below are
    # plain Python under AutoGraph.)
    @pipeline_def(enable_conditionals=True)
    def image_pipeline(
        reader: dict[str, Any],
        policy: DataPolicy,
        train: bool,
        gpu: bool,
        channels_last: bool,
        half: bool,
        hw_decoder_load: float,
    ):
        image_size, augment = policy.image_size, policy.augment
        jpegs, labels = fn.readers.webdataset(**reader)
        # EXIF orientation applied, as every PIL decode in the project does (imaging.py).
        decode_args: dict[str, Any] = {
            "device": "mixed" if gpu else "cpu",
            "output_type": types.RGB,
            "adjust_orientation": True,
            **({"hw_decoder_load": hw_decoder_load} if gpu else {}),
        }
        resize_args: dict[str, Any] = {"interp_type": types.INTERP_LINEAR, "antialias": True}
        mirror: Any = 0
        if train and policy.random_crop:
            # The photo geometry's random resized crop (torchvision's RandomResizedCrop area
            # and ratio ranges), decoded as a crop: only the window is decoded (DALI's own
            # ImageNet pipeline), then resized to the square.
            images = fn.decoders.image_random_crop(
                jpegs,
                random_area=list(PHOTO_SCALE),
                random_aspect_ratio=list(PHOTO_RATIO),
                **decode_args,
            )
            images = fn.resize(images, size=[image_size, image_size], **resize_args)
            mirror = fn.random.coin_flip(probability=0.5)
        elif policy.photo:
            # Evaluation's photo geometry (and training's with augment none): the shorter side
            # to size / 0.875, then the centre square.
            images = fn.decoders.image(jpegs, **decode_args)
            images = _photo_eval_geometry(images, image_size, policy.eval_resize, resize_args)
        else:
            images = fn.decoders.image(jpegs, **decode_args)
            images = fn.resize(images, size=[image_size, image_size], **resize_args)
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
            if not policy.random_crop:
                mirror = fn.random.coin_flip(probability=0.5)
        elif train and policy.base_crop:
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
        elif train and augment in AUTO_AUG_POLICIES and not policy.random_crop:
            mirror = fn.random.coin_flip(probability=0.5)
        if train and augment == "trivialaugment":
            images = trivial_augment.trivial_augment_wide(
                images, fill_value=AUTO_AUG_FILL, interp_type=types.INTERP_LINEAR
            )
        elif train and augment == "autoaugment":
            names = {"cifar10": "reduced_cifar10", "imagenet": "image_net"}
            images = auto_augment.auto_augment(
                images,
                policy_name=names[autoaugment_policy(image_size)],
                fill_value=AUTO_AUG_FILL,
                interp_type=types.INTERP_LINEAR,
                # torchvision's (and the paper's) largest shift, 150/331 of the side; DALI's
                # default is 250 px, which would push a 32-px image out of its frame.
                max_translate_abs=max(1, round(image_size * AUTOAUGMENT_MAX_SHIFT)),
            )
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT16 if half else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW",
            mean=[m * 255 for m in IMAGENET_MEAN],
            std=[s * 255 for s in IMAGENET_STD],
            mirror=mirror,
        )
        if train and policy.random_erasing > 0:
            # The same square as the torchvision backend's RandomErasing: half the side, placed
            # uniformly inside the image, set to 0 after normalisation (the mean colour).
            side = erase_side(image_size)
            if fn.random.coin_flip(probability=policy.random_erasing):
                anchor = fn.random.uniform(
                    values=[float(i) for i in range(image_size - side + 1)], shape=2
                )
                images = fn.erase(
                    images, anchor=anchor, shape=[side, side], axis_names="HW", fill_value=0
                )
        return images, labels

    return image_pipeline


def _photo_eval_geometry(images: Any, size: int, shorter: int, resize_args: dict[str, Any]) -> Any:
    """The shorter side to ``shorter``, then the centre size x size, with torchvision's size
    arithmetic (``preprocessing.py``), computed per sample from the decoded shape.

    DALI's own ``resize_shorter`` keeps the fractional longer side (``subpixel_scale``) and
    ``crop`` places a centre window by its own rounding; each differs from torchvision's
    truncated side and round-half-even offset by under a pixel, which was enough to move the
    eval tensors 30 times further from torchvision's (mean |diff| 0.075 against 0.0023 for the
    squashed square). So the sizes and the window are computed here, in integers.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    shape = images.shape()  # H, W, C (after the decoder's EXIF orientation)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = (h * shorter) // short, (w * shorter) // short
    images = fn.resize(
        images,
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        **resize_args,
    )

    def centre(side: Any) -> Any:  # int(round((side - size) / 2)), rounding half to even
        spare = side - size
        half = spare // 2
        odd = spare - 2 * half
        return half + odd * (half - 2 * (half // 2))

    start = fn.stack(centre(new_h), centre(new_w))
    start = fn.cast(start, dtype=types.INT32)
    return fn.slice(images, start=start, shape=[size, size], axes=[0, 1])


def _order_pipeline_def():
    """The reader alone: which samples, in which order (``DaliLoader.sample_order``)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def order_pipeline(reader: dict[str, Any]):
        jpegs, _ = fn.readers.webdataset(**reader)
        return jpegs

    return order_pipeline


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
        settings: LoaderSettings,
        *,
        train: bool,
        half: bool = False,
    ) -> None:
        self.manifest = manifest
        self.split = split
        self.policy = policy
        self.settings = settings
        self.train = train
        self.batch_size = settings.batch_size_for(train)
        self.threads = max(1, settings.workers)
        self.device = settings.device
        self.gpu = settings.device.type == "cuda"
        self.half = half
        self.paths = [str(p) for p in manifest.shard_paths(split)]
        self.index_paths = [str(p) for p in manifest.index_paths(split)]
        n = manifest.counts[split]
        if n < settings.world_size:
            raise DatasetError(
                f"{manifest.root}: {n} {split} images for {settings.world_size} workers"
            )
        # Before DALI sees any byte: its decoder may crash instead of raising on a bad image.
        # (run_training lets only one rank per node do this; see engine/session.py.)
        verify_split(manifest, split, settings.verify_shards)
        self._n = n
        self._batches = batches_per_rank(n, settings.world_size, self.batch_size)
        self._blocks = self._split_into_blocks() if train else []
        self._block_dir: tempfile.TemporaryDirectory | None = None
        self._pipe: Any = None
        self._iter: Any = None
        self._epoch = 0
        self._built_for: int | None = None

    def __len__(self) -> int:
        return self._batches

    @property
    def num_samples(self) -> int:
        """This rank's samples per epoch: DALI splits the split's sample stream into
        ``world_size`` contiguous parts of floor/ceil(n / world) samples."""
        r, n, w = self.settings.rank, self._n, self.settings.world_size
        return (r + 1) * n // w - r * n // w

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _split_into_blocks(self) -> list[tuple[int, list[str]]]:
        """(shard, index lines) of blocks of consecutive samples, from the shards' indexes."""
        size = max(MIN_BLOCK, math.ceil(self._n / MAX_BLOCKS))
        blocks = []
        for shard, idx in enumerate(self.index_paths):
            with open(idx) as f:
                lines = f.read().splitlines()[1:]  # after the "v1.2 N" header
            blocks += [(shard, lines[i : i + size]) for i in range(0, len(lines), size)]
        return blocks

    def _epoch_order(self, epoch: int) -> tuple[list[str], list[str]]:
        """Training: (paths, index paths) listing this epoch's blocks in a seeded random order.

        DALI's webdataset reader reads its paths in the order given, through a shuffle buffer
        of SHUFFLE_BUFFER samples. Over whole shards in their stored order, consecutive epochs
        came out in nearly the same order (position correlation 0.99 on a 30,000-image split);
        shuffling whole shards still left +-0.25 with 15 shards. So each epoch lists blocks of
        a few dozen samples, each an index file naming its part of a shard (the same tar), in
        a permutation seeded by (run seed, epoch): the same on every rank, which then read
        disjoint parts of it, and the same again when a run resumes.
        """
        g = torch.Generator().manual_seed(derive_seed(self.settings.seed, epoch, 4))
        order = torch.randperm(len(self._blocks), generator=g).tolist()
        if self._block_dir is None:
            self._block_dir = tempfile.TemporaryDirectory(prefix="r18d-dali-blocks-")
        paths, index_paths = [], []
        for k, b in enumerate(order):
            shard, lines = self._blocks[b]
            idx = f"{self._block_dir.name}/e{epoch}-{k:05d}.idx"
            with open(idx, "w") as f:
                f.write(f"v1.2 {len(lines)}\n" + "\n".join(lines) + "\n")
            paths.append(self.paths[shard])
            index_paths.append(idx)
        return paths, index_paths

    def _reader(self, epoch: int) -> dict[str, Any]:
        """The reader's arguments for an epoch (the same on every rank but for shard_id)."""
        if self.train:
            paths, index_paths = self._epoch_order(epoch)
        else:
            paths, index_paths = self.paths, self.index_paths
        return {
            "paths": paths,
            "index_paths": index_paths,
            "ext": [IMAGE_EXT, LABEL_EXT],
            "missing_component_behavior": "error",
            "shard_id": self.settings.rank,
            "num_shards": self.settings.world_size,
            "pad_last_batch": True,
            "stick_to_shard": True,  # the part is chosen per epoch by the rebuild, not by DALI
            "random_shuffle": self.train,
            "initial_fill": SHUFFLE_BUFFER,
            "seed": derive_seed(self.settings.seed, epoch, 3) % (2**31),
            "name": READER,
        }

    def _build(self) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        epoch = self._epoch if self.train else 0
        if self._pipe is not None and self._built_for == epoch:
            return
        self.close()
        self._pipe = self._make_pipeline(epoch)
        self._pipe.build()
        self._iter = DALIGenericIterator(
            [self._pipe],
            ["images", "labels"],
            reader_name=READER,
            # Drop the reader's padding (pad_last_batch): every sample once per epoch.
            last_batch_policy=LastBatchPolicy.PARTIAL,
            auto_reset=True,
        )
        self._built_for = epoch

    def _make_pipeline(self, epoch: int) -> Any:
        s = self.settings
        return _pipeline_def()(
            reader=self._reader(epoch),
            policy=self.policy,
            train=self.train,
            gpu=self.gpu,
            channels_last=s.channels_last,
            half=self.half,
            hw_decoder_load=s.hw_decoder_load,
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device.index if self.gpu else None,
            seed=derive_seed(s.seed, s.rank, epoch, 2) % (2**31),
            prefetch_queue_depth=s.prefetch,
        )

    def sample_order(self, epoch: int) -> list[str]:
        """The sample keys this rank reads in ``epoch``, in order: the training pipeline's own
        reader configuration, run without decoding (for shuffle measurements)."""
        pipe = _order_pipeline_def()(
            reader=self._reader(epoch if self.train else 0),
            batch_size=self.batch_size,
            num_threads=1,
            device_id=None,
        )
        pipe.build()
        keys: list[str] = []
        for _ in range(math.ceil(self.num_samples / self.batch_size)):
            (jpegs,) = pipe.run()
            keys += [jpegs[i].source_info().rsplit(":", 1)[-1] for i in range(len(jpegs))]
        del pipe
        return [k.rsplit(".", 1)[0] for k in keys[: self.num_samples]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._build()
        produced = 0
        try:
            for out in self._iter:
                images, raw_labels = out[0]["images"], out[0]["labels"]
                labels = labels_from_ascii(raw_labels, check=produced == 0)
                labels = labels.to(self.device, non_blocking=True)
                if self.settings.channels_last:  # NHWC memory is NCHW channels_last, no copy
                    images = images.permute(0, 3, 1, 2)
                images = images.to(self.device, non_blocking=True)
                produced += 1
                yield images, labels
        except RuntimeError as exc:
            raise DatasetError(self._describe_failure(exc)) from exc
        if self.train:
            self.close()  # the next epoch rebuilds with its own seed and shard order
        while produced < self._batches:  # this rank's part ran out first (data/batching.py)
            produced += 1
            yield empty_batch(
                self.policy.image_size,
                self.device,
                self.settings.channels_last,
                torch.float16 if self.half else torch.float32,
            )

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
            f"{self.settings.rank}): {cause}; {where}. Re-prepare the dataset "
            "(launch/prepare_data.py)."
        )

    def close(self) -> None:
        """Release the pipeline (and DALI's pooled memory) so runs and trials do not pile up."""
        if self._block_dir is not None:
            self._block_dir.cleanup()
            self._block_dir = None
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
    manifest: Manifest, policy: DataPolicy, settings: LoaderSettings
) -> dict[str, DaliLoader]:
    return {
        split: DaliLoader(manifest, split, policy, settings, train=split == "train")
        for split in ("train", "val", "test")
    }
