"""``model.pt`` and the path from a training checkpoint to an exportable model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from resnet18_dist.atomic import atomic_write
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD
from resnet18_dist.engine.checkpoint import CheckpointError, best_model_state, load_checkpoint
from resnet18_dist.export.meta import FORMAT, ExportMeta
from resnet18_dist.models import ModelSpec, ResNetClassifier, build_model


def model_from_checkpoint(path: str | Path) -> tuple[ResNetClassifier, dict[str, Any], ExportMeta]:
    """The best-validation weights of a training checkpoint, in eval mode, plus its description."""
    state = load_checkpoint(path)
    try:
        spec = ModelSpec.from_dict(state["model_spec"])
        model = build_model(spec)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{state['_path']}: cannot build its model: {exc}") from exc
    try:
        model.load_state_dict(best_model_state(state))
    except RuntimeError as exc:
        raise CheckpointError(f"{state['_path']}: weights do not fit {spec.arch}: {exc}") from exc
    model.eval()
    resolved = state.get("resolved") or {}
    if "image_size" not in resolved:
        raise CheckpointError(
            f"{state['_path']}: no resolved image size; not a training checkpoint"
        )
    meta = ExportMeta(
        classes=list(state["classes"]),
        image_size=int(resolved["image_size"]),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        model_spec=spec.to_dict(),
        source_checkpoint=state["_path"],
    )
    return model, state, meta


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
