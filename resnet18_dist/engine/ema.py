"""An exponential moving average of the weights and BatchNorm statistics (``--ema-decay``).

The arithmetic is torch's own (``torch.optim.swa_utils.get_ema_multi_avg_fn``: one foreach lerp
over every tensor). Not ``AveragedModel.update_parameters`` itself: it reads its step counter
back from the device twice per call (``bool(n_averaged == 0)``, ``n_averaged > 0``) and copies it
to the device once, three host synchronisations per training step on a GPU, and it loops in
Python over the integer buffers. Here the tensor lists are gathered once and the step count is a
Python int, so an update queues device work and never waits for it.

Buffers are averaged too (``use_buffers=True`` in AveragedModel's terms): the running mean and
variance the live model's BatchNorm layers collected belong to the live weights; averaged with
the same decay they follow the averaged weights as closely as those follow the live ones, so the
average can be evaluated as it is, without an extra pass over the training data to recompute them
(``swa_utils.update_bn``). Integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class ModelEma:
    """A frozen copy of ``model`` that ``update`` moves towards it after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self._pair(model)

    def _pair(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(ours) != len(theirs):
            raise ValueError("the EMA copy and the model have different tensors")
        self._float = ([], [])  # type: tuple[list[torch.Tensor], list[torch.Tensor]]
        self._other = ([], [])  # type: tuple[list[torch.Tensor], list[torch.Tensor]]
        for a, b in zip(ours, theirs, strict=True):
            target = self._float if a.is_floating_point() else self._other
            target[0].append(a.detach())
            target[1].append(b.detach())

    def decay_at(self, updates: int) -> float:
        """The decay of the ``updates + 1``-th update: warmed up as TensorFlow's
        ExponentialMovingAverage with ``num_updates``, so that the first epochs' average is not
        dominated by the random initial weights (0.999 ** 3000 steps still leaves 5% of them)."""
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        get_ema_multi_avg_fn(self.decay_at(self.updates))(*self._float, None)
        if self._other[0]:
            torch._foreach_copy_(*self._other)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
