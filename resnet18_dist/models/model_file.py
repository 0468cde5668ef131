"""``model.pt``: the best weights with everything needed to rebuild and feed the model.

Written at the end of every training run (into its run directory) and by the export; read by
the export's measurements and by anyone deploying with PyTorch. No optimizer state, and it loads
with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from resnet18_dist.atomic import atomic_write
from resnet18_dist.checkpoint_file import CheckpointError
from resnet18_dist.model_meta import FORMAT, ExportMeta
from resnet18_dist.models.resnet import ModelSpec, ResNetClassifier, build_model


def save_model_pt(model: ResNetClassifier, meta: ExportMeta, path: Path) -> None:
    """FP32 weights plus everything needed to rebuild and feed the model; no optimizer state."""
    payload = {
        "format": FORMAT,
        "meta": meta.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_model_pt(path: str | Path) -> tuple[ResNetClassifier, ExportMeta]:
    """Load ``model.pt`` (weights only, no code) into a fresh model in eval mode."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable model.pt ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a resnet18-dist export ({FORMAT})")
    meta = ExportMeta(
        **{
            **payload["meta"],
            "mean": tuple(payload["meta"]["mean"]),
            "std": tuple(payload["meta"]["std"]),
        }
    )
    model = build_model(ModelSpec.from_dict(meta.model_spec))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), meta
