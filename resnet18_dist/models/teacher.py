"""Distillation teachers: a checkpoint of this project, or a torchvision ResNet with its weights.

A teacher must predict the data's classes: a different class count (or, where the teacher
records them, different class names) is an error rather than a silently wrong target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from resnet18_dist.checkpoint_file import CheckpointError, best_model_state, load_checkpoint
from resnet18_dist.config import TORCHVISION_TEACHERS, DistillConfig
from resnet18_dist.models.finetune import read_weights
from resnet18_dist.models.resnet import ModelSpec, build_model


def load_teacher(cfg: DistillConfig, classes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen teacher (eval mode, no gradients, on CPU) and a description of it."""
    assert cfg.teacher is not None
    if Path(cfg.teacher).exists():
        state = load_checkpoint(cfg.teacher)
        spec = ModelSpec.from_dict(state["model_spec"])
        where = state["_path"]
        if spec.num_classes != len(classes):
            raise CheckpointError(
                f"teacher {where} predicts {spec.num_classes} classes, the data has {len(classes)}"
            )
        if state.get("classes") not in (None, classes):
            raise CheckpointError(
                f"teacher {where} was trained on classes {state['classes']}, the data has {classes}"
            )
        model: nn.Module = build_model(spec)
        model.load_state_dict(best_model_state(state))
        info = {"kind": "checkpoint", "path": where, **spec.to_dict()}
    elif cfg.teacher in TORCHVISION_TEACHERS:
        import torchvision

        if cfg.teacher_weights is None:  # a launcher's preflight refuses this before any worker
            raise CheckpointError(
                f"a torchvision teacher ({cfg.teacher}) needs its weights: --teacher-weights"
            )
        weights = read_weights(cfg.teacher_weights, cfg.teacher)
        head = weights.get("fc.weight")
        if head is None:
            raise CheckpointError(f"{cfg.teacher_weights}: no fc.weight; not a ResNet state dict")
        if head.shape[0] != len(classes):
            raise CheckpointError(
                f"teacher {cfg.teacher} from {cfg.teacher_weights} predicts {head.shape[0]} "
                f"classes, the data has {len(classes)}"
            )
        model = torchvision.models.get_model(cfg.teacher, weights=None, num_classes=len(classes))
        model.load_state_dict(weights)
        info = {"kind": "torchvision", "arch": cfg.teacher, "weights": cfg.teacher_weights}
    else:  # a launcher's preflight (launching/preflight.check_paths) refuses this first
        raise CheckpointError(
            f"teacher {cfg.teacher!r} is neither a checkpoint / run directory nor one of "
            f"{', '.join(TORCHVISION_TEACHERS)}"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info
