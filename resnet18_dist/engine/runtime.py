"""The runtime: what the training loop knows about processes, devices and collectives.

``TorchRuntime`` is constructed with its rank, world size and device; ``TorchRuntime(opts)``
(the run's device options) alone reads them from the environment (a plain process, or
torchrun's variables). The Ray Train and accelerate adapters pass what their frameworks decided
and change only how the model is wrapped and the backward run.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet18_dist.config import DeviceConfig
from resnet18_dist.options import ConfigError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(mode: str, device: torch.device) -> str:
    """The autocast precision: ``bf16``, ``fp16`` or ``off``.

    auto: bf16 on a GPU with native bf16; fp16 (with a gradient scaler) on an older GPU, where
    bf16 would be emulated and slower than fp32; off on CPU. bf16 and off are taken as asked;
    fp16 is refused on CPU, which gains nothing from it.
    """
    if mode in ("bf16", "off"):
        return mode
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "--amp",
                f"fp16 is for CUDA GPUs; this process trains on {device.type}: use "
                "--amp bf16 or off",
            )
        return "fp16"
    if device.type != "cuda":
        return "off"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def resolve_channels_last(mode: str, device: torch.device) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    return device.type == "cuda"  # NHWC convolutions are the fast path for cuDNN tensor cores


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pick_device(opts: DeviceConfig, local_rank: int) -> torch.device:
    want_gpu = opts.use_gpu == "on" or (opts.use_gpu == "auto" and torch.cuda.is_available())
    if want_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("--use-gpu on, but CUDA is not available in this process")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class TorchRuntime:
    """A single process, or one rank of a ``torch.distributed`` job."""

    name = "torch"

    def __init__(
        self,
        opts: DeviceConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        local_world_size: int | None = None,
        device: torch.device | None = None,
        threads: int | None = None,
    ) -> None:
        env = os.environ
        self.rank = int(env.get("RANK", 0)) if rank is None else rank
        self.world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
        self.local_rank = int(env.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
        self.local_world_size = (
            int(env.get("LOCAL_WORLD_SIZE", self.world_size))
            if local_world_size is None
            else local_world_size
        )
        self.device = device if device is not None else pick_device(opts, self.local_rank)
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        self.set_amp(resolve_amp(opts.amp, self.device))
        self.channels_last = resolve_channels_last(opts.channels_last, self.device)
        # CPUs this rank may use: those reserved for it (Ray's, or --cpus-per-worker, passed as
        # `threads`), else this machine's cores shared among its local ranks.
        if threads is None:
            threads = max(1, available_cpus() // self.local_world_size)
        self.cpus = threads
        if self.device.type == "cpu":
            torch.set_num_threads(threads)  # more only oversubscribes co-located ranks
        else:
            torch.backends.cudnn.benchmark = True

    def set_amp(self, mode: str) -> None:
        """Autocast in ``mode`` (bf16, fp16, off); fp16 gradients go through a scaler, whose
        loss scale keeps small gradients from underflowing fp16's narrow range."""
        self.amp_mode = mode
        self.amp = mode in AMP_DTYPES
        self.amp_dtype = AMP_DTYPES.get(mode, torch.bfloat16)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")

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

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()  # unscaled unless fp16

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16, unscaled first and skipped on inf/NaN gradients."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(tensor, op=ops[op])
        return tensor

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics).

        DDP broadcasts them only at the start of a training forward, so after an epoch each
        rank's statistics include its own last batch; evaluation, the best-weights snapshot
        and the saved model must all use one set.
        """
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            if b.numel():
                by_dtype.setdefault(b.dtype, []).append(b)
        for buffers in by_dtype.values():  # one collective per dtype, not one per buffer
            flat = torch._utils._flatten_dense_tensors(buffers)
            dist.broadcast(flat, src=0)
            for b, synced in zip(
                buffers, torch._utils._unflatten_dense_tensors(flat, buffers), strict=True
            ):
                b.copy_(synced)

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
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return (
            f"DDP worker rank {self.rank}/{self.world_size} (local rank {self.local_rank}) on "
            f"{self.device}, process group {backend}, {self.name}, host {os.uname().nodename}"
        )

    def shutdown(self) -> None:
        """Tear down what this runtime set up (launchers own their process groups)."""
