"""ResNet18 (He et al., 2015) with optional squeeze-and-excitation, CIFAR stem and head dropout.

Built on torchvision's ``ResNet`` so that, with SE off, ``state_dict`` keys are exactly those of
``torchvision.models.resnet18`` and its ImageNet weights load strictly. SE adds ``*.se.*`` keys;
the CIFAR stem only changes the shape of ``conv1.weight``; dropout has no parameters.

ResNet18 is the product; resnet34 and resnet50 are built the same way so that the same launcher
can train a larger distillation teacher.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from resnet18_dist.config import SE_REDUCTIONS, SMALL_IMAGE_MAX, WIDTH_MAX

ARCH = "resnet18"
# torchvision's block type and blocks per stage for each supported depth.
ARCHS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class SqueezeExcite(nn.Module):
    """Channel attention of SE-Net (Hu et al., 2018): pool, bottleneck MLP, sigmoid gate.

    1x1 convolutions instead of Linear layers, as in timm, so no reshapes are needed and the
    module exports to ONNX as plain convolutions.
    """

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.fc2(self.relu(self.fc1(scale))))
        return x * scale


class SEBasicBlock(BasicBlock):
    """BasicBlock with SE on the residual branch, after the second BN and before the addition
    (the SE-ResNet placement)."""

    def __init__(self, *args: Any, se_reduction: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite(self.bn2.num_features, se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides the parameter shapes; stored in every checkpoint and export."""

    arch: str = ARCH
    num_classes: int = 1000
    se_reduction: int = 0
    stem: str = "imagenet"  # "imagenet" or "cifar" (resolved, never "auto")
    dropout: float = 0.0
    # Channel multiplier: 1.0 is the real network (64/128/256/512 channels); a narrower one
    # (tests of orchestration, not of learning) runs the same code path in milliseconds.
    width: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def resolve_stem(stem: str, image_size: int) -> str:
    if stem != "auto":
        return stem
    return "cifar" if image_size <= SMALL_IMAGE_MAX else "imagenet"


class ResNetClassifier(ResNet):
    """torchvision's ResNet (18 by default: [2, 2, 2, 2] basic blocks) plus this project's
    options."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.arch not in ARCHS:
            raise ValueError(
                f"unsupported architecture {spec.arch!r}; choose one of {', '.join(ARCHS)}"
            )
        if spec.se_reduction not in SE_REDUCTIONS:
            raise ValueError(
                f"se_reduction must be one of {SE_REDUCTIONS}, got {spec.se_reduction}"
            )
        if spec.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {spec.stem!r}")
        if not 0 < spec.width <= WIDTH_MAX:
            raise ValueError(f"width must be in (0, {WIDTH_MAX}], got {spec.width}")
        # Read by _make_layer while torchvision's __init__ builds the stages.
        self._width = spec.width
        block, layers = ARCHS[spec.arch]
        if spec.se_reduction:
            if block is not BasicBlock:
                raise ValueError(f"SE blocks are built for basic-block ResNets, not {spec.arch}")
            block = functools.partial(SEBasicBlock, se_reduction=spec.se_reduction)
            block.expansion = BasicBlock.expansion  # ResNet._make_layer reads it
        super().__init__(block, layers, num_classes=spec.num_classes)
        self.spec = spec
        stem_out = self.channels(64)
        if spec.stem == "cifar":
            # Small images: a 7x7/2 conv plus max-pool would shrink 32 px to 8 px before layer1.
            self.conv1 = nn.Conv2d(3, stem_out, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.maxpool = nn.Identity()
        elif stem_out != 64:
            self.conv1 = nn.Conv2d(3, stem_out, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if stem_out != 64:
            # torchvision builds the stem and the head at the full width; the stages, built
            # by _make_layer below, are already narrowed.
            self.bn1 = nn.BatchNorm2d(stem_out)
            self.fc = nn.Linear(self.channels(512) * block.expansion, spec.num_classes)
        # nn.Dropout has no parameters, so the head keeps torchvision's `fc.*` keys.
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def channels(self, planes: int) -> int:
        """A stage's channel count at this width (at least 1)."""
        return max(1, round(planes * self._width))

    def _make_layer(self, block: Any, planes: int, *args: Any, **kwargs: Any) -> nn.Sequential:
        if planes == 64:  # layer1: its input is the (narrowed) stem's output
            self.inplanes = self.channels(64)
        return super()._make_layer(block, self.channels(planes), *args, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


ResNet18 = ResNetClassifier  # the product's name for the default depth


def build_model(spec: ModelSpec) -> ResNetClassifier:
    return ResNetClassifier(spec)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
