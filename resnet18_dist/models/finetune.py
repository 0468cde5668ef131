"""Fine-tuning: pretrained starts, frozen parts (no gradient, BatchNorm in eval), train mode."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from resnet18_dist.checkpoint_file import CheckpointError, best_model_state, load_checkpoint
from resnet18_dist.config import parse_freeze
from resnet18_dist.models.resnet import ResNetClassifier

log = logging.getLogger(__name__)

HEAD_KEYS = ("fc.weight", "fc.bias")


def torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``arch`` (downloaded once into torch's hub cache)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket.timeout, hash mismatch...
        raise CheckpointError(
            f"could not download torchvision's {arch} weights ({weights.url}): {exc}. Without "
            "the internet, download the file elsewhere and pass its path instead of `torchvision`"
        ) from exc


def read_weights(source: str, arch: str) -> dict[str, torch.Tensor]:
    """A state dict from `torchvision`, a torchvision-format file, or a project checkpoint."""
    if source == "torchvision":
        return torchvision_state_dict(arch)
    path = Path(source)
    if path.is_dir():
        return best_model_state(load_checkpoint(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict) and "model_spec" in state and "model" in state:
        return best_model_state(state)  # a checkpoint of this project
    if isinstance(state, dict) and "state_dict" in state:  # a common wrapper
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: ResNetClassifier, source: str) -> list[str]:
    """Load ``source`` into ``model`` except the head (and a stem of another shape).

    Returns the keys that kept their fresh initialisation. Any other mismatch is an error.
    """
    state = read_weights(source, model.spec.arch)
    own = model.state_dict()
    skipped = [k for k in HEAD_KEYS if k in state]
    for key in ("conv1.weight",):
        if key in state and state[key].shape != own[key].shape:
            # ImageNet's 7x7 stem does not fit the 3x3 CIFAR stem; everything after it does.
            log.warning(
                "pretrained %s has shape %s, the %s stem needs %s: kept fresh",
                key,
                tuple(state[key].shape),
                model.spec.stem,
                tuple(own[key].shape),
            )
            skipped.append(key)
    usable = {k: v for k, v in state.items() if k not in skipped}
    misshapen = [k for k, v in usable.items() if k in own and v.shape != own[k].shape]
    unexpected = [k for k in usable if k not in own]
    fresh = [k for k in own if k not in usable and k not in HEAD_KEYS and k not in skipped]
    fresh = [k for k in fresh if ".se." not in k]  # SE is new on top of a plain ResNet
    if misshapen or unexpected or fresh:
        raise CheckpointError(
            f"{source}: does not fit {model.spec.arch}: wrong shapes {misshapen[:3]}, "
            f"unexpected {unexpected[:3]}, missing {fresh[:3]}"
        )
    missing, _ = model.load_state_dict(usable, strict=False)
    kept_fresh = sorted(set(missing))
    log.info("pretrained weights from %s; fresh: %s", source, ", ".join(kept_fresh) or "none")
    return kept_fresh


def frozen_modules(model: ResNetClassifier, freeze: str) -> list[nn.Module]:
    """The modules that ``--freeze`` freezes, in network order."""
    n = parse_freeze(freeze)
    if n == 0:
        return []
    stem = [model.conv1, model.bn1]
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    return stem + stages[: min(n, 4)]


def apply_freeze(model: ResNetClassifier, freeze: str) -> Callable[[nn.Module], None]:
    """Freeze parameters and return the train-mode function the loop should use.

    Frozen BatchNorm layers stay in eval mode while training, so their running statistics do not
    drift on the new data (model.train() alone would switch them back every epoch).
    """
    modules = frozen_modules(model, freeze)
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    if not modules:
        return lambda m: m.train()

    def set_train_mode(wrapped: nn.Module) -> None:
        wrapped.train()
        for m in modules:
            m.eval()

    return set_train_mode
