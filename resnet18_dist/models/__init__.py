from resnet18_dist.models.resnet import (
    ARCH,
    ModelSpec,
    ResNet18,
    ResNetClassifier,
    SqueezeExcite,
    build_model,
    count_parameters,
    resolve_stem,
)

__all__ = [
    "ARCH",
    "ModelSpec",
    "ResNet18",
    "ResNetClassifier",
    "SqueezeExcite",
    "build_model",
    "count_parameters",
    "resolve_stem",
]
