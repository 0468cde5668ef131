"""Training tasks: how a batch becomes a loss. The loop calls ``task.loss`` and nothing else."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


class Task(Protocol):
    """Turns a batch into (loss, the student's logits). ``name`` is recorded in the run."""

    name: str

    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``.

    The KL term is summed over classes and averaged over the batch (``batchmean``): the mean
    over classes that ``KLDivLoss()``'s default reduction takes would shrink it by the class
    count. T^2 keeps its gradients on the scale of the CE term (Hinton et al., 2015).
    """
    s = student_logits.float()
    t = teacher_logits.float()
    ce = F.cross_entropy(s, labels, label_smoothing=label_smoothing)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


class DistillationTask:
    """Cross-entropy plus distillation from a frozen teacher.

    The teacher is not wrapped in DDP (it has no gradients to synchronise), is frozen here
    (eval mode, so its BatchNorm statistics never move; no parameter requires a gradient) and
    runs under no_grad, inside the same autocast as the student (the loop's). The loop only ever
    switches the student between train and eval mode.
    """

    name = "distillation"

    def __init__(
        self, teacher: nn.Module, temperature: float, alpha: float, label_smoothing: float = 0.0
    ) -> None:
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.temperature = temperature
        self.alpha = alpha
        self.label_smoothing = label_smoothing

    def loss(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        loss = distillation_loss(
            logits, teacher_logits, labels, self.temperature, self.alpha, self.label_smoothing
        )
        return loss, logits
