"""Classification metrics over a whole split, across all DDP ranks.

Every update stays on the device: a confusion matrix filled with ``scatter_add_``, a top-k hit
count and a loss sum. ``compute`` all-reduces them once and derives top-1, top-5, macro-F1 and
per-class accuracy from the sums, so each sample counts once whatever rank saw it.

Why not torchmetrics here: its update path synchronises with the host on every batch (argument
validation calls ``torch.unique``, and its counting uses ``torch.bincount``, which on CUDA reads
the input's maximum back to size its output). At tens of thousands of images per second those
stalls matter, and everything these metrics need follows from one confusion matrix. The tests
check the figures against scikit-learn.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ClassificationMetrics:
    def __init__(self, num_classes: int, device: torch.device, top_k: int = 5) -> None:
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        self.device = device
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.confusion = torch.zeros(c * c, dtype=torch.long, device=self.device)
        self.top_k_hits = torch.zeros((), dtype=torch.long, device=self.device)
        # float64 where the device has it: a sum over millions of samples stays exact enough.
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=dtype, device=self.device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """``loss`` is the batch's mean loss; all of this is queued on the device."""
        logits = logits.detach()
        labels = labels.detach()
        cells = labels * self.num_classes + logits.argmax(dim=1)
        self.confusion.scatter_add_(0, cells, torch.ones_like(cells))
        top = logits.topk(self.top_k, dim=1).indices
        self.top_k_hits += (top == labels[:, None]).any(dim=1).sum()
        self.loss_sum += loss.detach().to(self.loss_sum.dtype) * labels.shape[0]

    def compute(self) -> dict[str, Any]:
        """Plain Python values; a collective across ranks when a process group is up (every
        rank must call it)."""
        totals = torch.cat(
            [self.confusion.to(self.loss_sum.dtype), self.top_k_hits[None], self.loss_sum[None]]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        totals = totals.cpu()
        c = self.num_classes
        confusion = totals[: c * c].round().long().view(c, c)
        hits, loss_sum = float(totals[c * c]), float(totals[c * c + 1])
        n = int(confusion.sum())
        tp = confusion.diagonal().double()
        support = confusion.sum(dim=1).double()
        predicted = confusion.sum(dim=0).double()
        # F1 per class is 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted); a class that is
        # neither present nor predicted has no F1 and is left out of the mean (as scikit-learn
        # and torchmetrics do).
        seen = (support + predicted) > 0
        f1 = 2 * tp[seen] / (support[seen] + predicted[seen])
        per_class = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        return {
            "loss": loss_sum / max(n, 1),
            "top1": float(tp.sum()) / max(n, 1),
            "top5": hits / max(n, 1),
            "f1_macro": float(f1.mean()) if seen.any() else 0.0,
            "per_class_acc": per_class.tolist(),
            "confusion": confusion.tolist(),
            "samples": n,  # every sample lands in exactly one cell
        }


SCALAR_KEYS = ("loss", "top1", "top5", "f1_macro")


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """The per-epoch scalar view of a metrics dict, keys prefixed (``val_top1``...)."""
    return {f"{prefix}_{k}": metrics[k] for k in SCALAR_KEYS if k in metrics}
