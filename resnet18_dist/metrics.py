"""Classification metrics over a whole split, across all DDP ranks (torchmetrics).

torchmetrics keeps per-rank state on the device with no host sync per batch, and gathers the
state of every rank when ``compute`` is called, so each sample counts once whatever the rank
that saw it.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)


class ClassificationMetrics:
    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.top_k = min(5, num_classes)
        self.collection = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes, top_k=self.top_k, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
                "per_class_acc": MulticlassAccuracy(num_classes, average="none"),
                "confusion": MulticlassConfusionMatrix(num_classes),
            },
            compute_groups=False,
        ).to(device)
        self.loss = MeanMetric().to(device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        logits = logits.float()
        self.collection.update(logits, labels)
        self.loss.update(loss.detach().float(), weight=labels.numel())

    def compute(self) -> dict[str, Any]:
        """Plain Python values; collective across ranks (every rank must call it)."""
        values = self.collection.compute()
        loss = self.loss.compute()
        confusion = values["confusion"].long()
        return {
            "loss": float(loss),
            "top1": float(values["top1"]),
            "top5": float(values["top5"]),
            "f1_macro": float(values["f1_macro"]),
            "per_class_acc": [float(v) for v in values["per_class_acc"]],
            "confusion": confusion.tolist(),
            "samples": int(confusion.sum()),  # every sample lands in exactly one cell
        }

    def reset(self) -> None:
        self.collection.reset()
        self.loss.reset()


SCALAR_KEYS = ("loss", "top1", "top5", "f1_macro")


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The per-epoch scalar view of a metrics dict, keys prefixed (``val_top1``...)."""
    return {f"{prefix}_{k}": metrics[k] for k in SCALAR_KEYS if k in metrics}
