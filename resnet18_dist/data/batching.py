"""What every loader backend shares: its settings, and the rules that keep DDP ranks in step.

Both backends read every sample of a split exactly once per epoch across the ranks, so the
ranks' parts differ by at most one sample. Every rank must still take the same number of
training steps (a DDP step is a collective), so each yields ``batches_per_rank`` batches; a rank
whose part ran out first ends on an empty batch (``empty_batch``), which the loop still steps
with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoaderSettings:
    """One rank's loader settings, the same for every split (eval batch size aside)."""

    batch_size: int
    eval_batch_size: int
    rank: int
    world_size: int
    seed: int
    workers: int  # DataLoader worker processes / DALI threads
    device: torch.device
    channels_last: bool
    verify_shards: str = "auto"  # DALI: check shard hashes (done by local rank 0, see session)
    prefetch: int = 2  # DALI: prefetch_queue_depth
    hw_decoder_load: float = 0.65  # DALI on a GPU: hardware JPEG decoder's share

    def batch_size_for(self, train: bool) -> int:
        return self.batch_size if train else self.eval_batch_size


def batches_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields: those of the largest part (ceil(n / world) samples)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def empty_batch(
    image_size: int,
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (images, labels) a rank yields after its part of the split ran out."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.empty(
        0, 3, image_size, image_size, dtype=dtype, device=device, memory_format=fmt
    )
    return images, torch.empty(0, dtype=torch.long, device=device)
