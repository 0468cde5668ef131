"""Training tasks: how a batch becomes a loss. The loop calls ``task.loss`` and nothing else."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ClassificationTask:
    """Cross-entropy on the student's logits (with optional label smoothing)."""

    name = "classification"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits
