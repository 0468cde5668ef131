"""The runtime: what the training loop knows about processes, devices and collectives.

``TorchRuntime`` covers a plain process and torchrun-style environments; the Ray Train and
accelerate adapters subclass it and change only how the device is chosen and the model wrapped.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet18_dist.config import RunConfig


def resolve_amp(mode: str, device: torch.device) -> bool:
    """bf16 autocast on GPUs that support it (auto), everywhere (bf16), or never (off)."""
    if mode == "bf16":
        return True
    if mode == "off":
        return False
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_channels_last(mode: str, device: torch.device) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return device.type == "cuda"  # NHWC convolutions are the fast path for cuDNN tensor cores


class TorchRuntime:
    """A single process, or one rank of a ``torch.distributed`` job (torchrun's env variables)."""

    name = "torch"

    def __init__(self, run: RunConfig, device: torch.device | None = None) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = device if device is not None else self._pick_device(run)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        self._configure(run)

    def _pick_device(self, run: RunConfig) -> torch.device:
        want_gpu = run.use_gpu == "on" or (run.use_gpu == "auto" and torch.cuda.is_available())
        if want_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("--use-gpu on, but CUDA is not available in this process")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _configure(self, run: RunConfig) -> None:
        self.amp = resolve_amp(run.amp, self.device)
        self.channels_last = resolve_channels_last(run.channels_last, self.device)
        if self.device.type == "cpu":
            # One intra-op thread per reserved core; more only oversubscribes the co-located ranks.
            torch.set_num_threads(max(1, run.cpus_per_worker))
        else:
            torch.backends.cudnn.benchmark = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        model = self.prepare_module(model)
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def prepare_module(self, model: nn.Module) -> nn.Module:
        """Move to the device and memory format, without DDP (also used for teachers)."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_memory_bytes(self) -> int:
        """CUDA max allocated on GPU, the process's peak RSS on CPU."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux

    def describe(self) -> str:
        return f"{self.name} rank {self.rank}/{self.world_size} on {self.device}"

    def shutdown(self) -> None:
        """Tear down a process group this runtime created (launchers own theirs)."""
