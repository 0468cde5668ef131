"""The loader interface the training loop sees, and the backend registry behind it."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from resnet18_dist.config import ConfigError, DataConfig
from resnet18_dist.data.batching import LoaderSettings
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy
from resnet18_dist.data.torch_loader import build_torchvision_loaders, dataset_size_check

log = logging.getLogger(__name__)


class Loader(Protocol):
    """Batches ``(images, labels)`` already on the training device.

    ``len`` is the number of batches this rank yields per epoch; for the training split it is
    the same on every rank so DDP never waits on a rank that ran out of data.
    ``num_samples`` is how many samples this rank sees per epoch.
    """

    backend: str
    num_samples: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def sample_order(self, epoch: int) -> list[str]: ...
    def close(self) -> None: ...


@dataclass
class Loaders:
    train: Loader
    val: Loader
    test: Loader
    backend: str
    workers: int  # DataLoader worker processes / DALI threads

    def close(self) -> None:
        for loader in (self.train, self.val, self.test):
            loader.close()


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(requested: str, device: torch.device) -> str:
    if requested == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torchvision"
    if requested == "dali" and not dali_available():
        raise ConfigError(
            "--data-backend",
            "dali was requested but NVIDIA DALI is not installed "
            "(pip install 'resnet18-dist[dali]', or use --data-backend torchvision)",
        )
    return requested


def default_loader_workers(device: torch.device, cpus_per_worker: int) -> int:
    # On CPU the training step itself uses every reserved core; extra decode processes only
    # pay off when the worker has cores to spare. On a GPU, decode is the bottleneck.
    if device.type == "cuda":
        return max(2, min(8, cpus_per_worker))
    return 0 if cpus_per_worker <= 2 else min(4, cpus_per_worker // 2)


def loader_settings(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool,
    cpus_per_worker: int,
    verify_shards: bool = True,
    batch_size: int | None = None,
) -> LoaderSettings:
    """One rank's settings from the data options; ``verify_shards=False`` skips the shard
    check on ranks that leave it to another rank of their node; ``batch_size`` overrides the
    option's (an elastic run's per-worker share of its global batch)."""
    workers = cfg.loader_workers
    if workers < 0:
        workers = default_loader_workers(device, cpus_per_worker)
    return LoaderSettings(
        batch_size=batch_size or cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        workers=workers,
        device=device,
        channels_last=channels_last,
        verify_shards=cfg.verify_shards if verify_shards else "off",
        prefetch=cfg.dali_prefetch,
        hw_decoder_load=cfg.hw_decoder_load,
    )


def build_loaders(
    cfg: DataConfig, manifest: Manifest, policy: DataPolicy, settings: LoaderSettings
) -> Loaders:
    backend = resolve_backend(cfg.data_backend, settings.device)
    dataset_size_check(manifest, settings.batch_size, settings.world_size)
    if backend == "dali":
        from resnet18_dist.data.dali import build_dali_loaders

        loaders = build_dali_loaders(manifest, policy, settings)
    else:
        loaders = build_torchvision_loaders(manifest, policy, settings)
    return Loaders(
        loaders["train"],
        loaders["val"],
        loaders["test"],
        backend,
        settings.workers,  # type: ignore[arg-type]
    )
