"""accelerate adapter: the single-node fallback for users without Ray.

An ``Accelerator`` owns process-group setup, device placement, DDP wrapping, mixed precision and
backward; the training loop and the checkpoint format are the same as under Ray Train, so a run
started here resumes under Ray and the other way round.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from resnet18_dist.config import DeviceConfig
from resnet18_dist.engine.runtime import TorchRuntime, resolve_amp

# Set by `accelerate launch --mixed_precision X` (or its config file) in every process it starts.
LAUNCH_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"


def mixed_precision(opts: DeviceConfig, device: torch.device) -> str | None:
    """What the Accelerator is given: our --amp, except that --amp auto leaves the choice to
    `accelerate launch --mixed_precision` when that chose one (None: the Accelerator reads
    it from the environment)."""
    if opts.amp == "auto" and os.environ.get(LAUNCH_MIXED_PRECISION, "no") != "no":
        return None
    mode = resolve_amp(opts.amp, device)
    return "no" if mode == "off" else mode


def build_accelerator(opts: DeviceConfig):
    from accelerate import Accelerator

    cpu = opts.use_gpu == "off" or not torch.cuda.is_available()
    if opts.use_gpu == "on" and not torch.cuda.is_available():
        raise RuntimeError("--use-gpu on, but CUDA is not available in this process")
    device = torch.device("cpu") if cpu else torch.device("cuda")
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision(opts, device))


class AcceleratorRuntime(TorchRuntime):
    name = "accelerate"

    def __init__(self, opts: DeviceConfig, accelerator, *, threads: int | None = None) -> None:
        import os

        self.accelerator = accelerator
        super().__init__(
            opts,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            local_rank=accelerator.local_process_index,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
            device=accelerator.device,
            threads=threads,
        )
        # The Accelerator decides mixed precision (and owns fp16's gradient scaler): report
        # what it does.
        precision = str(accelerator.mixed_precision)
        self.set_amp("off" if precision == "no" else precision)
        self.scaler = accelerator.scaler  # None but for fp16 on a GPU

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.accelerator.prepare_model(self.prepare_module(model))

    def unwrap(self, model: nn.Module) -> nn.Module:  # type: ignore[override]
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)  # scaled by the Accelerator's scaler with fp16

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def shutdown(self) -> None:
        self.accelerator.end_training()
