"""From a training checkpoint to an exportable model (its best-validation weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet18_dist.checkpoint_file import CheckpointError, best_model_state, load_checkpoint
from resnet18_dist.data.policy import IMAGENET_MEAN, IMAGENET_STD
from resnet18_dist.model_meta import ExportMeta
from resnet18_dist.models import ModelSpec, ResNetClassifier, build_model
from resnet18_dist.preprocessing import SQUASH


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
    size = int(resolved["image_size"])
    meta = ExportMeta.describe(
        classes=list(state["classes"]),
        image_size=size,
        # Runs from before the photo geometry squashed every image.
        preprocess=resolved.get("preprocess", SQUASH),
        eval_resize=int(resolved.get("eval_resize", size)),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        model_spec=spec.to_dict(),
        source_checkpoint=state["_path"],
    )
    return model, state, meta
